"""PEFT's known deprecation warning (PEFT 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` on every
PeftModel it builds) is silenced where rein_peft builds the PeftModel, and nowhere else."""

from __future__ import annotations

import warnings

import pytest
import transformers as tf
from peft import get_peft_model
from test_official_segmenter import TINY_BACKBONE, TINY_DECODER

from rein_peft import ReinConfig
from rein_peft.official.segmenter import apply_method, official_segmenter_config
from rein_peft.utils.compat import GRADIENT_CHECKPOINTING_DEPRECATION


def _deprecations(build) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # this test sees what a user sees, whatever pytest's own filters
        build()
    return [str(item.message) for item in caught if "is_gradient_checkpointing" in str(item.message)]


@pytest.mark.parametrize("method", ["rein", "lora"])
def test_the_official_segmenter_builds_without_peft_deprecation_warnings(tmp_path, method):
    tf.Dinov2Model(tf.Dinov2Config(**TINY_BACKBONE)).save_pretrained(tmp_path)
    config = official_segmenter_config(str(tmp_path), num_labels=3, **TINY_DECODER)

    def build_with_rein_peft():
        apply_method(tf.Mask2FormerForUniversalSegmentation(config), method)

    def build_with_peft_directly():  # the warning exists: only rein_peft's own call is quiet
        get_peft_model(tf.Mask2FormerForUniversalSegmentation(config), ReinConfig(token_length=6, query_dims=32))

    assert _deprecations(build_with_rein_peft) == []
    seen = _deprecations(build_with_peft_directly)
    assert seen and all(GRADIENT_CHECKPOINTING_DEPRECATION.replace("\\", "") in message for message in seen)
