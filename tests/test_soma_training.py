"""SoMA's optimiser recipe (`create_soma_optimizer`, `PolyLRCosineWeightDecay`): its parameter groups against the
rule of SoMA's config, its schedule against the formulas written out, and a real `Trainer` run stepping it."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from conftest import LABELS, pixels, tiny_dinov2
from peft import LoraConfig, get_peft_model
from test_official_segmenter import NUM_LABELS, TINY_BACKBONE, TINY_DECODER
from torch import nn

import rein_peft
from rein_peft import PolyLRCosineWeightDecay, create_soma_optimizer
from rein_peft.official.protocol import official_optimizer

LR, WD, FINAL_WD, POWER = 1e-4, 0.05, 1e-5, 0.9
BACKBONE = "model.pixel_level_module.encoder"
# SoMA's config: `custom_keys` "query_embed", "query_feat", "level_embed" and "norm" with decay_mult 0 (transformers'
# names of the embeddings below), and `norm_decay_mult=0` for LayerNorm and GroupNorm layers
EMBEDDINGS = ("queries_embedder", "queries_features", "level_embed")


def groups_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, tuple[float, float]]:
    """Each trainable parameter's name -> (lr, weight_decay) of the one group that holds it."""
    group_of = {id(param): group for group in optimizer.param_groups for param in group["params"]}
    assert len(group_of) == sum(len(group["params"]) for group in optimizer.param_groups)  # no parameter twice
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert len(group_of) == len(trainable)
    return {
        name: (group_of[id(param)]["lr"], group_of[id(param)]["weight_decay"]) for name, param in trainable.items()
    }


def soma_segmenter(method: str = "soma") -> nn.Module:
    config = rein_peft.official_segmenter_config(tf.Dinov2Config(**TINY_BACKBONE), NUM_LABELS, **TINY_DECODER)
    torch.manual_seed(0)
    return rein_peft.build_official_segmenter(None, NUM_LABELS, method, config=config)


def test_segmenter_groups_follow_somas_config():
    model = soma_segmenter()
    groups = groups_by_name(model, create_soma_optimizer(model))
    owners = dict(model.named_modules())
    for name, (lr, weight_decay) in groups.items():
        owner = owners[name.rsplit(".", 1)[0]]
        is_norm = type(owner).__name__ in ("LayerNorm", "GroupNorm") or "norm" in name
        no_decay = is_norm or any(embedding in name for embedding in EMBEDDINGS)
        assert (lr, weight_decay) == (LR / 2 if BACKBONE in name else LR, 0.0 if no_decay else WD), name
    # the backbone trains SoMA's factors and the adapted linears' biases, at half the rate, all decayed
    backbone = {name: values for name, values in groups.items() if BACKBONE in name}
    assert set(backbone.values()) == {(LR / 2, WD)}
    assert any(name.endswith("q_proj.base_layer.bias") for name in backbone)
    # unlike Rein's recipe, SoMA decays biases: the two recipes differ by exactly the biases (of no norm)
    rein = groups_by_name(model, official_optimizer(model, LR, WD))
    differ = {name for name in groups if groups[name][1] != rein[name][1]}
    assert differ and all(name.endswith("bias") and "norm" not in name for name in differ)
    assert "base_model.model.class_predictor.modules_to_save.default.bias" in differ


def test_classifier_backbone_is_its_vit_and_the_head_keeps_the_full_rate():
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], bias="lora_only", modules_to_save=["classifier"])
    model = get_peft_model(tiny_dinov2(), config)
    assert rein_peft.backbone_of(model) is model.get_base_model().dinov2
    headless = tiny_dinov2(classifier=False)
    assert rein_peft.backbone_of(headless) is headless
    groups = groups_by_name(
        model, create_soma_optimizer(model, lr=2e-3, weight_decay=0.1, backbone_lr_multiplier=0.25)
    )
    for name, (lr, weight_decay) in groups.items():
        in_head = ".classifier." in name
        assert (lr, weight_decay) == (2e-3 if in_head else 5e-4, 0.1), name  # a ViT's LoRA has no norm to spare
    assert any(name.endswith("q_proj.base_layer.bias") for name in groups)  # bias="lora_only": biases train, decayed


def test_backbone_must_be_named_where_it_cannot_be_told():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="Pass backbone=<the pretrained module>"):
        create_soma_optimizer(model)
    optimizer = create_soma_optimizer(model, backbone=model[0])
    assert [(group["lr"], group["weight_decay"], len(group["params"])) for group in optimizer.param_groups] == [
        (LR / 2, WD, 2),  # the linear's weight and bias
        (LR, 0.0, 2),  # the norm's
    ]
    assert [group["lr"] for group in create_soma_optimizer(model, backbone_lr_multiplier=1.0).param_groups] == [LR, LR]


