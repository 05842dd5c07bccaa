"""FasterTransformer's concurrent model instances (Flover's baseline): every request is
served by its own instance (up to `max_sequences` of them, its prompt and outputs reserved
whole in the KV cache), one request per instance at a time, batch one.

The instances share one device. Each round, every busy instance runs its own step (its
prompt's prefill, or one decode token) on its own stream, and each has its token at the
round's end. How their steps overlap is the machine's `overheads.instances`
(simulator.hardware.schema.ConcurrentInstances): the round costs the longest step, plus
for each other instance its kernel launches (one host, launches in turn) and
`device_share` of its kernels' time (the rest runs alongside the others' kernels), grown
by 1 + `contention` × (k − 1)² for k instances (bandwidth and cache contention). With the
defaults (1, 0) the instances take strict turns: a round costs the sum of their steps.
Weights are shared; each instance keeps its own KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.serving.schedulers.base import Scheduler, Step


@dataclass
class Instances(Scheduler):
    name = "instances"

    def next_step(self, now: float) -> Step | None:
        while self.waiting and len(self.running) < self.max_sequences:
            seq = self.waiting[0]
            whole = seq.request.prompt + seq.request.output
            if not self.kv.can_hold(whole):
                break
            self.waiting.popleft()
            self.kv.hold(seq.request.id, whole)
            seq.scheduled_s = now
            self.running.append(seq)
        return Step("instances", tuple(self.running)) if self.running else None
