"""rein_peft: Rein ("Stronger, Fewer, & Superior", CVPR 2024) as a PEFT method for Hugging Face vision transformers.

`import rein_peft` registers the method with PEFT, so that `peft.get_peft_model(model, ReinConfig(...))`,
`PeftModel.from_pretrained` and `PeftConfig.from_pretrained` know it, and registers the official segmenter's pyramid
backbone (`Dinov2PyramidConfig`, `Dinov2PyramidBackbone`) with transformers' auto classes.

The package has three parts (docs/architecture.md): the adapters (`rein_peft.tuners.rein`, a PEFT tuner, and
`rein_peft.tuners.soma`, the follow-up SoMA with PEFT's own LoRA; neither imports anything else of rein_peft), their
integrations with the stack (`rein_peft.integrations`) and the paper's segmentation system built on them
(`rein_peft.official`). Every public name is exported here.
"""

from .integrations.auto_loading import register_auto_loading
from .integrations.hub import register_model_card, set_model_card_info
from .integrations.quantization import is_backbone_linear
from .integrations.rollback import register_rollback
from .integrations.sharding import gather_adapter_state_dict
from .integrations.training import create_rein_optimizer, rein_parameter_groups
from .official import (
    Dinov2PyramidBackbone,
    Dinov2PyramidConfig,
    OfficialCheckpointError,
    build_official_segmenter,
    check_label_maps,
    convert_dinov2_checkpoint,
    convert_official_checkpoint,
    evaluate_segmentation,
    keep_ratio_size,
    load_dg_dataset,
    map_official_checkpoint,
    mask2former_decoder_fields,
    official_segmenter_config,
    register_pyramid,
    resize_patch_embedding,
    segmentation_ignore_index,
    semantic_scores,
    slide_inference,
    whole_inference,
)
from .tuners.rein import (
    ReinConfig,
    ReinLayer,
    ReinMergeError,
    ReinModel,
    ReinPeftType,
    ReinStateDictError,
    ReinUnsupportedModelError,
    get_queries,
    register_rein,
    unchanged_on_failure,
)
from .tuners.soma import initialize_soma, save_soma_adapter, soma_config
from .utils.extras import MissingExtraError

__version__ = "0.1.0"


def register() -> None:
    """Register Rein in PEFT's method tables (`rein_peft.tuners.rein.register_rein`) and model cards, make failed
    loads of Rein adapters (only theirs) leave the model as it was (`rein_peft.integrations.rollback`), let a Rein
    adapter folder loaded alone build its base with the head's labels (`rein_peft.integrations.auto_loading`), and
    register the pyramid backbone with transformers' auto classes. Runs on import; calling it again changes nothing."""
    register_rein()
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
    "initialize_soma",
    "is_backbone_linear",
    "keep_ratio_size",
    "load_dg_dataset",
    "map_official_checkpoint",
    "mask2former_decoder_fields",
    "official_segmenter_config",
    "register",
    "rein_parameter_groups",
    "resize_patch_embedding",
    "save_soma_adapter",
    "segmentation_ignore_index",
    "semantic_scores",
    "set_model_card_info",
    "slide_inference",
    "soma_config",
    "unchanged_on_failure",
    "whole_inference",
]
