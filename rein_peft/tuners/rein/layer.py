"""The Rein adapter module and the forward hook that applies it after each encoder layer."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.distributed.tensor import DTensor

from .config import ReinConfig
from .utils import is_quantized

# in a mixed-adapter batch, the name that runs a sample through the base model alone (PEFT's convention)
BASE_ADAPTER_NAME = "__base__"

# what a mask decoder's learnable query table holds (REIN.md, query linking): positional queries, which become Rein's
# linked queries, or content queries, which become `rein_query_feat(linked queries)` where the decoder has positional
# ones too (Mask2Former) and the linked queries themselves where it has one table only (EoMT)
QUERY_CONTENT = "content"
QUERY_POSITION = "position"

NO_BASE_LAYER = (
    "A ReinLayer has no `{attribute}`: it wraps no base layer, it holds the tensors of the Rein adapters that hooks "
    "apply to the encoder layers' outputs."
)


@dataclass(frozen=True)
class ReinSettings:
    """What one adapter needs to know about the backbone it refines, resolved when it is injected.

    Attributes:
        hidden_size: C, the width of the hidden states.
        num_prefix_tokens: Tokens at the start of the sequence that pass through untouched.
        batch_first: `True` for `[B, S, C]` hidden states, `False` for `[S, B, C]`.
        use_softmax: See `ReinConfig.use_softmax`.
        refine_query_tokens: See `ReinConfig.refine_query_tokens`.
        layer_rows: Name of each targeted layer -> its row in the `[L, ...]` token tables.
        channels_first: The layers output `[B, C, H, W]` feature maps (a stage of ConvNeXt or ResNet), refined as
            their `[B, H*W, C]` tokens and given back in their own layout.
    """

    hidden_size: int
    num_prefix_tokens: int
    batch_first: bool
    use_softmax: bool
    refine_query_tokens: bool
    layer_rows: dict[str, int]
    channels_first: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.layer_rows)


class ReinLayer(nn.Module, BaseTunerLayer):
    """Owns every tensor of every Rein adapter of one encoder; attached to the module that holds the encoder layers.
    A staged backbone (ConvNeXt, ResNet, Swin) has one per stage, on the stage's module, with the stage's width.

    Parameters per adapter (L targeted layers, M tokens, C hidden size, r low rank, Q query width):

    - `rein_tokens[name]`: `[L, M, C]`, or `rein_tokens_a[name]`: `[L, M, r]` and `rein_tokens_b[name]`: `[L, r, C]`
    - `rein_token2feat[name]`, `rein_delta_f[name]`: `Linear(C, C)` shared by all layers
    - `rein_scale[name]`: `[1]` (absent with `zero_mlp_delta_f`, where the scale is the constant 1.0)
    - `rein_transform[name]`: `Linear(C, Q)`, `rein_merge[name]`: `Linear(3Q, Q)` with query linking
    - `rein_query_feat[name]`: `Linear(Q, Q)`, the content queries, when linking into a decoder that has both content
      and positional queries (Mask2Former)

    The encoder layers are not wrapped: each carries a `ReinHook` forward hook that calls `refine` with its name.
    """

    adapter_layer_names = (
        "rein_tokens",
        "rein_tokens_a",
        "rein_tokens_b",
        "rein_scale",
        "rein_token2feat",
        "rein_delta_f",
        "rein_transform",
        "rein_merge",
        "rein_query_feat",
    )
    other_param_names = ("rein_settings", "sequence_lengths")

    def __init__(self, device: torch.device | None = None) -> None:
        super().__init__()
        # empty, follows `.to()`: tells where adapters loaded elsewhere (low_cpu_mem_usage) belong
        self.register_buffer("device_anchor", torch.empty(0, device=device), persistent=False)
        self.rein_tokens = nn.ParameterDict()
        self.rein_tokens_a = nn.ParameterDict()
        self.rein_tokens_b = nn.ParameterDict()
        self.rein_scale = nn.ParameterDict()
        self.rein_token2feat = nn.ModuleDict()
        self.rein_delta_f = nn.ModuleDict()
        self.rein_transform = nn.ModuleDict()
        self.rein_merge = nn.ModuleDict()
        self.rein_query_feat = nn.ModuleDict()
        self.rein_settings: dict[str, ReinSettings] = {}
        # adapter -> sequence length seen at its first adapted layer in the current forward
        self.sequence_lengths: dict[str, int] = {}
        # eval-mode cache: (adapter, row) -> (weights' state, the weights, (keys, values))
        self.projection_cache: dict[tuple[str, int], tuple] = {}
        # mixed-adapter batch of the current forward: (batch size, adapter -> its samples' positions), or None
        self.sample_groups: tuple[int, dict[str, torch.Tensor]] | None = None
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

    @property
    def weight(self) -> torch.Tensor:
        # BaseTunerLayer's `weight` and `bias` read a base layer, which a ReinLayer does not wrap (they would recurse
        # forever): like a module without them, it raises AttributeError, so `hasattr` and `dir()`-based tools work
        raise AttributeError(NO_BASE_LAYER.format(attribute="weight"))

    @property
    def bias(self) -> torch.Tensor:
        raise AttributeError(NO_BASE_LAYER.format(attribute="bias"))

    def update_layer(
        self,
        adapter_name: str,
        config: ReinConfig,
        settings: ReinSettings,
        patch_size: int,
        device: torch.device | None = None,
        content_queries: bool = False,
    ) -> None:
        """Create and initialise the tensors of a new adapter, as the official Rein code does (see REIN.md);
        `content_queries` adds the map from linked queries to a decoder's content queries."""
        num_layers, hidden_size, token_length = settings.num_layers, settings.hidden_size, config.token_length
        factory = {"device": device}
        if config.lora_dim is None:
            bound = math.sqrt(6.0 / (3 * patch_size * patch_size + hidden_size))
            tokens = torch.empty(num_layers, token_length, hidden_size, **factory)
            self.rein_tokens[adapter_name] = nn.Parameter(nn.init.uniform_(tokens, -bound, bound))
        else:
            rank = config.lora_dim
            bound = math.sqrt(6.0 / (3 * patch_size * patch_size + math.sqrt(hidden_size * rank)))
            tokens_a = torch.empty(num_layers, token_length, rank, **factory)
            tokens_b = torch.empty(num_layers, rank, hidden_size, **factory)
            self.rein_tokens_a[adapter_name] = nn.Parameter(nn.init.uniform_(tokens_a, -bound, bound))
            self.rein_tokens_b[adapter_name] = nn.Parameter(nn.init.uniform_(tokens_b, -bound, bound))
        # nn.Linear's own init is kaiming_uniform(a=sqrt(5)) for the weight and the torch default for the bias
        self.rein_token2feat[adapter_name] = nn.Linear(hidden_size, hidden_size, **factory)
        self.rein_delta_f[adapter_name] = nn.Linear(hidden_size, hidden_size, **factory)
        if config.zero_mlp_delta_f:
            nn.init.zeros_(self.rein_delta_f[adapter_name].weight)
            nn.init.zeros_(self.rein_delta_f[adapter_name].bias)
        else:
            # stored as [1], not 0-dim: FSDP2's fully_shard refuses scalar parameters
            self.rein_scale[adapter_name] = nn.Parameter(torch.full((1,), config.scale_init, **factory))
        if config.link_token_to_query:
            self.rein_transform[adapter_name] = nn.Linear(hidden_size, config.query_dims, **factory)
            self.rein_merge[adapter_name] = nn.Linear(3 * config.query_dims, config.query_dims, **factory)
            if content_queries:
                self.rein_query_feat[adapter_name] = nn.Linear(config.query_dims, config.query_dims, **factory)
        self.rein_settings[adapter_name] = settings

    def get_tokens(self, adapter_name: str, row: int | None = None) -> torch.Tensor:
        """Tokens of one layer (`[M, C]`), or of all layers (`[L, M, C]`) when `row` is None."""
        if adapter_name in self.rein_tokens:
            tokens = self.rein_tokens[adapter_name]
            return tokens if row is None else tokens[row]
        tokens_a, tokens_b = self.rein_tokens_a[adapter_name], self.rein_tokens_b[adapter_name]
        if row is None:
            return tokens_a @ tokens_b  # [L, M, r] @ [L, r, C] -> [L, M, C]
        return tokens_a[row] @ tokens_b[row]  # [M, r] @ [r, C] -> [M, C]

    def get_queries(self, adapter_name: str) -> torch.Tensor:
        """The `[M, Q]` object queries linked from all layers' tokens (max, mean and last over layers, merged)."""
        if adapter_name not in self.rein_transform:
            raise ValueError(
                f"Adapter '{adapter_name}' has no query linking; create it with ReinConfig(link_token_to_query=True)."
            )
        projected = self.rein_transform[adapter_name](self.get_tokens(adapter_name))  # [L, M, Q]
        projected = projected.permute(1, 2, 0)  # [M, Q, L]
        pooled = torch.stack([projected.amax(-1), projected.mean(-1), projected[..., -1]], dim=-1)  # [M, Q, 3]
        return self.rein_merge[adapter_name](pooled.flatten(-2))  # [M, 3Q] -> [M, Q]

    def linking_adapter(self) -> str | None:
        """The active adapter that links its tokens to the decoder's queries in this forward, or None (the decoder's
        own tables)."""
        if self.disable_adapters:
            return None
        in_use = self.active_adapters if self.sample_groups is None else list(self.sample_groups[1])
        linking = [name for name in in_use if name in self.rein_transform]
        if not linking:
            return None
        if self.sample_groups is not None:
            raise ValueError(
                f"Adapters {linking} link their tokens to the decoder's queries, which are shared by the whole batch: "
                "they cannot take part in a mixed-adapter batch. Run their samples as batches of their own."
            )
        if len(linking) > 1:
            raise ValueError(
                f"Active adapters {linking} all link their tokens to the decoder's queries, which can hold only one "
                "adapter's queries: activate one of them."
            )
        return linking[0]

    def _weights(self, adapter_name: str) -> list[torch.Tensor]:
        """Every tensor the input-independent projections of an adapter depend on."""
        tables = [self.rein_tokens, self.rein_tokens_a, self.rein_tokens_b, self.rein_scale]
        tensors = [table[adapter_name] for table in tables if adapter_name in table]
        for linear in (self.rein_token2feat[adapter_name], self.rein_delta_f[adapter_name]):
            tensors += [linear.weight, linear.bias]
        return tensors

    def _scale(self, adapter_name: str) -> torch.Tensor | float:
        return self.rein_scale[adapter_name] if adapter_name in self.rein_scale else 1.0

    def _compute_projections(self, adapter_name: str, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `row`'s keys `[C, M]` (softmax temperature folded in) and values `[M, C]` (token2feat, delta_f and
        the scale folded in; with the softmax, whose rows sum to 1, they also carry delta_f's bias)."""
        settings = self.rein_settings[adapter_name]
        tokens = self.get_tokens(adapter_name, row)  # [M, C]
        keys = tokens.T * settings.hidden_size**-0.5 if settings.use_softmax else tokens.T
        # token 0 takes part in the softmax but has no value: a zero row
        values = nn.functional.pad(self.rein_token2feat[adapter_name](tokens[1:]), (0, 0, 1, 0))  # [M, C]
        delta_f = self.rein_delta_f[adapter_name]
        values = values @ delta_f.weight.T
        if settings.use_softmax:
            values = values + delta_f.bias
        return keys, values * self._scale(adapter_name)

    def _delta_weight(self, adapter_name: str, fold_residual: bool) -> torch.Tensor:
        """`scale * delta_f.weight^T` (`[C, C]`, shared by all layers); `fold_residual` adds the identity, so that
        `x @ weight = x + scale * x @ W^T`."""
        weight = self.rein_delta_f[adapter_name].weight.T * self._scale(adapter_name)
        if fold_residual:  # an out-of-place add, so that ONNX export can trace it
            weight = weight + torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
        return weight

    def _cached(self, key: tuple, compute: Callable[..., Any], adapter_name: str, *args: Any) -> Any:
        """`compute(adapter_name, *args)` in the adapter's own precision (autocast off: the GEMMs that use the
        result cast it), cached under `key` while no gradient is recorded, until a weight is replaced or changed in
        place (tracked by identity, address and version counter; writes through `.data` bypass the version counter:
        call `train()` or `eval()` after them, which empty the cache). Traced code (`torch.compile`, `torch.export`)
        computes them in the graph: a cache there would freeze the weights into the program."""
        with torch.autocast(self.device_anchor.device.type, enabled=False):
            if torch.is_grad_enabled() or torch.compiler.is_compiling():
                return compute(adapter_name, *args)
            weights = self._weights(adapter_name)
            state = tuple((id(weight), weight.data_ptr(), weight._version) for weight in weights)
            cached = self.projection_cache.get(key)
            if cached is None or cached[0] != state:
                # the entry keeps the weights alive, so their ids cannot be reused by other tensors meanwhile
                cached = (state, weights, compute(adapter_name, *args))
                self.projection_cache[key] = cached
            return cached[2]

    def train(self, mode: bool = True) -> ReinLayer:
        self.projection_cache.clear()
        return super().train(mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        # in place, as PEFT deletes from its containers: a reference held elsewhere no longer holds the adapter either
        for key in [key for key in self.projection_cache if key[0] == adapter_name]:
            del self.projection_cache[key]

    def _untouched_rows(self, adapter_name: str, row: int, length: int) -> slice:
        """The rows of the sequence that pass through unrefined: the prefix tokens, and tokens that the model inserted
        in front of the sequence between the adapted layers (EoMT puts its queries there before its last blocks),
        which are refined only with `refine_query_tokens`. The sequence's length at the first adapted layer of this
        forward tells how many were inserted."""
        if row == 0:
            self.sequence_lengths[adapter_name] = length
        first = self.sequence_lengths.get(adapter_name, length)
        if length < first:
            raise ValueError(
                f"The sequence shrank from {first} to {length} tokens between the layers Rein adapts (at adapted "
                f"layer {row}): the model drops tokens inside its encoder, so Rein cannot tell patch tokens from the "
                "rest there. Set `ReinConfig(layers_to_transform=...)` to the layers before that."
            )
        settings = self.rein_settings[adapter_name]
        num_inserted = length - first
        start = num_inserted if settings.refine_query_tokens else 0
        return slice(start, num_inserted + settings.num_prefix_tokens)

    def _check_weights(self, adapter_name: str) -> None:
        """Refuse adapter tensors that Rein cannot compute with: still sharded by FSDP2 when the layers run, or
        quantized (a backbone quantizer applied to the whole model)."""
        for full_name, weight in self.named_parameters():
            table, owner, *rest = full_name.split(".")  # e.g. "rein_token2feat", "default", "weight"
            if owner != adapter_name:
                continue
            name = ".".join([table, *rest])
            if isinstance(weight, DTensor):
                raise ValueError(
                    f"Rein's tensor '{name}' of adapter '{adapter_name}' is still sharded (a DTensor) while the "
                    "encoder layers run. FSDP2 gathers a module's parameters only around that module's own forward, "
                    "but every encoder layer reads Rein's tensors, so the ReinLayer must not be sharded on its own. "
                    "Shard the encoder layers one by one and then the whole model, which gathers Rein's tensors for "
                    "the whole forward: `for layer in layers: fully_shard(layer)`, then `fully_shard(model)`."
                )
            if is_quantized(weight):
                raise ValueError(
                    f"Rein's tensor '{name}' of adapter '{adapter_name}' is quantized ({type(weight).__name__}, "
                    f"{weight.dtype}). Rein's tensors are trained and must stay in floating point: quantize only the "
                    "frozen backbone, e.g. `quantize_(model, config, filter_fn=rein_peft.is_backbone_linear)`, or "
                    "quantize the base model before `get_peft_model`."
                )

    def refine(self, hidden_states: torch.Tensor, adapter_name: str, row: int) -> torch.Tensor:
        """Apply one adapter's refinement of layer `row` to that layer's output: hidden states, or, for a
        channels-first stage, a `[B, C, H, W]` feature map, refined as its `[B, H*W, C]` tokens (as the official code
        does for ConvNeXt and ResNet) and given back as `[B, C, H, W]`."""
        if not self.rein_settings[adapter_name].channels_first:
            return self._refine_tokens(hidden_states, adapter_name, row)
        settings = self.rein_settings[adapter_name]
        if hidden_states.dim() != 4 or hidden_states.shape[1] != settings.hidden_size:
            raise ValueError(
                f"Rein adapter '{adapter_name}' was built for [batch, {settings.hidden_size}, height, width] feature "
                f"maps, but the layer produced a tensor of shape {tuple(hidden_states.shape)}."
            )
        batch, channels, height, width = hidden_states.shape
        # [B, H*W, C]; no copy where the map is stored channels-last (as a refined map is)
        tokens = hidden_states.flatten(2).transpose(1, 2).contiguous()
        refined = self._refine_tokens(tokens, adapter_name, row)  # [B, H*W, C]
        return refined.transpose(1, 2).reshape(batch, channels, height, width)

    def _refine_tokens(self, hidden_states: torch.Tensor, adapter_name: str, row: int) -> torch.Tensor:
        """Apply one adapter's refinement of layer `row` to that layer's output hidden states.

        The same numbers as REIN.md's `F + scale * delta_f(softmax(F T^T / sqrt(C))[:, 1:] @ token2feat(T[1:]) + F)`,
        rearranged into two small GEMMs (`[B*S, C] @ [C, M]`, `[B*S, M] @ [M, C]`) and one `C x C` GEMM over the
        whole sequence. Nothing splits, permutes or concatenates the hidden states: the untouched rows of the result
        (prefix tokens, see `_untouched_rows`) are put back instead. Works on `[B, S, C]` and on spatial
        `[B, H, W, C]` hidden states (no prefix tokens).
        """
        settings = self.rein_settings[adapter_name]
        if not settings.batch_first:
            hidden_states = hidden_states.transpose(0, 1)
        hidden, num_prefix = hidden_states.shape[-1], settings.num_prefix_tokens
        untouched = self._untouched_rows(adapter_name, row, hidden_states.shape[1])
        if row == 0 and not torch.compiler.is_compiling():  # once per forward
            self._check_weights(adapter_name)
        if hidden != settings.hidden_size:
            raise ValueError(
                f"Rein adapter '{adapter_name}' was built for hidden size {settings.hidden_size}, but the layer "
                f"produced hidden states of shape {tuple(hidden_states.shape)}. Rein refines token sequences "
                "[batch, tokens, hidden] (or [batch, height, width, hidden]); channels-first layers are not supported."
            )
        if num_prefix and (hidden_states.dim() != 3 or hidden_states.shape[1] <= num_prefix):
            raise ValueError(
                f"Rein expects {num_prefix} prefix tokens followed by patch tokens, but the layer produced hidden "
                f"states of shape {tuple(hidden_states.shape)}. Is the input image smaller than one patch, or is "
                "`num_prefix_tokens` wrong?"
            )
        keys, values = self._cached((adapter_name, row), self._compute_projections, adapter_name, row)  # [C,M], [M,C]
        features = hidden_states.to(keys.dtype)  # [B, S, C]
        x = features.reshape(-1, hidden)  # [B*S, C]
        # In full precision the residual can ride in the GEMM, x @ (I + W) = x + x @ W, saving a pass over the
        # hidden states; with autocast or a lower-precision base it stays a separate add, so it is never rounded.
        fold_residual = hidden_states.dtype == x.dtype and not torch.is_autocast_enabled(x.device.type)
        weight_key = (adapter_name, "delta_f", fold_residual)  # shared by all layers
        weight = self._cached(weight_key, self._delta_weight, adapter_name, fold_residual)  # [C, C]

        attn = x @ keys  # [B*S, M]
        if settings.use_softmax:
            attn = attn.softmax(dim=-1)
        # [B, S, C] @ [C, C] is one [B*S, C] GEMM whose result is not a view: an output that is a view of another
        # tensor, written in place below, crashes FSDP2's backward hooks (SIGSEGV in register_hook)
        update = features @ weight  # [B, S, C]
        # in-place ops are not autocast: cast here
        update.view(-1, hidden).addmm_(attn.to(update.dtype), values.to(update.dtype))  # [B*S, M] @ [M, C]
        if not settings.use_softmax:
            update = update + self.rein_delta_f[adapter_name].bias * self._scale(adapter_name)
        if fold_residual:
            update[:, untouched] = hidden_states[:, untouched]  # prefix (and inserted) tokens pass through untouched
            refined = update
        else:
            update[:, untouched] = 0
            refined = hidden_states + update.to(hidden_states.dtype)
        return refined if settings.batch_first else refined.transpose(0, 1)

    def set_sample_adapters(self, adapter_names: list[str] | None) -> None:
        """Refine sample i of the following forwards with adapter `adapter_names[i]` (`"__base__"`: none), whatever
        the active adapters are; `None` ends this."""
        if adapter_names is None:
            self.sample_groups = None
            return
        groups = {}
        for adapter_name in dict.fromkeys(adapter_names):
            if adapter_name != BASE_ADAPTER_NAME:
                positions = [index for index, name in enumerate(adapter_names) if name == adapter_name]
                groups[adapter_name] = torch.tensor(positions, device=self.device_anchor.device)
        self.sample_groups = (len(adapter_names), groups)

    def _refine_mixed_batch(self, hidden_states: torch.Tensor, layer_name: str) -> torch.Tensor:
        """Refine each sample with its own adapter: gather its group's samples, refine them, scatter them back."""
        batch_size, groups = self.sample_groups
        batch_dim = 0 if next(iter(self.rein_settings.values())).batch_first else 1  # one layout per model
        if hidden_states.shape[batch_dim] != batch_size:
            raise ValueError(
                f"`adapter_names` has {batch_size} entries, but the batch has {hidden_states.shape[batch_dim]} "
                "samples: give one adapter name (or '__base__') per sample."
            )
        refined = hidden_states.clone()  # the samples of "__base__" keep their features
        for adapter_name, positions in groups.items():
            settings = self.rein_settings[adapter_name]
            if layer_name not in settings.layer_rows:
                continue
            samples = hidden_states.index_select(batch_dim, positions)
            samples = self.refine(samples, adapter_name, settings.layer_rows[layer_name])
            refined.index_copy_(batch_dim, positions, samples)
        return refined

    def refine_layer_output(self, layer_name: str, output: Any) -> Any:
        """Refine a layer's output with every active adapter that targets this layer, in order (or, in a
        mixed-adapter batch, each sample with its own adapter)."""
        if self.disable_adapters:
            return output
        hidden_states = output[0] if isinstance(output, tuple) else output
        if self.sample_groups is not None:
            hidden_states = self._refine_mixed_batch(hidden_states, layer_name)
        else:
            for adapter_name in self.active_adapters:
                settings = self.rein_settings.get(adapter_name)
                if settings is not None and layer_name in settings.layer_rows:
                    hidden_states = self.refine(hidden_states, adapter_name, settings.layer_rows[layer_name])
        return (hidden_states, *output[1:]) if isinstance(output, tuple) else hidden_states

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # A Rein layer has no base layer (PEFT's default would recurse forever): it follows its device anchor.
        self.move_adapter(adapter_name, device=self.device_anchor.device if device is None else device)

    def move_adapter(
        self, adapter_name: str, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> None:
        """Move one adapter's tensors to `device` and/or cast them to `dtype`, leaving the other adapters as they are.

        Args:
            adapter_name: The adapter to move.
            device: Where its tensors go; `None` keeps their device.
            dtype: Their new floating dtype; `None` keeps it.
        """
        for name in self.adapter_layer_names:
            container = getattr(self, name)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):  # a new Parameter would require grad, frozen or not
                container[adapter_name] = nn.Parameter(item.to(device, dtype), requires_grad=item.requires_grad)
            else:
                container[adapter_name] = item.to(device, dtype)


class ReinHook:
    """Forward hook on one encoder layer: hands the layer's output to the `ReinLayer`.

    A callable object rather than a closure, so that `copy.deepcopy` points the copy's hook at the copy's adapter and
    the model stays picklable.
    """

    def __init__(self, rein_layer: ReinLayer, layer_name: str) -> None:
        self.rein_layer = rein_layer
        self.layer_name = layer_name

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.rein_layer.refine_layer_output(self.layer_name, output)


class ReinLinkedQueries(nn.Module):
    """Stands in for a mask decoder's learnable query table (an `nn.Embedding` whose `weight` the decoder reads).

    While the model runs a forward with an adapter made with `link_token_to_query=True`, `weight` is that adapter's
    linked `[M, Q]` queries (put here by `ReinQueryHook`); otherwise it is the original table's. `unload()` puts the
    original table (`base_layer`) back.
    """

    def __init__(self, base_layer: nn.Embedding, role: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.role = role
        self.linked_weight: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight if self.linked_weight is None else self.linked_weight

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(indices, self.weight)


def summed_queries(rein_layers: list[ReinLayer], adapter_name: str) -> torch.Tensor:
    """The `[M, Q]` queries an adapter links from its tokens: those of its one `ReinLayer`, or, on a staged backbone,
    the sum of every stage's (as the official code gives the decoder)."""
    per_stage = [layer.get_queries(adapter_name) for layer in rein_layers if adapter_name in layer.rein_transform]
    if not per_stage:
        raise ValueError(
            f"Adapter '{adapter_name}' has no query linking; create it with ReinConfig(link_token_to_query=True)."
        )
    return sum(per_stage[1:], per_stage[0])


def linked_queries(rein_layers: list[ReinLayer]) -> dict[str, torch.Tensor] | None:
    """What the decoder's query tables hold in this forward: role (see `QUERY_TABLE_ROLES`) -> `[M, Q]`, from the
    active adapter that links its tokens to queries; `None` (the decoder's own tables) when none does."""
    linking = {layer.linking_adapter() for layer in rein_layers} - {None}
    if not linking:
        return None
    (adapter_name,) = linking  # every ReinLayer of a model has the same active adapters
    queries = summed_queries(rein_layers, adapter_name)  # [M, Q]
    content = queries
    for layer in rein_layers:  # the map to content queries sits on the first stage
        if adapter_name in layer.rein_query_feat:
            content = layer.rein_query_feat[adapter_name](queries)
    return {QUERY_CONTENT: content, QUERY_POSITION: queries}


class ReinQueryHook:
    """Forward pre-hook (`link=True`) and forward hook (`link=False`, always called) on the model: before each forward
    they put the active adapter's linked queries into every `ReinLinkedQueries` of the model, copies made for
    `modules_to_save` included, and after it they take them out again.

    The hooks sit on the model rather than on the decoder and find the model's `ReinLayer`s when they run, so that no
    module that PEFT copies holds a reference to one (a copy would copy the adapter with it).
    """

    def __init__(self, link: bool) -> None:
        self.link = link

    def __call__(self, model: nn.Module, args: tuple, *output: Any) -> None:
        modules = list(model.modules())
        rein_layers = [module for module in modules if isinstance(module, ReinLayer)]
        queries = linked_queries(rein_layers) if self.link else None
        for module in modules:
            if isinstance(module, ReinLinkedQueries):
                module.linked_weight = None if queries is None else queries[module.role]


class ReinImageSizeCheck:
    """Forward pre-hook on the patch embedding: refuse images smaller than one patch with a clear error."""

    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size

    def __call__(self, module: nn.Module, args: tuple) -> None:
        pixel_values = args[0] if args else None
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 4:
            height, width = pixel_values.shape[-2:]
            if min(height, width) < self.patch_size:
                raise ValueError(
                    f"The images are {height}x{width} pixels, smaller than one {self.patch_size}x{self.patch_size} "
                    "patch, so the model sees no patch to refine. Resize them with the model's image processor "
                    "(`AutoImageProcessor.from_pretrained(...)`), which brings them to the size the model expects."
                )
