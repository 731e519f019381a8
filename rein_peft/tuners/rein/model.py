"""`ReinModel`: the PEFT tuner that attaches Rein to a vision transformer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import (
    BaseTuner,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .config import REIN_PREFIX, ReinConfig
from .discovery import CHANNELS_FIRST, ReinStage, ReinTargets, discover, execution_device
from .layer import (
    BASE_ADAPTER_NAME,
    QUERY_POSITION,
    ReinHook,
    ReinImageSizeCheck,
    ReinLayer,
    ReinLinkedQueries,
    ReinQueryHook,
    ReinSettings,
    summed_queries,
)
from .utils import refuse_quantized_modules_to_save, unchanged_on_failure

# attribute under which the ReinLayer hangs on the module that holds the encoder layers; it must not start with
# the method prefix "rein_", which marks the adapter's own tensors
REIN_LAYER_ATTRIBUTE = "rein"


class ReinMergeError(ValueError):
    """Rein cannot be merged into the base weights."""


class ReinStateDictError(ValueError):
    """An adapter file does not fit the model it is loaded into."""


# the axes of Rein's tensors whose length a config field sets (the others are the backbone's: layers, hidden width);
# keyed by the tensor's stem without a stage index
CONFIG_AXES = {
    "rein_tokens": {1: "token_length"},  # [L, M, C]
    "rein_tokens_a": {1: "token_length", 2: "lora_dim"},  # [L, M, r]
    "rein_tokens_b": {1: "lora_dim"},  # [L, r, C]
    "rein_transform.weight": {0: "query_dims"},  # [Q, C]
    "rein_transform.bias": {0: "query_dims"},
    "rein_merge.weight": {0: "query_dims", 1: "query_dims"},  # [Q, 3Q]
    "rein_merge.bias": {0: "query_dims"},
    "rein_query_feat.weight": {0: "query_dims", 1: "query_dims"},  # [Q, Q]
    "rein_query_feat.bias": {0: "query_dims"},
}


def _config_fields_of_mismatch(stem: str, saved: list[int], expected: list[int]) -> list[str]:
    """The config fields that explain a shape mismatch when every differing axis is set by the config (the file's
    config disagrees with its weights); empty when a backbone axis differs too, or the ranks differ."""
    axes = CONFIG_AXES.get(stem.split(".", 1)[1] if stem.split(".", 1)[0].isdigit() else stem, {})
    if len(saved) != len(expected):
        return []
    differing = [axis for axis, (have, need) in enumerate(zip(saved, expected, strict=True)) if have != need]
    if not all(axis in axes for axis in differing):
        return []
    return sorted({axes[axis] for axis in differing})


def _base_model_class(model: nn.Module) -> str:
    """The class name of the model an adapter is loaded into, below PEFT's wrappers (`PeftModel`, `ReinModel`)."""
    while isinstance(model, (PeftModel, BaseTuner)):
        model = model.base_model if isinstance(model, PeftModel) else model.model
    return type(model).__name__


def _tensor_stem(key: str) -> str | None:
    """The part of a state-dict key from its first `rein_*` component on, e.g. `rein_token2feat.weight`; on a staged
    backbone, whose ReinLayers hang on the stages of a list, with the stage's index in front: `2.rein_tokens`."""
    parts = key.split(".")
    for index, part in enumerate(parts):
        if part.startswith(ReinModel.prefix):
            stage = parts[index - 2] if index >= 2 and parts[index - 1] == REIN_LAYER_ATTRIBUTE else ""
            return ".".join(([stage] if stage.isdigit() else []) + parts[index:])
    return None


def _pass_adapter_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]) -> tuple:
    """Forward pre-hook that hands a mixed batch's `adapter_names` to a `modules_to_save` wrapper."""
    return args, {**kwargs, "adapter_names": adapter_names}


def _floating_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype an encoder layer computes in: that of its floating-point parameters (a quantized layer's norms stay
    floating point)."""
    return next(param.dtype for param in layer.parameters() if param.is_floating_point())


def _keep_out_of_disk_offload(model: nn.Module, rein_layer_name: str, device: torch.device) -> None:
    """When accelerate's `device_map` offloads the module that holds the encoder layers to disk as one block, give
    the `ReinLayer` inside it an entry of its own on its device: loaders that follow the map (transformers'
    `load_adapter`) would otherwise send the adapter's weights to the offload files instead of into Rein."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return
    holders = [name for name in device_map if name == "" or rein_layer_name.startswith(f"{name}.")]
    if holders and device_map[max(holders, key=len)] == "disk":
        device_map[rein_layer_name] = device.index if device.type == "cuda" else device.type  # accelerate's notation


