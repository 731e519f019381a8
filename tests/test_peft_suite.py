"""PEFT's own test suite, run against Rein.

The session fetches the source distribution of the installed PEFT from the package registry (its `tests/` folder is
not in the wheel), imports `testing_common.PeftCommonTester` and `test_custom_models.TestPeftCustomModel` from it, and
drives their generic test methods with Rein configs on tiny ViT and DINOv2 classifiers: every `_test_*` method of
`PeftCommonTester` and every generic (`test_name, model_id, config_cls, config_kwargs`) test method of
`TestPeftCustomModel` is either run on every case or listed in `NOT_APPLICABLE` with the reason (and
`test_every_peft_case_is_run_or_not_applicable` keeps it so when a new PEFT version brings new cases); a method that
does not apply to one configuration is listed in `CASE_NOT_APPLICABLE`, and an assertion of PEFT's that fails by a
property of Rein, not a bug, has an `Allowance` that checks the exact reason. See docs/peft-compatibility.md.
"""

from __future__ import annotations

import inspect
import itertools
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from peft_suite_support import SDIST_CACHE, TinyClassifiers, import_peft_tests, save_tiny_models, tiny_inputs

from rein_peft import ReinConfig

# the cases: (model family, ReinConfig kwargs). Like PEFT's own test cases they start as an identity
# (`zero_mlp_delta_f`); the test methods that need an adapter that changes the output from the start ask for one
# through `set_init_weights_false`, which gives Rein's default initialisation (see the `tester` fixture)
TOKENS = 4
HEAD = ["classifier"]
CASES = {
    "vit-full-rank": ("vit", {"token_length": TOKENS, "zero_mlp_delta_f": True}),
    "vit-lora-dim-head": (
        "vit",
        {"token_length": TOKENS, "lora_dim": 4, "zero_mlp_delta_f": True, "modules_to_save": HEAD},
    ),
    "dinov2-full-rank-head": ("dinov2", {"token_length": TOKENS, "zero_mlp_delta_f": True, "modules_to_save": HEAD}),
    "dinov2-lora-dim": ("dinov2", {"token_length": TOKENS, "lora_dim": 4, "zero_mlp_delta_f": True}),
    # Rein's default initialisation, as users train it
    "vit-lora-dim-rein-init": ("vit", {"token_length": TOKENS, "lora_dim": 4}),
}

MERGING = (
    "Rein cannot be merged into the base weights: its refinement depends on each input (a softmax over token "
    "similarities), so no weight change reproduces it (`merge_and_unload` raises ReinMergeError)."
)
GENERATE = "Needs a generative model (`generate`) and token ids; Rein is for vision encoders."
TEXT_INPUTS = "Needs a text model: it feeds `input_ids` through `get_input_embeddings()`; Rein's models take images."
LORA_ONLY = "Tests an option of LoRA (and IA3 / BOFT) only"

