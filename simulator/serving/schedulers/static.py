"""Request-level batching, as FasterTransformer serves without in-flight batching: when the
machine is free, the requests waiting (up to `max_sequences`, their prompts and outputs
reserved whole in the KV cache) form a batch that is prefilled together and decoded until
its longest member is done; finished members keep their slot, and the batch's requests
return together when it ends. Arrivals meanwhile wait for the next batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.serving.schedulers.base import Running, Scheduler, Step


@dataclass
class Static(Scheduler):
    name = "static"

    def next_step(self, now: float) -> Step | None:
        if self.running:
            return Step("decode", tuple(self.running))
        batch: list[Running] = []
        for seq in self.waiting:
            whole = seq.request.prompt + seq.request.output
            if len(batch) >= self.max_sequences or not self.kv.can_hold(whole):
                break
            self.kv.hold(seq.request.id, whole)
            batch.append(seq)
        for seq in batch:
            self.waiting.remove(seq)
            seq.scheduled_s = now
        self.running = batch
        return Step("prefill", tuple(batch)) if batch else None

    def finished(self, step: Step, now: float) -> list[Running]:
        if not all(seq.done for seq in self.running):
            return []
        done, self.running = self.running, []
        for seq in done:
            seq.finish_s = now
            self.kv.release(seq.request.id)
        return done
