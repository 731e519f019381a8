"""What the Rein training examples share: Rein's command-line flags, input checks and the results table."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field

import torch

import rein_peft

# where the examples write by default (relative to the working directory; .gitignore covers it in a checkout)
OUTPUTS = "outputs"
# Trainer settings that keep a CPU run quiet: pinned memory only helps copies to a GPU (torch warns on every epoch)
QUIET_ON_CPU = {"dataloader_pin_memory": torch.cuda.is_available()}


@dataclass
class ReinArguments:
    """Rein's configuration, as command-line flags (see `rein_peft.ReinConfig`)."""

    token_length: int = field(default=16, metadata={"help": "Learnable tokens per layer (the paper uses 100)."})
    lora_dim: int | None = field(default=None, metadata={"help": "Rank of low-rank tokens; default full rank."})
    scale_init: float = field(default=1e-3, metadata={"help": "Initial value of the learnable scale."})
    use_softmax: bool = field(default=True, metadata={"help": "Softmax over the token similarities."})
    zero_mlp_delta_f: bool = field(default=False, metadata={"help": "Start the adapter as an exact identity."})
    layers_to_transform: list[int] | None = field(default=None, metadata={"help": "Adapt only these layers."})
    link_token_to_query: bool = field(
        default=False, metadata={"help": "Also train the token-to-query linking layers (used by mask decoders)."}
    )

    def to_config(self, modules_to_save: list[str]) -> rein_peft.ReinConfig:
        return rein_peft.ReinConfig(
            token_length=self.token_length,
            lora_dim=self.lora_dim,
            scale_init=self.scale_init,
            use_softmax=self.use_softmax,
            zero_mlp_delta_f=self.zero_mlp_delta_f,
            layers_to_transform=self.layers_to_transform,
            link_token_to_query=self.link_token_to_query,
            modules_to_save=modules_to_save,
        )


def fail(message: str) -> None:
    """Stop with one clear line, as a command-line tool does."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_writable(output_dir: str) -> None:
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        fail(f"cannot write to --output_dir {output_dir!r} ({error.strerror}); choose a folder you can write to.")


def folder_size_mb(folder: str, filename: str) -> float:
    return os.path.getsize(os.path.join(folder, filename)) / 1e6


def print_results_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    print("-" * (width + 24))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("-" * (width + 24))
