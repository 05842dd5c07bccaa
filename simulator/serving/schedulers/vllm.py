"""vLLM's scheduler (v0, default settings): iteration-level batching over a paged KV cache.

Between steps: if requests wait and their prompts fit (blocks for prompt + recomputed
outputs, keeping `watermark` of the blocks free, at most `max_sequences` running and
`max_tokens` prompt tokens per step), the next step prefills them, first come first
served; otherwise every running sequence decodes one token. When a decode step needs a
block none is free for, the most recently admitted sequence is preempted by recompute:
its blocks are freed and it goes back to the head of the queue, its prompt and outputs
to be prefilled again.
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.serving.schedulers.base import Running, Scheduler, Step


@dataclass
class Vllm(Scheduler):
    watermark: float = 0.01

    name = "vllm"

    def next_step(self, now: float) -> Step | None:
        reserve = int(self.watermark * self.kv.blocks)
        admitted: list[Running] = []
        tokens = 0
        for seq in self.waiting:
            length = seq.request.prompt + seq.generated
            if (len(self.running) + len(admitted) >= self.max_sequences
                    or (admitted and tokens + length > self.max_tokens)
                    or not self.kv.can_hold(length, reserve)):
                break
            self.kv.hold(seq.request.id, length)
            admitted.append(seq)
            tokens += length
        if admitted:
            for seq in admitted:  # the head of the queue
                self.waiting.popleft()
                if seq.scheduled_s is None:
                    seq.scheduled_s = now
            self.running.extend(admitted)
            return Step("prefill", tuple(admitted))
        if not self.running:
            return None
        kv, size, held = self.kv, self.kv.block_size, self.kv.held
        # the sequences whose next token needs one more block than they hold
        growing = [s for s in self.running if held[s.request.id] * size < s.cached + 1]
        while len(growing) > kv.free and len(self.running) > 1:  # preempt the newest
            victim = self.running.pop()
            kv.release(victim.request.id)
            victim.preemptions += 1
            self.preemptions += 1
            self.waiting.appendleft(victim)
            if growing and growing[-1] is victim:
                growing.pop()
        for seq in growing:
            kv.hold(seq.request.id, seq.cached + 1)
        return Step("decode", tuple(self.running))
