"""The paper's system, built on the Rein tuner (`rein_peft.tuners.rein`) and never imported by it:

- `convert_backbone`: official DINOv2 weights into a transformers DINOv2 (`convert_dinov2_checkpoint`);
- `pyramid`: the patch-16 DINOv2 backbone with the official feature pyramid (`Dinov2PyramidBackbone`);
- `segmenter`: DINOv2 + Rein + Mask2Former with linked queries (`build_official_segmenter`), and the compared methods;
- `convert`, `safe_load`: released Rein checkpoints (mmengine files) onto that segmenter; `convert_soma`: SoMA's;
- `dg_data`: the domain-generalization data sets and the training augmentations;
- `protocol`, `segmentation`: segmenter configs, data preparation, collator and label-map checks;
- `evaluation`, `mean_iou`: whole-image and sliding-window inference and the mean IoU.
"""

from ..utils.deprecation import deprecated_aliases
from .convert import OfficialCheckpointError, convert_official_checkpoint, map_official_checkpoint
from .convert_backbone import convert_dinov2_checkpoint
from .convert_soma import convert_soma_checkpoint, map_soma_checkpoint
from .dg_data import load_dg_dataset
from .evaluation import evaluate_segmentation, keep_ratio_size, semantic_scores, slide_inference, whole_inference
from .pyramid import Dinov2PyramidBackbone, Dinov2PyramidConfig, register_pyramid, resize_patch_embedding
from .segmentation import check_label_maps, segmentation_ignore_index
from .segmenter import build_official_segmenter, mask2former_decoder_fields, official_segmenter_config

# `rein_peft.official.semantic_logits(outputs, size)` was `semantic_scores` under the name of another function
__getattr__ = deprecated_aliases(__name__, {"semantic_logits": semantic_scores})

__all__ = [
    "Dinov2PyramidBackbone",
    "Dinov2PyramidConfig",
    "OfficialCheckpointError",
    "build_official_segmenter",
    "check_label_maps",
    "convert_dinov2_checkpoint",
    "convert_official_checkpoint",
    "convert_soma_checkpoint",
    "evaluate_segmentation",
    "keep_ratio_size",
    "load_dg_dataset",
    "map_official_checkpoint",
    "map_soma_checkpoint",
    "mask2former_decoder_fields",
    "official_segmenter_config",
    "register_pyramid",
    "resize_patch_embedding",
    "segmentation_ignore_index",
    "semantic_scores",
    "slide_inference",
    "whole_inference",
]
