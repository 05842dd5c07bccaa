"""Orca (OSDI '22): iteration-level scheduling with selective batching. Requests join
between iterations as in Flover (whole reservations, first come first served, at most
`max_sequences` running and `max_tokens` prompt tokens an iteration; nothing is ever
preempted), but a joining prompt runs in the same iteration as the running sequences'
decode tokens: one mixed step, its linear ops batched over all the tokens, its attention
per sequence (simulator.serving.steps).
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.serving.schedulers.base import Step
from simulator.serving.schedulers.flover import Flover


@dataclass
class Orca(Flover):
    name = "orca"

    def next_step(self, now: float) -> Step | None:
        decoding = tuple(self.running)
        admitted = self.admit(now)
        for seq in admitted:
            seq.pending = seq.request.prompt
        if not self.running:
            return None
        return Step("mixed", (*decoding, *admitted),
                    (1,) * len(decoding) + tuple(s.request.prompt for s in admitted))
