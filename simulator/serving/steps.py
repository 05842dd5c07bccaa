"""Step times for the serving loop, from the engine (memoized).

A serving step is one forward of the model over a batch: a prefill of some prompts, or one
decode token for each of some running sequences. Its time, energy and memory come from the
same simulation as `simulate` (simulator.api) on the same machine and parallelism, memoized
by the step's signature: the phase, the number of sequences, and their mean length rounded
up to a multiple of `bucket` tokens, or of a smaller power of two on short steps so that
the rounding stays within 1/16 of the length (bucket 1: the exact mean, rounded up). A batch of
unequal prompts is timed as that many prompts of their mean length (their tokens kept; the
attention pairs of unequal lengths, Σp², are then under-counted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from simulator.report import Result


@dataclass(frozen=True)
class StepCost:
    """What one step takes on the whole machine."""

    latency_s: float
    energy_j: float


class StepTimer:
    """Times prefill and decode steps of `model` on `hw` (a chip or a system file) with the
    parallelism and runtime keywords `simulate` takes."""

    def __init__(self, hw: Any, model: Any, bucket: int = 16, devices: int = 1,
                 **run: Any) -> None:
        self.hw, self.model, self.bucket, self.run = hw, model, bucket, run
        self.devices = devices  # the devices a step keeps busy (for idle power)
        self.memo: dict[tuple[str, int, int], Result] = {}

    def length(self, lengths: Sequence[int]) -> int:
        """The bucketed mean length of a step's sequences: rounded up to a multiple of the
        bucket, or of a power of two at most 1/16 of the length where that is smaller (a
        short prompt is timed at its own length, within 1/16 of it)."""
        mean = max(1, math.ceil(sum(lengths) / len(lengths)))
        width = min(self.bucket, 1 << max(0, (mean // 16).bit_length() - 1))
        return math.ceil(mean / width) * width

    def result(self, phase: str, batch: int, length: int) -> Result:
        from simulator.api import simulate

        key = (phase, batch, length)
        if key not in self.memo:
            shape = {"prompt": length} if phase == "prefill" else {"context": length}
            self.memo[key] = simulate(self.hw, self.model, phase=phase, batch=batch,
                                      derive=True, detail=False, **shape, **self.run)
        return self.memo[key]

    def prefill(self, prompts: Sequence[int]) -> StepCost:
        done = self.result("prefill", len(prompts), self.length(prompts))
        return StepCost(done.latency_s, done.energy_j)

    def decode(self, contexts: Sequence[int]) -> StepCost:
        """One new token for each sequence, `contexts` the tokens already in its cache."""
        done = self.result("decode", len(contexts), self.length(contexts))
        return StepCost(done.latency_s, done.energy_j)
