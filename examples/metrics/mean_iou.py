"""Mean IoU as a local `evaluate` module: rein_peft's (rein_peft/mean_iou.py), which the examples load by this path."""

from rein_peft.mean_iou import MeanIoU  # noqa: F401
