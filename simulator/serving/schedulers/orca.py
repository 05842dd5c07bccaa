"""Iteration-level batching with whole reservations (Orca, OSDI '22; Flover's temporal
fusion): between iterations, the requests waiting join (first come first served, at most
`max_sequences` running and `max_tokens` prompt tokens a step) if their prompts and
outputs fit the KV cache whole (no paging: nothing is ever preempted); the next step
prefills them, otherwise every running sequence decodes one token. A finished request
leaves at once and frees its memory (Flover's memory shuffle). Orca's selective batching
runs a joining prompt in the same iteration as the decodes; here it is a step of its own,
as in vLLM (a first cut).
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.serving.schedulers.base import Running, Scheduler, Step


@dataclass
class Orca(Scheduler):
    name = "orca"

    def next_step(self, now: float) -> Step | None:
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
        if admitted:
            for seq in admitted:
                self.waiting.popleft()
                seq.scheduled_s = now
            self.running.extend(admitted)
            return Step("prefill", tuple(admitted))
        return Step("decode", tuple(self.running)) if self.running else None