# every case of PEFT's suite that does not apply to Rein, with the reason
NOT_APPLICABLE = {
    # PeftCommonTester
    "_test_merge_layers": MERGING,
    "_test_merge_layers_fp16": MERGING,
    "_test_merge_layers_nan": MERGING,
    "_test_merge_layers_multi": MERGING,
    "_test_merge_layers_is_idempotent": MERGING,
    "_test_safe_merge": MERGING,
    "_test_generate": GENERATE,
    "_test_generate_pos_args": GENERATE,
    "_test_generate_half_prec": GENERATE,
    "_test_generate_with_mixed_adapter_batches_and_beam_search": GENERATE,
    "_test_mixed_adapter_batches": GENERATE + " Rein's mixed-adapter batches: tests/test_mixed_batches.py.",
    "_test_prepare_for_training": TEXT_INPUTS,
    "_test_passing_input_embeds_works": TEXT_INPUTS,
    "_test_training_prompt_learning_tasks": "Tests prompt-learning methods (a prompt encoder); Rein is not one.",
    "_test_weighted_combination_of_adapters": LORA_ONLY + ": `add_weighted_adapter`, a weighted sum of weight deltas.",
    "_test_weighted_combination_of_adapters_lora": LORA_ONLY + ": the LoRA part of the weighted-combination case.",
    "_test_weighted_combination_of_adapters_ia3": LORA_ONLY + ": the IA3 part of the weighted-combination case.",
    "_test_adding_multiple_adapters_with_bias_raises": LORA_ONLY + ": the `bias` option, which Rein does not have.",
    "_test_disable_adapter": "Reads the outputs through `generate` whenever the model has that method, and every "
    "PeftModel has it: written for generative models and Stable Diffusion. Disabling on a classifier is checked by "
    "TestPeftCustomModel's test_disable_adapters and its three context-manager cases, which run here.",
    "_test_lora_conversion": "`convert_to_lora` approximates an additive weight delta `W' = W + dW` by SVD; Rein "
    "changes no weight (its refinement depends on the input), so there is nothing to convert.",
    # TestPeftCustomModel
    "test_merge_layers": MERGING,
    "test_merge_layers_fp16": MERGING,
    "test_merge_layers_is_idempotent": MERGING,
    "test_merge_layers_is_deterministic_in_train_mode": MERGING,
    "test_safe_merge": MERGING,
    "test_disable_adapters_with_merging": MERGING,
    "test_delete_merged_adapter_raises_without_mutation": MERGING,
    "test_delete_merged_adapter_only_rejects_the_merged_one": MERGING,
    "test_disable_adapter_with_bias_warns": LORA_ONLY + ": the warning about LoRA's / BOFT's trained biases.",
    "test_in_features_out_features_exposed": "Checks that a tuner layer wrapping a Linear or Conv exposes its "
    "`in_features` / `out_features`; Rein wraps no layer (hooks refine the encoder layers' outputs).",
}

# the `_test_*` methods run directly, each with the extra arguments of every variant
COMMON_RUNS: dict[str, list[dict]] = {
    "_test_model_attr": [{}],
    "_test_adapter_name": [{}],
    "_test_load_model_low_cpu_mem_usage": [{}],
    "_test_save_pretrained": [{"safe_serialization": True}, {"safe_serialization": False}],
    "_test_save_pretrained_selected_adapters": [{"safe_serialization": True}, {"safe_serialization": False}],
    "_test_save_pretrained_adapter_name_substring": [{}],
    "_test_from_pretrained_config_construction": [{}],
    "_test_load_multiple_adapters": [{}],
    "_test_add_adapter_no_autocast_adapter_dtype": [{"dtype": torch.float16}, {"dtype": torch.bfloat16}],
    "_test_training": [{}],
    "_test_inference_safetensors": [{}],
    "_test_training_layer_indexing": [{}],
    "_test_training_gradient_checkpointing": [{"use_reentrant": True}, {"use_reentrant": False}],
    "_test_peft_model_device_map": [{}],
    "_test_delete_adapter": [{}],
    "_test_delete_inactive_adapter": [{}],
    "_test_delete_unknown_adapter_raises": [{}],
    "_test_unload_adapter": [{}],
    "_test_get_base_model_state_dict": [{}],
}

# TestPeftCustomModel's own generic test methods that are run (those that only call a `_test_*` method of
# PeftCommonTester run through COMMON_RUNS instead), with the extra arguments of every variant
AUTOCAST_VARIANTS = [
    {"dtype": dtype, "autocast_adapter_dtype": autocast, "low_cpu_mem_usage": low_cpu_mem_usage}
    for dtype, autocast, low_cpu_mem_usage in itertools.product(
        (torch.float16, torch.bfloat16, torch.float32), (True, False), (False, True)
    )
]
CUSTOM_RUNS: dict[str, list[dict]] = {
    "test_save_load_roundtrip_direct_injection": [{}],
    "test_forward_output_finite": [{}],
    "test_forward_float16": [{}],
    "test_forward_bfloat16": [{}],
    "test_forward_float16_no_autocast": [{}],
    "test_forward_bfloat16_no_autocast": [{}],
    "test_adapter_dtype_autocast": AUTOCAST_VARIANTS,
    "test_only_params_are_updated": [{}],
    "test_save_load_roundtrip": [{}],
    "test_parameters_after_loading_model": [{}],
    "test_disable_adapters": [{}],
    "test_active_adapter": [{}],
    "test_disable_adapters_exiting_context_restores_previous_state": [{}],
    "test_disable_adapter_is_reentrant": [{}],
    "test_disable_adapters_exiting_context_irregular_state": [{}],
    "test_delete_adapter_properly_cleans_up_after_itself": [{}],
}

