"""rein_peft: Rein ("Stronger, Fewer, & Superior", CVPR 2024) as a PEFT method for Hugging Face vision transformers.

`import rein_peft` registers the method with PEFT, so that `peft.get_peft_model(model, ReinConfig(...))`,
`PeftModel.from_pretrained` and `PeftConfig.from_pretrained` know it, and registers the official segmenter's pyramid
backbone (`Dinov2PyramidConfig`, `Dinov2PyramidBackbone`) with transformers' auto classes.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .auto_loading import register_auto_loading
from .config import ReinConfig, ReinPeftType
from .convert import OfficialCheckpointError, convert_official_checkpoint, map_official_checkpoint
from .convert_dinov2 import convert_dinov2_checkpoint
from .dg_data import load_dg_dataset
from .discovery import ReinUnsupportedModelError
from .evaluation import evaluate_segmentation, keep_ratio_size, semantic_scores, slide_inference, whole_inference
from .extras import MissingExtraError
from .hub import register_model_card, set_model_card_info
from .layer import ReinLayer
from .model import ReinMergeError, ReinModel, ReinStateDictError, get_queries
from .official import build_official_segmenter, mask2former_decoder_fields, official_segmenter_config
from .pyramid import Dinov2PyramidBackbone, Dinov2PyramidConfig, register_pyramid, resize_patch_embedding
from .quantization import is_backbone_linear
from .rollback import register_rollback, unchanged_on_failure
from .segmentation import check_label_maps, segmentation_ignore_index
from .sharding import gather_adapter_state_dict
from .training import create_rein_optimizer, rein_parameter_groups

__version__ = "0.1.0"


def register() -> None:
    """Register Rein in PEFT's method tables and model cards, make failed loads of Rein adapters (only theirs) leave
    the model as it was (see `rein_peft.rollback`), let a Rein adapter folder loaded alone build its base with the
    head's labels (see `rein_peft.auto_loading`), and register the pyramid backbone with transformers' auto classes.
    Runs on import; calling it again changes nothing."""
    PEFT_TYPE_TO_CONFIG_MAPPING[ReinPeftType.REIN] = ReinConfig
    PEFT_TYPE_TO_TUNER_MAPPING[ReinPeftType.REIN] = ReinModel
    PEFT_TYPE_TO_PREFIX_MAPPING[ReinPeftType.REIN] = ReinModel.prefix
    register_model_card()
    register_rollback()
    register_auto_loading()
    register_pyramid()


register()

__all__ = [
    "Dinov2PyramidBackbone",
    "Dinov2PyramidConfig",
    "OfficialCheckpointError",
    "ReinConfig",
    "ReinLayer",
    "ReinMergeError",
    "ReinModel",
    "ReinPeftType",
    "ReinStateDictError",
    "ReinUnsupportedModelError",
    "MissingExtraError",
    "build_official_segmenter",
    "check_label_maps",
    "convert_dinov2_checkpoint",
    "convert_official_checkpoint",
    "create_rein_optimizer",
    "evaluate_segmentation",
    "gather_adapter_state_dict",
    "get_queries",
    "is_backbone_linear",
    "keep_ratio_size",
    "load_dg_dataset",
    "map_official_checkpoint",
    "mask2former_decoder_fields",
    "official_segmenter_config",
    "register",
    "rein_parameter_groups",
    "resize_patch_embedding",
    "segmentation_ignore_index",
    "semantic_scores",
    "set_model_card_info",
    "slide_inference",
    "unchanged_on_failure",
    "whole_inference",
]
