"""Sarathi-Serve (OSDI '24): chunked prefill under a token budget, over vLLM's paged KV cache.

Every step is a mixed one of at most `max_tokens` tokens (the token budget, set by
`--token-budget`): first a decode token for each running sequence that has its first
token, then the next chunks of the prompts being prefilled (in order), then chunks of the
requests waiting (first come first served, while blocks for the chunk fit with `watermark`
of the blocks kept free, at most `max_sequences` running). A prompt's KV blocks are taken
chunk by chunk, a decode's as it grows. When the decodes need blocks none is free for, or
nothing else can run, the most recently admitted sequence is preempted by recompute (its
blocks freed, back to the head of the queue, its prompt and outputs to be prefilled again).
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.serving.schedulers.base import Running, Scheduler, Step


@dataclass
class Sarathi(Scheduler):
    watermark: float = 0.01

    name = "sarathi"
    chunked = True

    def _preempt_newest(self) -> None:
        victim = self.running.pop()
        self.kv.release(victim.request.id)
        victim.pending = 0
        victim.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)

    def next_step(self, now: float) -> Step | None:
        kv, size = self.kv, self.kv.block_size
        while True:
            decoding = [s for s in self.running if not s.pending]
            growing = [s for s in decoding if kv.held[s.request.id] * size < s.cached + 1]
            if len(growing) <= kv.free or len(self.running) <= 1:
                break
            self._preempt_newest()
        for seq in growing:
            kv.hold(seq.request.id, seq.cached + 1)
        while True:
            fed = self._chunks(self.max_tokens - len(decoding), now)
            if decoding or fed or not self.running:
                break
            self._preempt_newest()  # partial prompts stuck on blocks: free the newest
        if not decoding and not fed:
            return None
        return Step("mixed", (*decoding, *(s for s, _ in fed)),
                    (1,) * len(decoding) + tuple(n for _, n in fed))

    def _chunks(self, budget: int, now: float) -> list[tuple[Running, int]]:
        """The prompt chunks this step feeds within `budget` tokens: those being prefilled,
        then new requests' (admitted here: their first chunk's blocks taken)."""
        kv, fed = self.kv, []
        for seq in self.running:
            if budget <= 0:
                return fed
            if not seq.pending:
                continue
            chunk = min(seq.pending, budget)
            cached = seq.request.prompt + seq.generated - seq.pending
            if kv.need(cached + chunk) - kv.held[seq.request.id] > kv.free:
                return fed
            kv.hold(seq.request.id, cached + chunk)
            fed.append((seq, chunk))
            budget -= chunk
        reserve = int(self.watermark * kv.blocks)
        while self.waiting and budget > 0 and len(self.running) < self.max_sequences:
            seq = self.waiting[0]
            whole = seq.request.prompt + seq.generated
            chunk = min(whole, budget)
            if not kv.can_hold(chunk, reserve):
                break
            self.waiting.popleft()
            kv.hold(seq.request.id, chunk)
            seq.pending = whole
            if seq.scheduled_s is None:
                seq.scheduled_s = now
            self.running.append(seq)
            fed.append((seq, chunk))
            budget -= chunk
        return fed
