"""A Rein adapter folder loaded alone builds its base model with the labels its head was trained for.

transformers' auto classes (`AutoModelForImageClassification.from_pretrained(adapter)`), `pipeline(model=adapter)`
and PEFT's `AutoPeftModel.from_pretrained(adapter)` read `base_model_name_or_path` from `adapter_config.json`, build
that model from its own config, then load the adapter. A task head saved with the adapter (`modules_to_save`) for 10
classes then meets a base whose config says 2, and the load fails on the head's shape. A Rein adapter records the
labels of the model it was added to (`ReinConfig.id2label`); `register_auto_loading` makes those entry points pass
them to the base model's config when the folder holds a Rein adapter and the call sets no labels or config of its
own. Other adapters and models load exactly as before; the one cost for them is that a call without labels looks
for `adapter_config.json` once more (the lookup transformers itself makes next, through the same Hub cache).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

import transformers.models.auto.modeling_auto  # noqa: F401 (defines the auto classes wrapped below)
from peft.auto import _BaseAutoPeftModel
from transformers.models.auto.auto_factory import _BaseAutoModelClass
from transformers.utils.peft_utils import find_adapter_config_file

from ..tuners.rein.config import ReinPeftType

# a call that sets any of these chooses the base model's labels itself
LABEL_ARGUMENTS = ("config", "num_labels", "id2label", "label2id")
# the arguments of a from_pretrained call that say where an adapter config file is found
HUB_ARGUMENTS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
# marks an entry point already wrapped, so that registering twice changes nothing
WRAPPED_MARK = "builds_rein_base_with_saved_labels"


def saved_labels(pretrained_model_name_or_path: Any, kwargs: dict[str, Any]) -> dict[int, str] | None:
    """The labels a Rein adapter at `pretrained_model_name_or_path` (a folder or Hub repo id) was saved with, or
    `None`: not a Rein adapter, no labels recorded, or `kwargs` (a from_pretrained call's) already set labels or a
    config."""
    if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
        return None
    if any(kwargs.get(name) is not None for name in LABEL_ARGUMENTS):
        return None
    hub_arguments = {name: kwargs[name] for name in HUB_ARGUMENTS if kwargs.get(name) is not None}
    config_file = find_adapter_config_file(os.fspath(pretrained_model_name_or_path), **hub_arguments)
    if config_file is None:
        return None
    with open(config_file, encoding="utf-8") as file:
        adapter_config = json.load(file)
    if adapter_config.get("peft_type") != ReinPeftType.REIN or not adapter_config.get("id2label"):
        return None
    return {int(index): label for index, label in adapter_config["id2label"].items()}


def _with_saved_labels(from_pretrained: Callable) -> Callable:
    @functools.wraps(from_pretrained)
    def wrapper(cls: type, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        labels = saved_labels(pretrained_model_name_or_path, kwargs)
        if labels is not None:
            kwargs = {**kwargs, "id2label": labels, "label2id": {label: index for index, label in labels.items()}}
        return from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs)

    setattr(wrapper, WRAPPED_MARK, True)
    return wrapper


def _subclasses(cls: type) -> list[type]:
    return [cls] + [below for subclass in cls.__subclasses__() for below in _subclasses(subclass)]


def register_auto_loading() -> None:
    """Make transformers' auto classes (and through them `pipeline`) and PEFT's `AutoPeftModel` build a Rein
    adapter's base model with the adapter's saved labels (idempotent)."""
    # transformers gives each auto class of `modeling_auto` its own copy of `from_pretrained`
    owners = _subclasses(_BaseAutoModelClass) + _subclasses(_BaseAutoPeftModel)
    for owner in (cls for cls in owners if "from_pretrained" in cls.__dict__):
        from_pretrained = owner.__dict__["from_pretrained"].__func__
        if not getattr(from_pretrained, WRAPPED_MARK, False):
            owner.from_pretrained = classmethod(_with_saved_labels(from_pretrained))
