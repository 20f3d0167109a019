"""The KV memory budget: fixed-size blocks of positions (vLLM's block size idea), reserved whole at admission
for every position a sequence may reach (prompt + max_new), so a running sequence never runs out and nothing
is ever preempted. A sequence's cache is one contiguous KVCache of exactly its reserved blocks: attention
reads it as is, with no gather."""
from __future__ import annotations

from ...config import ModelConfig
from ..model import KVCache

BLOCK_TOKENS = 16


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    """K and V of one position in every layer."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


class KVBudgetError(ValueError):
    """A request that could never fit the KV budget, however long it waited."""


class KVBudget:
    def __init__(self, cfg: ModelConfig, budget_bytes: int, itemsize: int, new_cache):
        """new_cache(tokens) -> KVCache (TrustedModel.new_cache: the attention's dtype and device)."""
        self.cfg, self.new_cache = cfg, new_cache
        self.block_bytes = BLOCK_TOKENS * kv_bytes_per_token(cfg, itemsize)
        self.total = budget_bytes // self.block_bytes
        if self.total < 1:
            raise ValueError(f"--kv-budget-mb holds no KV block: one block ({BLOCK_TOKENS} positions) takes "
                             f"{self.block_bytes} bytes")
        self.used = 0

    @staticmethod
    def blocks_for(tokens: int) -> int:
        return -(-tokens // BLOCK_TOKENS)

    @property
    def max_tokens(self) -> int:
        """The most positions one sequence can ever be given."""
        return self.total * BLOCK_TOKENS

    def can_allocate(self, tokens: int) -> bool:
        return self.used + self.blocks_for(tokens) <= self.total

    def allocate(self, tokens: int) -> tuple[KVCache, int]:
        """(a cache with room for `tokens` positions, its blocks); call can_allocate first."""
        blocks = self.blocks_for(tokens)
        if self.used + blocks > self.total:
            raise RuntimeError(f"{blocks} KV blocks asked, {self.total - self.used} free")
        self.used += blocks
        return self.new_cache(blocks * BLOCK_TOKENS), blocks

    def free(self, blocks: int) -> None:
        self.used -= blocks
