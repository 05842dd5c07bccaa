"""FasterTransformer's concurrent model instances (Flover's baseline): every request is
served by its own instance (up to `max_sequences` of them, its prompt and outputs reserved
whole in the KV cache), one request per instance at a time, batch one.

The instances share one device. Each round, every busy instance runs its own step (its
prompt's prefill, or one decode token); the device runs their kernels interleaved, one
kernel at a time (a batch-one decode kernel already streams the weights at the bandwidth the
device gives), so a round takes the sum of the instances' batch-one steps and each instance
has its token at the round's end. Weights are read once per instance per step: nothing is
shared between instances but the device. What FasterTransformer loses beyond that (context
switches, contention) is the `instance_overhead` the serving options name: a round of k
instances costs (1 + overhead × (k − 1)) × the sum; 0 unless set.
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
