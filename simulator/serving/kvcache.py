"""A paged KV cache: fixed-size blocks of token slots, as vLLM's block manager keeps them."""

from __future__ import annotations


class BlockManager:
    """`blocks` blocks of `block_size` tokens; each sequence holds ⌈tokens / block_size⌉."""

    def __init__(self, blocks: int, block_size: int) -> None:
        self.blocks, self.block_size = blocks, block_size
        self.held: dict[int, int] = {}  # request id → blocks it holds
        self.used = 0  # Σ held

    @property
    def free(self) -> int:
        return self.blocks - self.used

    def need(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_hold(self, tokens: int, reserve: int = 0) -> bool:
        """Whether a new sequence of `tokens` fits, leaving `reserve` blocks free."""
        return self.need(tokens) <= self.free - reserve

    def hold(self, request: int, tokens: int) -> None:
        """Give `request` the blocks for `tokens` (it may already hold some)."""
        have = self.held.get(request, 0)
        extra = -(-tokens // self.block_size) - have
        if extra <= 0:
            return
        if extra > self.blocks - self.used:
            raise RuntimeError(f"KV cache over-committed: {extra} blocks wanted, "
                               f"{self.free} free")
        self.held[request] = have + extra
        self.used += extra

    def release(self, request: int) -> None:
        self.used -= self.held.pop(request, 0)
