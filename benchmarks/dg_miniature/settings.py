"""The settings the methods are compared in (`--setting`): the source task the segmenter learns and the styles it is
measured on, always on the same foundation.

- `street` (the default): 5 classes (sky, building, road, vegetation, vehicle), large regions the foundation's
  pretraining scenes hold. Every method reaches 88-89 mIoU on the source: the frozen backbone + decoder leaves
  adapting nothing to add in-domain, unlike the paper's regime (there fine-tuned and adapted backbones beat frozen
  ones in-domain and out).
- `shapes`: the same streets with two more classes, each told apart from another by shape alone (a conifer from a
  round tree, a van from a car; drawn in that class's color and texture in every style), classes the foundation
  never saw in pretraining (`world.draw_shapes_layout`), read by a decoder a quarter as wide (16 channels: fewer
  decoder parameters leave more to the backbone's features).
- `shapes_deepest`: `shapes` read by the 16-channel decoder from the deepest layer only, 1,000 steps.
- `colours`: the street's buildings, trees and vehicles, each turned with probability 1/2 into a twin class that
  differs by colour alone (`world.draw_colours_layout`), read by a 16-channel decoder on the deepest layer only.

How `shapes` was chosen: by reasoning, before any method was run on it, from the ideas the issue lists (finer
classes, smaller objects, cues the frozen self-supervised features do not separate, fewer decoder parameters).
Small objects (1-pixel poles, small signs and pedestrians) were drawn first and dropped unrun: the decoder predicts
on the patch grid (8x8 on a 64-pixel scene) and upsamples bilinearly, so no method can draw a 1-pixel pole and none
gains room there. A shape is a cue the style-invariant foundation was never trained to separate within a region of
one color, yet a fine-tuned backbone can learn it; the narrower decoder takes away the capacity with which a frozen
backbone's decoder makes up for its features. It qualifies only through a gate on the source alone, never on the
target styles, checked and printed before the comparison (`evaluation.room_gate`; frozen and full fine-tuning of the
first seed run first): the frozen backbone + decoder at least `evaluation.ROOM_MIN_GAP` (10 mIoU) below full
fine-tuning on the source, with Rein's premise (every style's cosine similarity at least 0.8) still holding on the
new scenes. Measured on the premise-holding foundation: not met at 500 steps (full fine-tuning 40.6 against frozen
40.1 mIoU on the source) nor at 2,000 (72.8 against 70.4). Its run is smaller than `street`'s (`Setting.defaults`)
so that both settings fit the shared 2-core machine.

How `colours` was chosen, from what `shapes` showed (the frozen features keep what the foundation was trained on;
room has to come from what it was trained to discard): the foundation's pretraining pulls the same scene in random
colours together, so classes told apart by colour alone ask for what its deepest features should lose, and a
decoder on the deepest layer only cannot read colour from the early layers. Measured: not met either (full
fine-tuning 59.4 against frozen 64.5: the frozen deepest features still separate the colours), nor was
`shapes_deepest` (the shapes where the frozen decoder can no longer read them from early layers: 48.0 against 44.4).
The benchmark stops after the gate when it is not met. docs/domain-generalization.md has the figures of all four.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .world import (
    CLASS_NAMES,
    COLOUR_CLASS_NAMES,
    COLOUR_STYLES,
    SHAPE_CLASS_NAMES,
    SHAPE_STYLES,
    STYLES,
    Layout,
    Style,
    draw_colours_layout,
    draw_layout,
    draw_shapes_layout,
)


@dataclass(frozen=True)
class Setting:
    """A source task: its classes, its styles (the source and the unseen targets), how its scenes are laid out, the
    bar on the frozen backbone + decoder's source mIoU (`None`: none), whether the gate on room in-domain is checked
    before the comparison, whether the decoder reads the deepest layer only (else 4 evenly spaced layers), and the
    command line's defaults it changes (a flag given explicitly still wins)."""

    class_names: tuple[str, ...]
    styles: dict[str, Style]
    draw: Callable[[np.random.Generator, int], Layout]
    min_frozen_source_miou: float | None
    room_gate: bool
    deepest_layer_only: bool = False
    defaults: dict = field(default_factory=dict)


DEFAULT_SETTING = "street"
SETTINGS = {
    DEFAULT_SETTING: Setting(CLASS_NAMES, STYLES, draw_layout, min_frozen_source_miou=0.85, room_gate=False),
    "shapes": Setting(
        SHAPE_CLASS_NAMES,
        SHAPE_STYLES,
        draw_shapes_layout,
        min_frozen_source_miou=None,  # the room gate asks the opposite: the frozen backbone well below full
        room_gate=True,
        defaults={"decoder_channels": 16, "steps": 500, "train_images": 1000, "eval_images": 100},
    ),
    "colours": Setting(
        COLOUR_CLASS_NAMES,
        COLOUR_STYLES,
        draw_colours_layout,
        min_frozen_source_miou=None,
        room_gate=True,
        deepest_layer_only=True,
        defaults={"decoder_channels": 16},
    ),
    "shapes_deepest": Setting(
        SHAPE_CLASS_NAMES,
        SHAPE_STYLES,
        draw_shapes_layout,
        min_frozen_source_miou=None,
        room_gate=True,
        deepest_layer_only=True,
        defaults={"decoder_channels": 16, "steps": 1000, "train_images": 1000, "eval_images": 100},
    ),
}
ROOM_SETTINGS = tuple(name for name, setting in SETTINGS.items() if setting.room_gate)
