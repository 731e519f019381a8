"""An independent, plainly written reference of Rein's math (shared/reference/REIN.md), in the official code's form:
sequence-first features, einsum, prefix split and re-join. It shares no code with rein_peft."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceRein:
    """Rein's tensors held as plain tensors, with official names, and the official forward."""

    def __init__(self, tensors: dict[str, torch.Tensor], use_softmax: bool = True) -> None:
        self.tensors = {name: tensor.detach().clone().float() for name, tensor in tensors.items()}
        self.use_softmax = use_softmax

    def get_tokens(self, layer: int) -> torch.Tensor:
        t = self.tensors
        if "learnable_tokens" in t:
            return t["learnable_tokens"] if layer == -1 else t["learnable_tokens"][layer]
        if layer == -1:
            return t["learnable_tokens_a"] @ t["learnable_tokens_b"]
        return t["learnable_tokens_a"][layer] @ t["learnable_tokens_b"][layer]

    def forward(self, feats: torch.Tensor, layer: int, batch_first: bool, num_prefix: int) -> torch.Tensor:
        t = self.tensors
        if batch_first:
            feats = feats.permute(1, 0, 2)
        prefix, feats = torch.tensor_split(feats, [num_prefix], dim=0)
        tokens = self.get_tokens(layer)
        attn = torch.einsum("nbc,mc->nbm", feats, tokens)
        if self.use_softmax:
            attn = attn * (feats.shape[-1] ** -0.5)
            attn = F.softmax(attn, dim=-1)
        token2feat = F.linear(tokens[1:, :], t["mlp_token2feat.weight"], t["mlp_token2feat.bias"])
        delta_f = torch.einsum("nbm,mc->nbc", attn[:, :, 1:], token2feat)
        delta_f = F.linear(delta_f + feats, t["mlp_delta_f.weight"], t["mlp_delta_f.bias"])
        scale = t["scale"] if "scale" in t else 1.0
        feats = feats + delta_f * scale
        feats = torch.cat([prefix, feats], dim=0)
        if batch_first:
            feats = feats.permute(1, 0, 2)
        return feats

    def queries(self) -> torch.Tensor:
        t = self.tensors
        num_layers = self.get_tokens(-1).shape[0]
        tokens = F.linear(self.get_tokens(-1), t["transform.weight"], t["transform.bias"]).permute(1, 2, 0)
        tokens = torch.cat(
            [
                F.max_pool1d(tokens, kernel_size=num_layers),
                F.avg_pool1d(tokens, kernel_size=num_layers),
                tokens[:, :, -1].unsqueeze(-1),
            ],
            dim=-1,
        )
        return F.linear(tokens.flatten(-2, -1), t["merge.weight"], t["merge.bias"])

    def forward_map(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """A channels-first stage's refinement, as the official ConvNeXt and ResNet backbones write it: the
        [B, C, H, W] map flattened to [B, H*W, C] tokens, refined without prefix tokens, reshaped back."""
        B, C, H, W = x.shape
        tokens = x.flatten(-2, -1).permute(0, 2, 1)
        return self.forward(tokens, layer, batch_first=True, num_prefix=0).permute(0, 2, 1).reshape(B, C, H, W)

    def attach(
        self, layers: list[nn.Module], batch_first: bool, num_prefix: int, channels_first: bool = False
    ) -> None:
        """Refine each layer's output, as the seed document's modified backbone forward does (for a channels-first
        stage, as the official ConvNeXt and ResNet backbones do)."""
        for index, layer in enumerate(layers):

            def hook(module, args, output, index=index):
                hidden = output[0] if isinstance(output, tuple) else output
                if channels_first:
                    hidden = self.forward_map(hidden, index)
                else:
                    hidden = self.forward(hidden, index, batch_first, num_prefix)
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            layer.register_forward_hook(hook, prepend=True)


def official_tensors(
    peft_model: nn.Module, adapter_name: str = "default", within: str | None = None
) -> dict[str, torch.Tensor]:
    """Read an adapter's tensors out of a model by parameter name, renamed to the official stems; `within` (a stage's
    module name, e.g. "encoder.stages.1") keeps only the tensors of the Rein attached to that module."""
    renames = {
        "rein_tokens": "learnable_tokens",
        "rein_tokens_a": "learnable_tokens_a",
        "rein_tokens_b": "learnable_tokens_b",
        "rein_scale": "scale",
        "rein_token2feat": "mlp_token2feat",
        "rein_delta_f": "mlp_delta_f",
        "rein_transform": "transform",
        "rein_merge": "merge",
    }
    tensors = {}
    for name, param in peft_model.named_parameters():
        parts = name.split(".")
        if adapter_name not in parts or not any(part in renames for part in parts):
            continue
        if within is not None and f"{within}.rein." not in name:
            continue
        stem = next(part for part in parts if part in renames)
        suffix = parts[parts.index(adapter_name) + 1 :]
        tensors[".".join([renames[stem], *suffix])] = param.reshape(()) if stem == "rein_scale" else param
    return tensors