# cases that end where they reach merging: everything before it (forwards in float16 / bfloat16) is what applies
STOPS_AT_MERGING = {
    "test_forward_float16",
    "test_forward_bfloat16",
    "test_forward_float16_no_autocast",
    "test_forward_bfloat16_no_autocast",
}
# the arguments every generic test method of PEFT's suite starts with
GENERIC_ARGUMENTS = ["self", "test_name", "model_id", "config_cls", "config_kwargs"]


class MergingReached(Exception):
    """Raised where a PEFT test method would go on to merge a Rein adapter."""


@dataclass(frozen=True)
class Allowance:
    """A failure of one of PEFT's assertions that is a property of Rein, not a bug: the case passes when PEFT's
    assertion `line` fails and `check`, given the local variables of PEFT's test method at that point, confirms the
    exact reason (and completes the test method's remaining checks) by not raising."""

    line: str
    check: Callable[[dict], None]
    reason: str


def _same_tables_fewer_rows(frame: dict) -> None:
    # PEFT counts the adapter's tensors with layers_to_transform=[0] and without: one [L, ...] table per kind, both
    assert frame["nb_trainable"] == frame["nb_trainable_all"]


# the adapter tensors of a ViT classifier whose updates come only through the first layer's refinement, damped by
# Rein's initial scale of 1e-3 (see VIT_CLS_ONLY)
SLOW_ON_VIT = ("rein_tokens_a", "rein_tokens_b", "rein_token2feat.default.weight")
UPDATE_TOLERANCE = 1e-4  # test_only_params_are_updated's


def _only_slow_tensors_unchanged(frame: dict) -> None:
    # redo test_only_params_are_updated's check on all tensors (it stopped at the first unchanged one)
    before, after = frame["params_before"], frame["params_after"]
    tolerance = {"atol": UPDATE_TOLERANCE, "rtol": UPDATE_TOLERANCE}
    unchanged = {name for name in before if torch.allclose(before[name], after[name], **tolerance)}
    trained = {name for name, param in after.items() if ".rein_" in name and param.requires_grad}
    slow = {name for name in trained if any(stem in name for stem in SLOW_ON_VIT)}
    assert unchanged & trained <= slow, sorted(unchanged & trained - slow)
    assert all(not torch.equal(before[name], after[name]) for name in slow)  # they do train, slowly
    assert set(before) - trained <= unchanged  # the frozen base model did not move


VIT_CLS_ONLY = (
    "Rein's default initialisation on a ViT classifier: ViTForImageClassification reads only the CLS token, which "
    "Rein passes through untouched, so the last layer's refinement never reaches the loss (its token rows get a "
    "gradient of exactly 0) and the first layer's reaches it only through the next layer's attention to CLS, damped "
    "by the initial scale of 1e-3. After PEFT's 3 SGD steps (lr 0.5) the low-rank tokens and token2feat's weight have "
    "moved by about 2e-5, under the test's 1e-4 tolerance; scale and delta_f moved by 1e-2 and 2e-4. DINOv2's "
    "classifier also averages the patch tokens, and there every tensor moves by 2.9e-3 or more."
)
HEAD_GRADIENT = (
    "Expects gradients on the tuner's own tensors only: with modules_to_save the head's trained copy has one too, "
    "which is what modules_to_save is for (PEFT runs this case on models without modules_to_save; _test_training "
    "checks the head's gradient)."
)
HEAD_CASES = [case for case, (_, kwargs) in CASES.items() if "modules_to_save" in kwargs]
# cases of a test method that do not apply to one configuration, with the reason
CASE_NOT_APPLICABLE = {
    **{("_test_training_layer_indexing", case): HEAD_GRADIENT for case in HEAD_CASES},
    **{("_test_training_gradient_checkpointing", case): HEAD_GRADIENT for case in HEAD_CASES},
    **{
        ("test_active_adapter", case): "PEFT does not support several active adapters with modules_to_save."
        for case in HEAD_CASES
    },
    ("test_disable_adapters", "vit-lora-dim-rein-init"): "Checks first that a new adapter leaves the output "
    "unchanged (an identity at init); Rein's default initialisation does not (zero_mlp_delta_f=True does).",
}
ALLOWANCES = {
    **{
        ("_test_training_layer_indexing", case): Allowance(
            "assert nb_trainable < nb_trainable_all",
            _same_tables_fewer_rows,
            "PEFT counts the adapter's tensors and expects fewer with layers_to_transform=[0]; Rein keeps one "
            "[layers, ...] table per kind for all its layers, so it has as many tensors, with fewer rows.",
        )
        for case in CASES
        if case not in HEAD_CASES
    },
    ("test_only_params_are_updated", "vit-lora-dim-rein-init"): Allowance(
        "assert not torch.allclose(param_before, param_after, atol=tol, rtol=tol)",
        _only_slow_tensors_unchanged,
        VIT_CLS_ONLY,
    ),
}


