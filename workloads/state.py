"""What a model carries between steps: a KV cache or a recurrent state per layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class State:
    """Per-layer state for one step.

    `keys`/`values`: (B, Hkv, position + T, D) preallocated caches (Transformer); the step
    writes its T new tokens at `position`. `recurrent`: (B, d) fp32 MLGRU states.
    """

    position: int = 0
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    recurrent: list[torch.Tensor] = field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values, *self.recurrent]
