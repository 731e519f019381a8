"""SoMA (Yun et al., "SoMA: Singular Value Decomposed Minor Components Adaptation for Domain Generalizable
Representation Learning", CVPR 2025) with PEFT's own LoRA, as PEFT does PiSSA: a `LoraConfig` in SoMA's recipe
(`soma_config`), an initialisation from the minor singular components (`initialize_soma`) and a save that loads into
the unmodified model with plain PEFT (`save_soma_adapter`). Nothing new is registered with PEFT: the adapters are
LoRA adapters.

This package depends on PEFT, torch and safetensors only, never on the rest of rein_peft.
"""

from .config import SOMA_ALPHA, SOMA_RANK, SomaTargets, find_soma_targets, soma_config
from .conversion import save_soma_adapter
from .initialization import initialize_soma, minor_singular_factors

__all__ = [
    "SOMA_ALPHA",
    "SOMA_RANK",
    "SomaTargets",
    "find_soma_targets",
    "initialize_soma",
    "minor_singular_factors",
    "save_soma_adapter",
    "soma_config",
]