def find_rein_layers(model: nn.Module) -> list[ReinLayer]:
    """Every `ReinLayer` attached to `model`."""
    return [module for module in model.modules() if isinstance(module, ReinLayer)]


def get_queries(model: nn.Module, adapter_name: str = "default") -> torch.Tensor:
    """The `[M, Q]` object queries that an adapter made with `link_token_to_query=True` links from its tokens (on a
    staged backbone, the sum of every stage's).

    Works on a `PeftModel` and on a model that got the adapter from transformers' `add_adapter` / `load_adapter`.
    """
    rein_layers = [layer for layer in find_rein_layers(model) if adapter_name in layer.rein_settings]
    if not rein_layers:
        raise ValueError(f"No Rein adapter named '{adapter_name}' in {type(model).__name__}.")
    return summed_queries(rein_layers, adapter_name)


REIN_HOOK_TYPES = (ReinHook, ReinQueryHook, ReinImageSizeCheck)


def _refuse_unknown_modules_to_save(model: nn.Module, modules_to_save: list[str] | None) -> None:
    """PEFT silently skips `modules_to_save` that name no module, so a typo leaves the task head untrained and
    unsaved: refuse a list of which no entry names a module (PEFT's `strict_module_check` rule; PEFT's task models
    add both "classifier" and "score", of which a model has one). An entry matches the modules whose names end with
    it, as in PEFT."""
    if not modules_to_save:
        return
    names = [name for name, _ in model.named_modules() if name]
    if not any(name.endswith(entry) for entry in modules_to_save for name in names):
        top_level = [name for name, _ in model.named_children()]
        raise ValueError(
            f"modules_to_save={modules_to_save}: {type(model).__name__} has no module of these names. Use names "
            f"from `model.named_modules()`; its top-level modules are {top_level}."
        )


def _refuse_other_label_count(model: nn.Module, peft_config: ReinConfig) -> None:
    # an adapter's saved head fits the labels it was trained for (recorded in `id2label`); PEFT would only report
    # the head's tensor shapes once the weights are read
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if peft_config.id2label is None or num_labels is None or len(peft_config.id2label) == num_labels:
        return
    count = len(peft_config.id2label)
    raise ReinStateDictError(
        f"This Rein adapter's head (modules_to_save={peft_config.modules_to_save}) was trained for {count} labels "
        f"(id2label in its adapter_config.json), but this {type(model).__name__} has {num_labels} "
        f"(config.num_labels). Build the base model with them: from_pretrained(..., num_labels={count}), or load "
        "the adapter folder alone with an auto class (AutoModelForImageClassification, AutoPeftModel) or a "
        "pipeline, which use the adapter's labels."
    )


def _has_hook(module: nn.Module, hook_type: type) -> bool:
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return any(isinstance(hook, hook_type) for hook in hooks)


