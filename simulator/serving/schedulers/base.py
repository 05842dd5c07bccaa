"""What every scheduler sees and returns."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from simulator.serving.kvcache import BlockManager
from simulator.serving.requests import Request


@dataclass
class Running:
    """A request in the server: the output tokens it has made and when things happened."""

    request: Request
    generated: int = 0
    scheduled_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    preemptions: int = 0
    replica: int = 0
    #: mixed steps: tokens of its prompt (and outputs to recompute) not yet in the KV cache
    pending: int = 0

    @property
    def cached(self) -> int:
        """Tokens whose keys and values the next decode step reads (prompt + outputs so far,
        but the newest, which that step feeds in)."""
        return self.request.prompt + max(0, self.generated - 1)

    @property
    def done(self) -> bool:
        return self.generated >= self.request.output


@dataclass(frozen=True)
class Step:
    """One forward: prefill `sequences` (their prompts, plus outputs made before a
    preemption, recomputed), or one decode token for each; or a round of instances (each
    sequence its own batch-one step: its prefill, or its next token); or a mixed step
    (Orca's selective batching, Sarathi's chunks): each sequence fed its `tokens`, a chunk
    of its pending prompt, or one token if it is decoding."""

    kind: Literal["prefill", "decode", "instances", "mixed"]
    sequences: tuple[Running, ...]
    tokens: tuple[int, ...] = ()


@dataclass
class Scheduler:
    """A batching policy; `max_sequences` caps a step's batch and `max_tokens` a prefill's
    tokens. `waiting` holds requests that have arrived (the loop queues them as they do),
    in order."""

    kv: BlockManager
    max_sequences: int = 256
    max_tokens: int = 8192
    waiting: deque[Running] = field(default_factory=deque)
    running: list[Running] = field(default_factory=list)
    preemptions: int = 0

    name = "base"
    #: prefills prompts in chunks of at most `max_tokens` (so any prompt length is served)
    chunked = False

    def next_step(self, now: float) -> Step | None:
        """The step to run at `now` (None: nothing to run until the next arrival)."""
        raise NotImplementedError

    def finished(self, step: Step, now: float) -> list[Running]:
        """Take the step's completed sequences out (their KV blocks freed) and return them;
        by default each leaves as soon as it is done."""
        done = [seq for seq in self.running if seq.done]
        for seq in done:
            seq.finish_s = now
            self.kv.release(seq.request.id)
        if done:
            self.running = [seq for seq in self.running if not seq.done]
        return done