def _variant_id(variant: dict) -> str:
    return ",".join(f"{key}={str(value).removeprefix('torch.')}" for key, value in variant.items()) or "default"


def _params(runs: dict[str, list[dict]]) -> list:
    return [
        pytest.param(method, variant, case, id=f"{method}-{_variant_id(variant)}-{case}")
        for method, variants in runs.items()
        for variant in variants
        for case in CASES
        if (method, case) not in CASE_NOT_APPLICABLE
    ]


@pytest.fixture(scope="session")
def peft_tests(tmp_path_factory) -> tuple:
    """PEFT's `testing_common` and `test_custom_models` modules, from the sdist of the installed PEFT version."""
    try:
        return import_peft_tests(SDIST_CACHE, tmp_path_factory.mktemp("peft-tests"))
    except RuntimeError as error:
        pytest.fail(f"PEFT's test suite is unavailable: {error}", pytrace=False)


@pytest.fixture(scope="session")
def model_ids(tmp_path_factory) -> dict[str, str]:
    return save_tiny_models(tmp_path_factory.mktemp("tiny-classifiers"))


@pytest.fixture
def tester(peft_tests, monkeypatch):
    """An instance of PEFT's custom-model tester (and so of `PeftCommonTester`) that loads the tiny classifiers, with
    Rein's branches in the two helpers where PEFT's suite lists its methods one by one."""
    testing_common, custom_models = peft_tests
    set_init_weights_false = custom_models.set_init_weights_false
    skip_if_merging_not_supported = testing_common._skip_if_merging_not_supported

    def rein_set_init_weights_false(config_cls: type, kwargs: dict) -> dict:
        # Rein's default initialisation (a learnable scale of 1e-3 on a random delta_f) changes the output from the
        # start; zero_mlp_delta_f=True is its identity start
        if issubclass(config_cls, ReinConfig):
            return {**kwargs, "zero_mlp_delta_f": False}
        return set_init_weights_false(config_cls, kwargs)

    def rein_skip_if_merging_not_supported(model_id: str, config_cls: type, config_kwargs: dict) -> None:
        if issubclass(config_cls, ReinConfig):
            raise MergingReached
        skip_if_merging_not_supported(model_id, config_cls, config_kwargs)

    monkeypatch.setattr(custom_models, "set_init_weights_false", rein_set_init_weights_false)
    for module in (testing_common, custom_models):
        monkeypatch.setattr(module, "_skip_if_merging_not_supported", rein_skip_if_merging_not_supported)
    tester_class = type(
        "ReinPeftTester",
        (custom_models.TestPeftCustomModel,),
        {"transformers_class": TinyClassifiers, "prepare_inputs_for_testing": lambda self: tiny_inputs()},
    )
    return tester_class()