def remove_rein(model: nn.Module) -> None:
    """Detach every Rein hook, linked query table and `ReinLayer` from `model`, leaving the base model as it was."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for hook_id, hook in list(hooks.items()):
                if isinstance(hook, REIN_HOOK_TYPES):
                    del hooks[hook_id]
                    module._forward_hooks_with_kwargs.pop(hook_id, None)
                    module._forward_hooks_always_called.pop(hook_id, None)
                    module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    for name, module in list(model.named_modules()):
        if isinstance(module, ReinLinkedQueries):
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, module.base_layer)
    device_map = getattr(model, "hf_device_map", None) or {}
    for name, module in list(model.named_modules()):
        if isinstance(getattr(module, REIN_LAYER_ATTRIBUTE, None), ReinLayer):
            delattr(module, REIN_LAYER_ATTRIBUTE)
            device_map.pop(f"{name}.{REIN_LAYER_ATTRIBUTE}".lstrip("."), None)  # see _keep_out_of_disk_offload


class ReinModel(BaseTuner):
    """Rein ("Stronger, Fewer, & Superior", CVPR 2024) as a PEFT tuner. Create it with `peft.get_peft_model`.

    The encoder layers of the base model are found automatically (see `.discovery`). Each gets a forward
    hook that refines its output, so `output_hidden_states=True`, the final norm, task heads and gradient
    checkpointing all see the refined features. All adapter tensors live in one `ReinLayer` inside the model.

    Example:
        ```py
        >>> import rein_peft
        >>> from peft import get_peft_model
        >>> from transformers import Dinov2ForImageClassification
        >>> model = Dinov2ForImageClassification.from_pretrained("facebook/dinov2-small", num_labels=10)
        >>> model = get_peft_model(model, rein_peft.ReinConfig(lora_dim=16, modules_to_save=["classifier"]))
        ```
    """

    prefix: str = REIN_PREFIX
    tuner_layer_cls = ReinLayer
    target_module_mapping: dict[str, list[str]] = {}

    # --- injection -------------------------------------------------------------------------------------------------

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """PEFT's injection; if it fails (a model Rein cannot wrap, a config that does not fit), `model` is left
        exactly as it was."""
        with unchanged_on_failure(model):
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )

    def _prepare_adapter_config(self, peft_config: ReinConfig, model_config: dict) -> ReinConfig:
        # target_modules=None means "the vision encoder's layers", resolved from the model in _prepare_model.
        # A saved task head fits the labels it was trained for: record them, so that an adapter folder loaded alone
        # can build its base model with them (rein_peft.auto_loading)
        if peft_config.id2label is None and peft_config.modules_to_save and model_config.get("id2label"):
            peft_config.id2label = {str(index): label for index, label in model_config["id2label"].items()}
        return peft_config

    def _prepare_model(self, peft_config: ReinConfig, model: nn.Module) -> None:
        _refuse_other_label_count(model, peft_config)
        _refuse_unknown_modules_to_save(model, peft_config.modules_to_save)
        refuse_quantized_modules_to_save(model, peft_config.modules_to_save)
        # read by _check_target_module_exists and _create_and_replace during this injection only
        self._injection: tuple[nn.Module, ReinTargets] = (model, discover(model, peft_config))
        if peft_config.auto_mapping is None:
            # the class AutoPeftModel builds; PeftModel.save_pretrained writes the same, transformers' save_pretrained
            # writes the config as it is
            model_class = type(model)
            peft_config.auto_mapping = {
                "base_model_class": model_class.__name__,
                "parent_library": model_class.__module__,
            }

    def _check_target_module_exists(self, peft_config: ReinConfig, key: str) -> bool:
        _, targets = self._injection
        return key in targets.layer_names

    def _create_and_replace(
        self,
        peft_config: ReinConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        model, targets = self._injection
        stage = next(stage for stage in targets.stages if current_key in stage.layer_names)
        # attached here, not in _prepare_model: PEFT decides whether this is the first adapter (and so freezes the
        # base model) by looking for tuner layers before it creates any
        holder = model.get_submodule(stage.holder_name)
        rein_layer = getattr(holder, REIN_LAYER_ATTRIBUTE, None)
        if rein_layer is None:
            rein_layer = ReinLayer(device=execution_device(target))
            holder.add_module(REIN_LAYER_ATTRIBUTE, rein_layer)
            rein_layer_name = f"{stage.holder_name}.{REIN_LAYER_ATTRIBUTE}".lstrip(".")
            _keep_out_of_disk_offload(model, rein_layer_name, rein_layer.device_anchor.device)
        if adapter_name not in rein_layer.rein_settings:
            settings = ReinSettings(
                hidden_size=stage.hidden_size,
                num_prefix_tokens=targets.num_prefix_tokens,
                batch_first=targets.batch_first,
                use_softmax=peft_config.use_softmax,
                refine_query_tokens=peft_config.refine_query_tokens,
                layer_rows={name: row for row, name in enumerate(stage.layer_names)},
                channels_first=stage.layout == CHANNELS_FIRST,
            )
            rein_layer.update_layer(
                adapter_name,
                peft_config,
                settings,
                targets.patch_size,
                device=rein_layer.device_anchor.device,
                # one map to the decoder's content queries, applied to the stages' summed queries: on the first stage
                content_queries=QUERY_POSITION in targets.query_tables.values() and stage is targets.stages[0],
            )
            self._attach_to_model(model, targets, stage)
        if not _has_hook(target, ReinHook):
            # prepend: transformers records hidden states with forward hooks of its own, which must see the refinement
            target.register_forward_hook(ReinHook(rein_layer, current_key), prepend=True)

    @staticmethod
    def _attach_to_model(model: nn.Module, targets: ReinTargets, stage: ReinStage) -> None:
        """Install what acts outside the encoder layers: the image-size check on the patch embedding and, for query
        linking, the linked query tables and the hooks on the model that fill them for each forward (once, with the
        first stage)."""
        if stage is not targets.stages[0]:
            return
        if targets.patch_embedding_name is not None:
            patch_embedding = model.get_submodule(targets.patch_embedding_name)
            if not _has_hook(patch_embedding, ReinImageSizeCheck):
                patch_embedding.register_forward_pre_hook(ReinImageSizeCheck(targets.patch_size))
        for name, role in targets.query_tables.items():
            table = model.get_submodule(name)
            if not isinstance(table, ReinLinkedQueries):
                parent_name, _, child_name = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child_name, ReinLinkedQueries(table, role))
        if targets.query_tables and not _has_hook(model, ReinQueryHook):
            model.register_forward_pre_hook(ReinQueryHook(link=True))
            model.register_forward_hook(ReinQueryHook(link=False), always_call=True)

    # --- training mode ---------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> ReinModel:
        """Set train mode. As in the official Rein code the frozen base model stays in eval mode (dropout and
        drop-path off) while the adapter and `modules_to_save` train, unless the active adapter's config sets
        `frozen_modules_follow_train=True`."""
        super().train(mode)
        configs = [self.peft_config[name] for name in self.active_adapters if name in self.peft_config]
        if not mode or any(config.frozen_modules_follow_train for config in configs):
            return self
        for module in self.model.modules():
            # transformers only checkpoints layers that are in training mode: keep that flag on them
            module.training = bool(getattr(module, "gradient_checkpointing", False))
        for module in self.model.modules():
            if isinstance(module, (ReinLayer, AuxiliaryTrainingWrapper)):
                module.train(True)
        return self

    # --- adapter dtype ---------------------------------------------------------------------------------------------

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's contract for `autocast_adapter_dtype` (of `get_peft_model`, `add_adapter`, `from_pretrained` and
        `load_adapter`): `True` (the default) upcasts float16 / bfloat16 adapters to float32; `False` leaves the
        adapter in the base model's dtype, a memory-saving choice. Rein's tensors are made in float32 rather than in
        the dtype of a wrapped layer, so with `False` they are cast here to the dtype of the layers they refine."""
        if autocast_adapter_dtype:
            super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=True)
            return
        for rein_layer in find_rein_layers(self.model):
            settings = rein_layer.rein_settings.get(adapter_name)
            if settings is not None:
                layer = self.model.get_submodule(next(iter(settings.layer_rows)))
                rein_layer.move_adapter(adapter_name, dtype=_floating_dtype(layer))

    # --- mixed-adapter batches ------------------------------------------------------------------------------------

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Called by `PeftModel.forward` around each forward. With `adapter_names=[...]`, one adapter name per sample
        (`"__base__"` for the base model alone), each sample is refined by its own adapter and goes through its own
        adapter's copy of the `modules_to_save`, as with LoRA. Inference only."""
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("`adapter_names` (a mixed-adapter batch) is for inference: call `model.eval()` first.")
        if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
            raise TypeError(f"`adapter_names` must be a list of adapter names, one per sample, got {adapter_names!r}.")
        rein_layers = find_rein_layers(self.model)
        known = {name for layer in rein_layers for name in layer.rein_settings}
        unknown = sorted(set(adapter_names) - known - {BASE_ADAPTER_NAME})
        if unknown:
            raise ValueError(
                f"`adapter_names` names adapters this model does not have: {unknown}. It has {sorted(known)}, and "
                f"'{BASE_ADAPTER_NAME}' runs a sample without any adapter."
            )
        handles = [
            module.register_forward_pre_hook(
                partial(_pass_adapter_names, adapter_names=adapter_names), with_kwargs=True
            )
            for module in self.model.modules()
            if isinstance(module, AuxiliaryTrainingWrapper)
        ]
        for rein_layer in rein_layers:
            rein_layer.set_sample_adapters(list(adapter_names))
        try:
            yield
        finally:
            for rein_layer in rein_layers:
                rein_layer.set_sample_adapters(None)
            for handle in handles:
                handle.remove()

    # --- merging, unloading, deleting ------------------------------------------------------------------------------

    def _check_merge_allowed(self) -> None:
        raise ReinMergeError(
            "Rein cannot be merged into the base weights: its refinement depends on each input's features "
            "(a softmax over token similarities), so no weight change reproduces it. Keep the PeftModel for "
            "inference, or call `unload()` to get the unchanged base model back."
        )

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        remove_rein(self.model)
        return super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter; deleting the last one also removes Rein's hooks from the model."""
        super().delete_adapter(adapter_name)
        if not any(layer.rein_settings for layer in find_rein_layers(self.model)):
            remove_rein(self.model)

    # --- queries ---------------------------------------------------------------------------------------------------

    def get_queries(self, adapter_name: str | None = None) -> torch.Tensor:
        """The `[M, Q]` object queries linked from the tokens of `adapter_name` (default: the active adapter).

        Needs `ReinConfig(link_token_to_query=True)`. Reachable from the `PeftModel` as `peft_model.get_queries()`.
        """
        return get_queries(self.model, adapter_name or self.active_adapters[0])

    # --- loading ---------------------------------------------------------------------------------------------------

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: ReinConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Map saved keys onto this model by their `rein_*` stem, so that an adapter trained on a bare backbone
        loads into its task-head model and back; refuse tensors whose shapes do not fit, and missing tensors."""
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        model_tensors = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
        stem_to_model_key = {
            _tensor_stem(cls._remove_adapter_name_from_key(key, adapter_name)): key for key in model_tensors
        }
        remapped, loaded_stems, backbone_mismatches, config_mismatches = {}, set(), [], []
        for key, tensor in state_dict.items():
            stem = _tensor_stem(key)
            if stem is None:  # modules_to_save and other non-Rein entries
                remapped[key] = tensor
                continue
            if stem not in stem_to_model_key:
                raise ReinStateDictError(
                    f"The adapter file holds '{key}', which adapter '{adapter_name}' of this model does not have "
                    f"(it has {sorted(stem_to_model_key)}): the adapter's config (adapter_config.json) disagrees with "
                    "its weights, or the file was saved with a different ReinConfig."
                )
            model_key = stem_to_model_key[stem]
            expected = list(model_tensors[model_key].shape)
            if list(tensor.shape) != expected:
                config_fields = _config_fields_of_mismatch(stem, list(tensor.shape), expected)
                if config_fields:
                    settings = ", ".join(f"{name}={getattr(config, name)}" for name in config_fields)
                    config_mismatches.append(
                        f"'{stem}' has shape {list(tensor.shape)}, but the config's {settings} needs {expected}"
                    )
                else:
                    backbone_mismatches.append(
                        f"'{stem}' has shape {list(tensor.shape)}, but this model needs {expected}"
                    )
            remapped[model_key] = tensor
            loaded_stems.add(stem)
        problems = []
        if config_mismatches:
            problems.append(
                "The adapter's config disagrees with its weights: "
                + "; ".join(config_mismatches)
                + ". Fix these fields of its adapter_config.json (or the ReinConfig given) to match the weights, or "
                "save the adapter again."
            )
        if backbone_mismatches:
            problems.append(
                f"The adapter was made for a different backbone than {_base_model_class(model)}: "
                + "; ".join(backbone_mismatches)
                + ". Token tables are [layers, tokens, hidden] and the MLPs [hidden, hidden] (on a staged backbone, "
                "'2.rein_tokens' is stage 2's, [blocks, tokens, stage width]): load the adapter into the architecture "
                "it was trained on."
            )
        if problems:
            raise ReinStateDictError(" ".join(problems))
        missing = sorted(set(stem_to_model_key) - loaded_stems)
        if missing:
            raise ReinStateDictError(
                f"The adapter file lacks {missing}, which adapter '{adapter_name}' of {_base_model_class(model)} has: "
                "the adapter's config (adapter_config.json) asks for tensors its weights do not hold (e.g. "
                "link_token_to_query or lora_dim set differently from when it was saved), or, for a stage index "
                "('2.rein_tokens'), the backbone has other stages than the one it was trained on."
            )
        return remapped
