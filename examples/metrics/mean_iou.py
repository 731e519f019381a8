"""Mean IoU as a local `evaluate` module: rein_peft's (rein_peft/official/mean_iou.py), loaded by this path."""

from rein_peft.official.mean_iou import MeanIoU  # noqa: F401