def poly_lr(base: float, step: int, total: int) -> float:
    return base * (1 - min(step, total) / total) ** POWER


def cosine_weight_decay(base: float, step: int, total: int) -> float:
    return FINAL_WD + (base - FINAL_WD) * (1 + math.cos(math.pi * min(step, total) / total)) / 2


def two_group_optimizer() -> torch.optim.AdamW:
    decayed, plain = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    return torch.optim.AdamW(
        [{"params": [decayed], "weight_decay": WD}, {"params": [plain], "weight_decay": 0.0, "lr": LR / 2}], lr=LR
    )


def test_schedule_values_are_the_formulas():
    total = 10
    optimizer = two_group_optimizer()
    scheduler = PolyLRCosineWeightDecay(optimizer, total)
    seen = {}
    for step in range(total + 3):
        seen[step] = [(group["lr"], group["weight_decay"]) for group in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
    assert seen[0] == [(LR, WD), (LR / 2, 0.0)]  # the first step: the starting values
    assert seen[5][0] == pytest.approx((LR * 0.5**0.9, (WD + FINAL_WD) / 2), rel=1e-12)  # the middle
    assert seen[total][0] == (0.0, pytest.approx(FINAL_WD, rel=1e-12))  # the end, and held after it
    assert seen[total + 2] == seen[total]
    for step, values in seen.items():
        assert values[0] == pytest.approx((poly_lr(LR, step, total), cosine_weight_decay(WD, step, total)), rel=1e-12)
        assert values[1] == pytest.approx((poly_lr(LR / 2, step, total), 0.0), rel=1e-12)  # no decay stays none
    assert scheduler.get_last_lr() == [group["lr"] for group in optimizer.param_groups]


def test_schedule_resumes_from_its_state():
    total, done = 8, 3
    optimizer = two_group_optimizer()
    scheduler = PolyLRCosineWeightDecay(optimizer, total)
    for _ in range(done):
        optimizer.step()
        scheduler.step()
    resumed_optimizer = two_group_optimizer()
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed = PolyLRCosineWeightDecay(resumed_optimizer, total)
    resumed.load_state_dict(scheduler.state_dict())
    resumed_optimizer.step()
    resumed.step()
    decayed = resumed_optimizer.param_groups[0]
    expected = (poly_lr(LR, done + 1, total), cosine_weight_decay(WD, done + 1, total))
    assert (decayed["lr"], decayed["weight_decay"]) == pytest.approx(expected, rel=1e-12)


def test_schedule_refuses_an_empty_run():
    with pytest.raises(ValueError, match="total_steps must be at least 1"):
        PolyLRCosineWeightDecay(two_group_optimizer(), 0)


class Recorder(tf.TrainerCallback):
    """The decayed group's (lr, weight_decay) after each optimiser step, as Trainer hands its optimiser over."""

    def __init__(self) -> None:
        self.values: list[tuple[float, float]] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        group = next(group for group in optimizer.param_groups if group["weight_decay"] > 0)
        self.values.append((group["lr"], group["weight_decay"]))


def test_trainer_steps_the_schedule(tmp_path):
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    model = get_peft_model(tiny_dinov2(), config)
    steps = 4
    lora_before = {name: param.detach().clone() for name, param in model.named_parameters() if "lora_B" in name}
    images, labels = pixels(steps * 2, seed=3), torch.arange(steps * 2) % LABELS
    data = [{"pixel_values": image, "labels": label} for image, label in zip(images, labels, strict=True)]
    optimizer = create_soma_optimizer(model)
    recorder = Recorder()
    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=False,
        use_cpu=True,
    )
    trainer = tf.Trainer(
        model=model,
        args=args,
        train_dataset=data,
        optimizers=(optimizer, PolyLRCosineWeightDecay(optimizer, steps)),
        callbacks=[recorder],
    )
    trainer.train()
    backbone_lr = LR / 2  # the decayed group Recorder reads first holds the backbone's LoRA factors
    expected = [
        (poly_lr(backbone_lr, step, steps), cosine_weight_decay(WD, step, steps)) for step in range(1, steps + 1)
    ]
    assert [value for pair in recorder.values for value in pair] == pytest.approx(
        [value for pair in expected for value in pair], rel=1e-12
    )
    assert recorder.values[-1] == (0.0, pytest.approx(FINAL_WD, rel=1e-12))
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert logged == pytest.approx([poly_lr(backbone_lr, step, steps) for step in range(steps)], rel=1e-12)
    trained = dict(model.named_parameters())
    assert all(not torch.equal(trained[name], before) for name, before in lora_before.items())
