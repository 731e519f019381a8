"""Trains a tiny Rein-wrapped DINOv2 classifier with FSDP2 on CPU processes (gloo), for tests/test_large_backbones.py.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py plain OUT [--stop_after K | --resume]
    accelerate launch --config_file CONFIG tests/fsdp_worker.py accelerate OUT [--stop_after K | --resume]

`plain` shards with `torch.distributed.fsdp.fully_shard` (each encoder layer, then the whole model) and checkpoints
with `torch.distributed.checkpoint`; `accelerate` lets accelerate's FSDP plugin shard and checkpoint (`save_state`).
Every rank trains on its slice of the same global batches as `train` on one process. At the end rank 0 saves the
adapter to OUT/adapter; with `--stop_after K` the run stops after K steps with a sharded checkpoint in OUT/checkpoint,
which `--resume` continues from.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from conftest import tiny_dinov2
from peft import get_peft_model
from torch.distributed.tensor import DTensor

import rein_peft

STEPS, GLOBAL_BATCH, LEARNING_RATE, MOMENTUM = 6, 4, 0.05, 0.9


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same model, adapter and SGD optimizer on every process."""
    model = get_peft_model(base_model(), rein_peft.ReinConfig(token_length=6, modules_to_save=["classifier"]))
    return model, make_optimizer(model)


def base_model() -> torch.nn.Module:
    """The same backbone on every process (and in the test that checks the result)."""
    torch.manual_seed(0)
    return tiny_dinov2()


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    trainable = [param for param in model.parameters() if param.requires_grad]
    return torch.optim.SGD(trainable, lr=LEARNING_RATE, momentum=MOMENTUM)


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator),
            torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def train(model, optimizer, steps: range, rank: int = 0, world_size: int = 1, backward=None) -> None:
    """Train on `steps` of the global batches; each rank takes its slice (the mean of the ranks' mean losses, which
    FSDP's gradient averaging computes, is the global batch's mean loss)."""
    per_rank = GLOBAL_BATCH // world_size
    batches = global_batches()
    for step in steps:
        pixels, labels = batches[step]
        ours = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = model(pixel_values=pixels[ours], labels=labels[ours]).loss
        (backward or torch.Tensor.backward)(loss)
        optimizer.step()
        optimizer.zero_grad()


def _write_run_info(model: torch.nn.Module, out: str, world_size: int) -> None:
    """What the test checks besides the weights: that the run really was sharded over `world_size` processes."""
    tokens = next(param for name, param in model.named_parameters() if "rein_tokens" in name)
    with open(os.path.join(out, "run_info.json"), "w") as file:
        json.dump({"world_size": world_size, "tokens_sharded": isinstance(tokens, DTensor)}, file)


def _plain(out: str, stop_after: int | None, resume: bool) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model, _ = build()
    for layer in model.base_model.model.dinov2.encoder.layer:
        fully_shard(layer)
    fully_shard(model)  # the root: it holds the Rein tensors, which every layer's hook reads
    optimizer = make_optimizer(model)  # over the sharded parameters

    checkpoint = os.path.join(out, "checkpoint")
    # the adapter and the head only (strict=False: loading leaves the frozen backbone as it is)
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    if rank == 0:
        _write_run_info(model, out, world_size)
    first = 0
    if resume:
        model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
        state = {"model": model_state, "optimizer": optimizer_state, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
        )
        first = int(state["step"])
    last = STEPS if stop_after is None else stop_after
    train(model, optimizer, range(first, last), rank, world_size)
    if stop_after is not None:
        model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
        dcp.save(
            {"model": model_state, "optimizer": optimizer_state, "step": torch.tensor(last)}, checkpoint_id=checkpoint
        )
    else:
        state_dict = rein_peft.gather_adapter_state_dict(model)
        if rank == 0:
            model.save_pretrained(os.path.join(out, "adapter"), state_dict=state_dict)
    dist.barrier()  # every rank done with its collectives (DCP, FSDP) before the group goes away
    dist.destroy_process_group()


def _accelerate(out: str, stop_after: int | None, resume: bool) -> None:
    from accelerate import Accelerator, DistributedType, FullyShardedDataParallelPlugin, PartialState

    accelerator = Accelerator()
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate turns its FSDP plugin on only for accelerators (GPU, XPU, ...); on CPU processes, switch it on
        # here, configured from the same FSDP_* variables that `accelerate launch --config_file` sets
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        for state in (PartialState(), accelerator.state):  # AcceleratorState re-reads PartialState's when re-created
            state.distributed_type = DistributedType.FSDP
    model, optimizer = accelerator.prepare(*build())
    if accelerator.is_main_process:
        _write_run_info(model, out, accelerator.num_processes)
    checkpoint, step_file = os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint_step.json")
    first = 0
    if resume:
        accelerator.load_state(checkpoint)
        with open(step_file) as file:
            first = json.load(file)["step"]
    last = STEPS if stop_after is None else stop_after
    train(
        model,
        optimizer,
        range(first, last),
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.backward,
    )
    if stop_after is not None:
        accelerator.save_state(checkpoint)
        if accelerator.is_main_process:
            with open(step_file, "w") as file:
                json.dump({"step": last}, file)
    else:
        state_dict = rein_peft.gather_adapter_state_dict(model)
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(os.path.join(out, "adapter"), state_dict=state_dict)
    accelerator.wait_for_everyone()  # as in _plain: no rank tears the group down while another still uses it
    accelerator.end_training()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("launcher", choices=["plain", "accelerate"])
    parser.add_argument("out")
    parser.add_argument("--stop_after", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    (_plain if args.launcher == "plain" else _accelerate)(args.out, args.stop_after, args.resume)
