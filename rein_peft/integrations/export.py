"""Export a Rein-wrapped model, its active adapter applied, with `torch.export` or to ONNX for serving."""

from __future__ import annotations

import os

import torch
from peft import PeftModel
from torch import nn

EXPORT_EXTRA_HINT = "pip install 'rein-peft[export]'"


def _exportable(model: nn.Module, example_inputs: dict[str, torch.Tensor], dynamic_batch: bool) -> nn.Module:
    """The module to trace (a `PeftModel`'s base model, which carries the adapter's hooks), after checking the
    inputs."""
    if model.training:
        raise ValueError("Export the model in inference mode: call `model.eval()` first (dropout would be traced).")
    tensors = {name: value for name, value in example_inputs.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError("`example_inputs` must hold the model's tensor inputs by name, e.g. {'pixel_values': x}.")
    if dynamic_batch and any(value.shape[0] < 2 for value in tensors.values()):
        raise ValueError(
            "Give example inputs with a batch of at least 2 for a dynamic batch size: torch.export fixes a size-1 "
            "dimension to 1. Or pass `dynamic_batch=False`."
        )
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _dynamic_shapes(example_inputs: dict[str, torch.Tensor], dynamic_batch: bool) -> dict | None:
    if not dynamic_batch:
        return None
    batch = torch.export.Dim("batch")
    return {name: {0: batch} if isinstance(value, torch.Tensor) else None for name, value in example_inputs.items()}


def export_program(
    model: nn.Module, example_inputs: dict[str, torch.Tensor], dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """`torch.export` a model with its active Rein adapter applied (the adapter's weights become constants of the
    program; their eval-mode cache is not used while tracing).

    Args:
        model: A `PeftModel` with a Rein adapter, or a transformers model that got one from `add_adapter` /
            `load_adapter` (or any model: after `unload()` the program is the bare model's).
        example_inputs: The forward's tensor inputs by name, e.g. `{"pixel_values": torch.randn(2, 3, 224, 224)}`.
        dynamic_batch: Export with a dynamic batch size (dimension 0 of every input).

    Returns:
        The `ExportedProgram`; `program.module()(**inputs)` runs it and returns the model's output type.
    """
    module = _exportable(model, example_inputs, dynamic_batch)
    return torch.export.export(
        module, (), example_inputs, dynamic_shapes=_dynamic_shapes(example_inputs, dynamic_batch)
    )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: dict[str, torch.Tensor],
    dynamic_batch: bool = True,
) -> torch.onnx.ONNXProgram:
    """Export a model with its active Rein adapter applied to an ONNX file at `path` (`torch.onnx.export` with
    `dynamo=True`). The ONNX inputs are named as in `example_inputs`, the outputs as the model output's fields
    (e.g. `logits`). Needs the `export` extra: `pip install 'rein-peft[export]'`.

    Args:
        model: As for `export_program`.
        path: Where to write the `.onnx` file.
        example_inputs: The forward's tensor inputs by name.
        dynamic_batch: Export with a dynamic batch size.

    Returns:
        The `torch.onnx.ONNXProgram` that was saved.
    """
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError:
            raise ImportError(f"ONNX export needs '{package}', which is not installed: {EXPORT_EXTRA_HINT}") from None
    module = _exportable(model, example_inputs, dynamic_batch)
    with torch.no_grad():
        outputs = module(**example_inputs)
    output_names = [name for name, value in outputs.items() if isinstance(value, torch.Tensor)]
    program = torch.onnx.export(
        module,
        (),
        kwargs=example_inputs,
        dynamic_shapes=_dynamic_shapes(example_inputs, dynamic_batch),
        input_names=list(example_inputs),
        output_names=output_names,
        dynamo=True,
        verbose=False,
    )
    program.save(os.fspath(path))
    return program
