"""Step times for the serving loop, from the engine (memoized).

A serving step is one forward of the model over a batch: a prefill of some prompts, or one
decode token for each of some running sequences. Its time, energy and memory come from the
same simulation as `simulate` (simulator.api) on the same machine and parallelism, memoized
by the step's signature: the phase, the number of sequences, and their mean length rounded
up to a multiple of `bucket` tokens, or of a smaller power of two on short steps so that
the rounding stays within 1/16 of the length (bucket 1: the exact mean, rounded up). A batch of
unequal prompts is timed as that many prompts of their mean length (their tokens kept; the
attention pairs of unequal lengths, Σp², are then under-counted).

A mixed step (Orca's selective batching, Sarathi's chunked prefill) feeds some sequences a
chunk of their prompt and the others one decode token. Its non-attention ops see one matrix
of all its tokens, so they are timed as one prefill of that many tokens; its attention is
per sequence, so the prefill's attention is swapped for a decode step's attention over the
decoding sequences and a prefill's attention over the chunks, scaled by the pairs each chunk
attends to (c·before + c²/2 for c new tokens after `before` cached ones) over those of the
prompts timed (c²/2). Energy follows: the ops' own, plus static power over their time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from simulator.report import Result


@dataclass(frozen=True)
class Split:
    """A step's totals and its attention ops' share (time on the step's path, energy)."""

    latency_s: float
    energy_j: float
    launch_s: float
    attention_s: float
    attention_j: float


@dataclass(frozen=True)
class StepCost:
    """What one step takes on the whole machine."""

    latency_s: float
    energy_j: float
    launch_s: float = 0.0  # of the latency, host launches (the rest: the kernels)


class StepTimer:
    """Times prefill and decode steps of `model` on `hw` (a chip or a system file) with the
    parallelism and runtime keywords `simulate` takes."""

    def __init__(self, hw: Any, model: Any, bucket: int = 16, devices: int = 1,
                 **run: Any) -> None:
        self.hw, self.model, self.bucket, self.run = hw, model, bucket, run
        self.devices = devices  # the devices a step keeps busy (for idle power)
        self.memo: dict[tuple[str, int, int], Result] = {}
        self.splits: dict[tuple[str, int, int], Split] = {}

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

    def split(self, phase: str, batch: int, length: int) -> Split:
        """The step's totals and its attention ops' time and energy (one detailed run)."""
        from simulator.api import simulate

        key = (phase, batch, length)
        if key not in self.splits:
            shape = {"prompt": length} if phase == "prefill" else {"context": length}
            done = simulate(self.hw, self.model, phase=phase, batch=batch, derive=True,
                            detail=True, **shape, **self.run)
            static_w = ((done.energy_j - sum(op.energy_j for op in done.ops)) / done.latency_s
                        if done.latency_s else 0.0)
            attention = [op for op in done.ops if op.kind == "attention"]
            seconds = sum(op.end_s - op.start_s for op in attention)
            self.splits[key] = Split(
                done.latency_s, done.energy_j, done.launch_s, seconds,
                sum(op.energy_j for op in attention) + static_w * seconds)
        return self.splits[key]

    def mixed(self, chunks: Sequence[tuple[int, int]], contexts: Sequence[int]) -> StepCost:
        """One mixed step: `chunks` (new tokens, tokens cached before them) of prompts being
        prefilled, and a decode token for each sequence of `contexts` cached tokens."""
        tokens = sum(new for new, _ in chunks) + len(contexts)
        base = self.split("prefill", 1, self.length([tokens]))
        latency = base.latency_s - base.attention_s
        energy = base.energy_j - base.attention_j
        if contexts:
            decode = self.split("decode", len(contexts), self.length(contexts))
            latency, energy = latency + decode.attention_s, energy + decode.attention_j
        if chunks:
            length = self.length([new for new, _ in chunks])
            prompts = self.split("prefill", len(chunks), length)
            pairs = sum(new * before + new * new / 2 for new, before in chunks)
            scale = pairs / (len(chunks) * length * length / 2)
            latency += prompts.attention_s * scale
            energy += prompts.attention_j * scale
        return StepCost(latency, energy, base.launch_s)

    def prefill(self, prompts: Sequence[int]) -> StepCost:
        done = self.result("prefill", len(prompts), self.length(prompts))
        return StepCost(done.latency_s, done.energy_j, done.launch_s)

    def decode(self, contexts: Sequence[int]) -> StepCost:
        """One new token for each sequence, `contexts` the tokens already in its cache."""
        done = self.result("decode", len(contexts), self.length(contexts))
        return StepCost(done.latency_s, done.energy_j, done.launch_s)
