"""A failed attempt to add or load a Rein adapter leaves the model exactly as it was.

Adding an adapter changes the user's model in many places before anything can fail: Rein's hooks and `ReinLayer`,
`modules_to_save` wrappers in place of the task head, `requires_grad` of every base parameter, transformers'
`peft_config` and `_hf_peft_config_loaded`, an entry in `hf_device_map`. A load then fails only when the weights are
read (a backbone of another width, a config that disagrees with its file). The tuner's `unchanged_on_failure` records
the state of every module before such a call and puts it back if the call raises.

PEFT has no hook through which a method of its own could undo a failed load (`peft.utils.register_peft_method`
registers a config, a tuner and a prefix, and only for members of PEFT's closed `PeftType` enum), and the injection
that `ReinModel` guards itself is only the first half of a load. So `register_rollback` wraps the entry points of
PEFT and transformers that add or load adapters, and each wrapper acts only when the adapter is Rein's: the config
passed says so, or the `adapter_config.json` the call is about to read does. For LoRA and every other method the
wrapper calls PEFT's or transformers' method and nothing else, so importing rein_peft changes nothing for them.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from huggingface_hub import hf_hub_download
from peft import PeftModel
from peft.utils import CONFIG_NAME
from torch import nn
from transformers.integrations.peft import PeftAdapterMixin

from ..tuners.rein.config import ReinPeftType
from ..tuners.rein.utils import unchanged_on_failure

# marks an entry point already wrapped, so that registering twice changes nothing
WRAPPED_MARK = "restores_model_on_failure"
# the keyword arguments of the entry points that say where on the Hub an adapter's files are
HUB_DOWNLOAD_PARAMETERS = frozenset(inspect.signature(hf_hub_download).parameters) - {"repo_id", "filename"}


def is_rein_config(config: Any) -> bool:
    """Whether `config` (a `PeftConfig`, or the dict of one that transformers' `load_adapter` also takes) is Rein's."""
    peft_type = config.get("peft_type") if isinstance(config, dict) else getattr(config, "peft_type", None)
    return peft_type == ReinPeftType.REIN


def saved_adapter_is_rein(source: str | os.PathLike | None, hub_kwargs: dict[str, Any]) -> bool:
    """Whether the `adapter_config.json` at `source` (a folder, or a Hub repo id with `subfolder`, `revision`, ... in
    `hub_kwargs`) is a Rein adapter's. Reads the one file the load reads first (from the Hub: into the same cache);
    where it cannot be read, answers False: the load then fails on its own, before it changes the model."""
    if source is None:
        return False
    subfolder = hub_kwargs.get("subfolder")
    config_file = os.path.join(source, subfolder or "", CONFIG_NAME)
    try:
        if not os.path.isfile(config_file):
            download_kwargs = {key: value for key, value in hub_kwargs.items() if key in HUB_DOWNLOAD_PARAMETERS}
            config_file = hf_hub_download(str(source), CONFIG_NAME, **download_kwargs)
        with open(config_file, encoding="utf-8") as file:
            return is_rein_config(json.load(file))
    except Exception:  # a missing folder or repo, no network, a file that is not JSON: the load's own error follows
        return False


# Each entry point's arguments, bound by name, to the model it changes if the adapter is Rein's (None: not Rein's)


def _peft_from_pretrained(arguments: dict[str, Any]) -> nn.Module | None:
    # PeftModel.from_pretrained(cls, model, model_id, adapter_name, is_trainable, config, ..., **kwargs)
    config = arguments.get("config")
    rein = is_rein_config(config) if config is not None else saved_adapter_is_rein(
        arguments["model_id"], arguments.get("kwargs", {})
    )
    return arguments["model"] if rein else None


def _peft_load_adapter(arguments: dict[str, Any]) -> nn.Module | None:
    # PeftModel.load_adapter(self, model_id, adapter_name, ..., **kwargs); an adapter of that name takes new weights
    model, name = arguments["self"], arguments["adapter_name"]
    if name in model.peft_config:
        rein = is_rein_config(model.peft_config[name])
    else:
        rein = saved_adapter_is_rein(arguments["model_id"], arguments.get("kwargs", {}))
    return model if rein else None


def _peft_add_adapter(arguments: dict[str, Any]) -> nn.Module | None:
    # PeftModel.add_adapter(self, adapter_name, peft_config, ...)
    return arguments["self"] if is_rein_config(arguments["peft_config"]) else None


def _transformers_load_adapter(arguments: dict[str, Any]) -> nn.Module | None:
    # PeftAdapterMixin.load_adapter(self, peft_model_id, adapter_name, peft_config, ..., adapter_kwargs, **kwargs)
    config = arguments.get("peft_config")
    if config is not None:
        rein = is_rein_config(config)
    else:
        hub_kwargs = {**arguments.get("kwargs", {}), **(arguments.get("adapter_kwargs") or {})}
        rein = saved_adapter_is_rein(arguments.get("peft_model_id"), hub_kwargs)
    return arguments["self"] if rein else None


def _transformers_add_adapter(arguments: dict[str, Any]) -> nn.Module | None:
    # PeftAdapterMixin.add_adapter(self, adapter_config, adapter_name)
    return arguments["self"] if is_rein_config(arguments["adapter_config"]) else None


@dataclass(frozen=True)
class EntryPoint:
    """A method of PEFT or transformers that adds or loads an adapter, and how to tell from its arguments which model
    a Rein adapter would change."""

    owner: type
    name: str
    rein_model: Callable[[dict[str, Any]], nn.Module | None]


ENTRY_POINTS = (
    EntryPoint(PeftModel, "from_pretrained", _peft_from_pretrained),
    EntryPoint(PeftModel, "load_adapter", _peft_load_adapter),
    EntryPoint(PeftModel, "add_adapter", _peft_add_adapter),
    EntryPoint(PeftAdapterMixin, "load_adapter", _transformers_load_adapter),
    EntryPoint(PeftAdapterMixin, "add_adapter", _transformers_add_adapter),
)


def _restoring(method: Callable, rein_model: Callable[[dict[str, Any]], nn.Module | None]) -> Callable:
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            model = rein_model(signature.bind(*args, **kwargs).arguments)
        except TypeError:  # arguments the method does not take: it raises its own error
            model = None
        with unchanged_on_failure(model) if model is not None else nullcontext():
            return method(*args, **kwargs)

    setattr(wrapper, WRAPPED_MARK, True)
    return wrapper


def register_rollback() -> None:
    """Make a failed `PeftModel.from_pretrained`, `PeftModel.load_adapter` / `add_adapter` and transformers'
    `load_adapter` / `add_adapter` of a Rein adapter leave the model as it was; calls with any other method's adapter
    go to PEFT and transformers untouched (idempotent)."""
    for entry in ENTRY_POINTS:
        attribute = entry.owner.__dict__[entry.name]
        # from_pretrained is a classmethod: wrap its function, and make the wrapper one again
        method = attribute.__func__ if isinstance(attribute, classmethod) else attribute
        if getattr(method, WRAPPED_MARK, False):
            continue
        wrapper = _restoring(method, entry.rein_model)
        setattr(entry.owner, entry.name, classmethod(wrapper) if isinstance(attribute, classmethod) else wrapper)
