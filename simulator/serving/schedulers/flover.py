"""Flover's temporal fusion (HiPC '23): iteration-level batching with whole reservations.
Between iterations, the requests waiting join (first come first served, at most
`max_sequences` running and `max_tokens` prompt tokens a step) if their prompts and outputs
fit the KV cache whole (no paging: nothing is ever preempted); the next step prefills them
(a step of its own: Flover's main stream runs the new requests' context phase, then fuses
them into the generation batch), otherwise every running sequence decodes one token. A
finished request leaves at once and frees its memory (Flover's memory shuffle).
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.serving.schedulers.base import Running, Scheduler, Step


@dataclass
class Flover(Scheduler):
    name = "flover"

    def next_step(self, now: float) -> Step | None:
        admitted = self.admit(now)
        if admitted:
            return Step("prefill", tuple(admitted))
        return Step("decode", tuple(self.running)) if self.running else None

    def admit(self, now: float) -> list[Running]:
        """Move the requests that join now (whole reservations) from waiting to running."""
        admitted: list[Running] = []
        tokens = 0
        for seq in self.waiting:
            whole = seq.request.prompt + seq.request.output
            if (len(self.running) + len(admitted) >= self.max_sequences
                    or (admitted and tokens + seq.request.prompt > self.max_tokens)
                    or not self.kv.can_hold(whole)):
                break
            self.kv.hold(seq.request.id, whole)
            admitted.append(seq)
            tokens += seq.request.prompt
        for seq in admitted:
            self.waiting.popleft()
            seq.scheduled_s = now
        self.running.extend(admitted)
        return admitted
