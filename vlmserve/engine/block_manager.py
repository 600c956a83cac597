"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, and prefix caching.

Prefix caching: every full block has a chain hash (the hash of its parent block's hash, its token
ids and any extra keys such as image content hashes). Computed full blocks are registered under
their hash; a new sequence whose leading blocks hash the same reuses them. Freed blocks keep their
contents and hash and go to the back of an LRU free queue, so they can still be hit until they are
handed out again.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from array import array

from vlmserve.engine.sequence import Sequence


class KVBlock:
    __slots__ = ("block_id", "ref_count", "hash", "media")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.media: tuple[str, ...] = ()  # content hashes of the items in it, while it is cached


def hash_block(parent: bytes | None, token_ids: list[int], extra_keys: tuple) -> bytes:
    h = hashlib.sha256(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # chain hash -> block id
        self.media_blocks: dict[str, int] = {}  # item content hash -> cached blocks holding it
        self.num_hit_tokens = 0
        self.num_queried_tokens = 0

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_queue) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, seq: Sequence, num_blocks: int | None = None) -> None:
        """Chain hashes of the full blocks of `seq`'s known tokens, the first `num_blocks` (None: all)."""
        bs = self.block_size
        end = len(seq.token_ids) // bs  # known tokens only
        if num_blocks is not None:
            end = min(end, num_blocks)
        for i in range(len(seq.block_hashes), end):
            parent = seq.block_hashes[i - 1] if i else None
            seq.block_hashes.append(
                hash_block(parent, seq.token_ids[i * bs:(i + 1) * bs], seq.block_extra_keys(i, bs)))

    def hash_blocks(self, seq: Sequence) -> None:
        """Hash all of `seq`'s full blocks now. Lookups hash only up to their first miss, so that a
        fresh prompt's first step (and its vision encoder) starts after one block's hash, not all of
        them; the engine calls this once a prompt chunk's step is launched, while the device runs it,
        and then registers the chunk's computed blocks (cache_computed_blocks), which finds them hashed."""
        if self.enable_prefix_caching:
            self._update_hashes(seq)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks of `seq`'s leading full blocks, up to the first miss, leaving at least
        one token to compute (the step that computes it also produces the next token's logits)."""
        if not self.enable_prefix_caching or seq.want_prompt_logprobs:
            return []
        hits = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            if i == len(seq.block_hashes):
                self._update_hashes(seq, i + 1)
                if i == len(seq.block_hashes):  # the block's tokens are not all known yet
                    break
            block_id = self.cached.get(seq.block_hashes[i])
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def num_cached_prefix_tokens(self, seq: Sequence) -> int:
        """How many leading tokens of `seq` the prefix cache holds now, as get_computed_blocks would
        admit them, without counting the query in the hit statistics."""
        return len(self._cached_prefix(seq)) * self.block_size

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Leading blocks of `seq` already in the cache, counted in the hit statistics."""
        if not self.enable_prefix_caching or seq.want_prompt_logprobs:
            return []
        hits = self._cached_prefix(seq)
        self.num_queried_tokens += seq.num_tokens
        self.num_hit_tokens += len(hits) * self.block_size
        return hits

    # ---- allocation ----------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens after its computed ones (plus the
        prefix-cache hits in `computed_blocks`, which become its leading blocks). False if the
        cache cannot hold them; then nothing changes."""
        computed_blocks = computed_blocks or []
        num_computed = seq.num_computed_tokens + len(computed_blocks) * self.block_size
        need_total = self.blocks_needed(num_computed + num_new_tokens)
        num_new_blocks = max(0, need_total - len(seq.block_table) - len(computed_blocks))
        # Hit blocks that sit in the free queue leave it when touched.
        num_revived = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        if num_new_blocks + num_revived > len(self.free_queue):
            return False
        for b in computed_blocks:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self.free_queue[b]
            block.ref_count += 1
            seq.block_table.append(b)
        if computed_blocks:
            seq.num_cached_blocks = len(seq.block_table)
        for _ in range(num_new_blocks):
            seq.block_table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached contents
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            self._uncache(block)
        block.ref_count = 1
        return block_id

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the full blocks of `seq` whose KV entries are now all computed."""
        if not self.enable_prefix_caching:
            return
        # a launched step may have computed a pending token whose id is not known yet
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        if num_full <= seq.num_cached_blocks:
            return
        self._update_hashes(seq)
        for i in range(seq.num_cached_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            h = seq.block_hashes[i]
            if block.hash is None and h not in self.cached:
                block.hash = h
                self.cached[h] = block.block_id
                if seq.mm_items:
                    block.media = tuple(key for key, _ in seq.block_extra_keys(i, self.block_size))
                    for key in block.media:
                        self.media_blocks[key] = self.media_blocks.get(key, 0) + 1
        seq.num_cached_blocks = num_full

    def _uncache(self, block: KVBlock) -> None:
        block.hash = None
        for key in block.media:
            left = self.media_blocks[key] - 1
            if left:
                self.media_blocks[key] = left
            else:
                del self.media_blocks[key]
        block.media = ()

    def may_hold_media(self, content_hash: str) -> bool:
        """Whether some cached block holds placeholder tokens of the item with this content hash (a
        prompt with it may then find them in the prefix cache, and need no encoder for them)."""
        return content_hash in self.media_blocks

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so that shared prefixes stay cached longest.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        seq.block_table = []
        seq.num_cached_blocks = 0

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_count == 0 and block.hash is not None:
                self._uncache(block)
        self.cached = {h: b for h, b in self.cached.items() if self.blocks[b].hash is not None}
