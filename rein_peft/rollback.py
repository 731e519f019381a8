"""A failed attempt to add or load an adapter leaves the model exactly as it was.

Adding an adapter changes the user's model in many places before anything can fail: Rein's hooks and `ReinLayer`,
`modules_to_save` wrappers in place of the task head, `requires_grad` of every base parameter, transformers'
`peft_config` and `_hf_peft_config_loaded`, an entry in `hf_device_map`. A load then fails only when the weights are
read (a backbone of another width, a config that disagrees with its file). `unchanged_on_failure` records the state
of every module before such a call and puts it back if the call raises; `register_rollback` wraps the entry points
of PEFT and transformers that add or load adapters with it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from peft import PeftModel
from torch import nn
from transformers.integrations.peft import PeftAdapterMixin

# marks an entry point already wrapped, so that registering twice changes nothing
WRAPPED_MARK = "restores_model_on_failure"


def _module_state(module: nn.Module) -> dict[str, Any]:
    # the attribute dict, and one level below it the dicts that hold submodules, parameters, buffers and hooks
    # (`_modules`, `_parameters`, `_forward_hooks`, ...), which are changed in place
    return {name: dict(value) if isinstance(value, dict) else value for name, value in vars(module).items()}


@contextmanager
def unchanged_on_failure(*modules: nn.Module) -> Iterator[None]:
    """If the body raises, put every module below `modules` back as it was: its submodules, parameters, buffers,
    hooks and other attributes, and each parameter's `requires_grad`. Tensor values are not copied: nothing that
    adds or loads an adapter writes into the base model's tensors."""
    states = {id(module): (module, _module_state(module)) for root in modules for module in root.modules()}
    requires_grad = [(param, param.requires_grad) for root in modules for param in root.parameters()]
    try:
        yield
    except BaseException:
        for module, state in states.values():
            vars(module).clear()
            vars(module).update(state)
        for param, flag in requires_grad:
            param.requires_grad_(flag)
        raise


def _restoring(method: Callable, model_of: Callable[[tuple, dict], list[nn.Module]]) -> Callable:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with unchanged_on_failure(*model_of(args, kwargs)):
            return method(*args, **kwargs)

    setattr(wrapper, WRAPPED_MARK, True)
    return wrapper


def _self(args: tuple, kwargs: dict) -> list[nn.Module]:
    return [args[0]]


def _base_model_argument(args: tuple, kwargs: dict) -> list[nn.Module]:
    # PeftModel.from_pretrained(cls, model, model_id, ...): the base model follows the class
    model = args[1] if len(args) > 1 else kwargs.get("model")
    return [model] if isinstance(model, nn.Module) else []


def register_rollback() -> None:
    """Make a failed `PeftModel.from_pretrained`, `PeftModel.load_adapter` / `add_adapter` and transformers'
    `load_adapter` / `add_adapter` leave the model as it was (idempotent)."""
    entry_points = [
        (PeftAdapterMixin, "load_adapter", _self),
        (PeftAdapterMixin, "add_adapter", _self),
        (PeftModel, "load_adapter", _self),
        (PeftModel, "add_adapter", _self),
    ]
    for owner, name, model_of in entry_points:
        method = getattr(owner, name)
        if not getattr(method, WRAPPED_MARK, False):
            setattr(owner, name, _restoring(method, model_of))
    from_pretrained = PeftModel.__dict__["from_pretrained"].__func__
    if not getattr(from_pretrained, WRAPPED_MARK, False):
        PeftModel.from_pretrained = classmethod(_restoring(from_pretrained, _base_model_argument))
