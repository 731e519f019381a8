"""Rein as a PEFT tuner: the config (`ReinConfig`), the learnable tokens (`ReinLayer`), the tuner that hooks them into
a model's encoder layers (`ReinModel`) and the discovery of those layers (`discovery`).

This package depends on PEFT, transformers and torch only, never on the rest of rein_peft (a test enforces it).
`register_rein` puts the method in PEFT's tables, as each of PEFT's own tuner packages registers its method.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .config import ReinConfig, ReinPeftType
from .discovery import ReinUnsupportedModelError
from .layer import ReinLayer
from .model import ReinMergeError, ReinModel, ReinStateDictError, get_queries
from .utils import unchanged_on_failure


def register_rein() -> None:
    """Register Rein in PEFT's method tables, so that `get_peft_model`, `PeftModel.from_pretrained` and
    `PeftConfig.from_pretrained` know `peft_type="REIN"`. (PEFT's `register_peft_method` accepts members of its own
    closed `PeftType` enum only.)"""
    PEFT_TYPE_TO_CONFIG_MAPPING[ReinPeftType.REIN] = ReinConfig
    PEFT_TYPE_TO_TUNER_MAPPING[ReinPeftType.REIN] = ReinModel
    PEFT_TYPE_TO_PREFIX_MAPPING[ReinPeftType.REIN] = ReinModel.prefix


__all__ = [
    "ReinConfig",
    "ReinLayer",
    "ReinMergeError",
    "ReinModel",
    "ReinPeftType",
    "ReinStateDictError",
    "ReinUnsupportedModelError",
    "get_queries",
    "register_rein",
    "unchanged_on_failure",
]