def _run(method_name: str, case: str, method: Callable, **kwargs) -> None:
    """Run one case of PEFT's suite, with its allowance if it has one."""
    allowance = ALLOWANCES.get((method_name, case))
    try:
        method(**kwargs)
    except MergingReached:
        if method_name not in STOPS_AT_MERGING:
            raise
    except AssertionError as error:
        if allowance is None:
            raise
        failed = traceback.extract_tb(error.__traceback__)[-1]
        if failed.line != allowance.line:
            raise
        frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
        allowance.check(frames[-1].f_locals)


@pytest.mark.parametrize(("method", "variant", "case"), _params(COMMON_RUNS))
def test_peft_common_tester(tester, model_ids, method, variant, case):
    family, config_kwargs = CASES[case]
    # PEFT's drivers of these methods ask for an adapter that changes the output from the start
    config_kwargs = {**config_kwargs, "zero_mlp_delta_f": False}
    arguments = {"model_id": model_ids[family], "config_cls": ReinConfig, "config_kwargs": config_kwargs}
    _run(method, case, getattr(tester, method), **arguments, **variant)


@pytest.mark.parametrize(("method", "variant", "case"), _params(CUSTOM_RUNS))
def test_peft_custom_model_tester(tester, model_ids, tmp_path, method, variant, case):
    family, config_kwargs = CASES[case]
    bound = getattr(tester, method)
    arguments = {"test_name": case, "model_id": model_ids[family], "config_cls": ReinConfig}
    arguments |= {"config_kwargs": dict(config_kwargs), **variant}
    if "tmp_path" in inspect.signature(bound).parameters:
        arguments["tmp_path"] = tmp_path
    _run(method, case, bound, **arguments)


def _generic_methods(tester_class: type) -> set[str]:
    """The test methods of `tester_class` (defined there) that take a case (`test_name, model_id, config_cls,
    config_kwargs`)."""
    return {
        name
        for name, function in vars(tester_class).items()
        if name.startswith("test_") and list(inspect.signature(function).parameters)[:5] == GENERIC_ARGUMENTS
    }


def _wrapped_common_methods(function: Callable) -> set[str]:
    """The `_test_*` methods of PeftCommonTester that a test method calls."""
    return set(re.findall(r"self\.(_test_\w+)\(", inspect.getsource(function)))


def test_every_peft_case_is_run_or_not_applicable(peft_tests):
    testing_common, custom_models = peft_tests
    common = {name for name in vars(testing_common.PeftCommonTester) if name.startswith("_test_")}
    assert not set(COMMON_RUNS) & set(NOT_APPLICABLE)
    unlisted = common - set(COMMON_RUNS) - set(NOT_APPLICABLE)
    assert not unlisted, f"PeftCommonTester cases neither run nor listed in NOT_APPLICABLE: {sorted(unlisted)}"

    custom_class = custom_models.TestPeftCustomModel
    custom = _generic_methods(custom_class)
    # a test method that hands its case to `_test_*` methods is covered by those: run, or not applicable
    wrappers = {
        name
        for name in custom
        if (called := _wrapped_common_methods(getattr(custom_class, name)))
        and called <= set(COMMON_RUNS) | set(NOT_APPLICABLE)
    }
    assert not set(CUSTOM_RUNS) & (set(NOT_APPLICABLE) | wrappers)
    unlisted = custom - wrappers - set(CUSTOM_RUNS) - set(NOT_APPLICABLE)
    assert not unlisted, f"TestPeftCustomModel cases neither run nor listed in NOT_APPLICABLE: {sorted(unlisted)}"
    stale = set(NOT_APPLICABLE) - common - custom
    assert not stale, f"NOT_APPLICABLE lists cases this PEFT version does not have: {sorted(stale)}"
    assert STOPS_AT_MERGING <= set(CUSTOM_RUNS)
    # the per-case exclusions and allowances name cases that exist, of methods that are run
    runs = set(COMMON_RUNS) | set(CUSTOM_RUNS)
    for method, case in [*CASE_NOT_APPLICABLE, *ALLOWANCES]:
        assert method in runs and case in CASES, (method, case)
    assert not set(CASE_NOT_APPLICABLE) & set(ALLOWANCES)
