"""The KV block manager and the scheduler on their own: reference counts, prefix hits, LRU reuse,
chunked prefill, preemption, and no deadlock when blocks run out."""
from vlmserve.config import SchedulerConfig
from vlmserve.engine.block_manager import BlockManager
from vlmserve.engine.scheduler import Scheduler
from vlmserve.engine.sequence import Sequence
from vlmserve.sampling_params import SamplingParams

_ids = iter(range(10**6))


def seq(tokens, **kw):
    return Sequence(next(_ids), "r", 0, tokens, SamplingParams(**kw))


def run_prefill(bm, s, hits=()):
    assert bm.allocate_slots(s, s.num_tokens - len(hits) * bm.block_size, list(hits))
    s.num_computed_tokens = s.num_tokens
    bm.cache_computed_blocks(s)


def test_prefix_hits_share_blocks_and_count_references():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(list(range(10)))  # 2 full blocks + 2 tokens
    run_prefill(bm, a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 7
    b = seq(list(range(8)) + [99, 98, 97])
    hits = bm.get_computed_blocks(b)
    assert hits == a.block_table[:2]
    run_prefill(bm, b, hits)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 10


def test_lookups_hash_up_to_the_first_miss():
    """A fresh prompt's lookup hashes one block, not all (its first step, and its vision encoder, wait
    for no more); hash_blocks (called once the step is launched) hashes the rest, and a lookup over
    cached blocks hashes as far as they hit."""
    bm = BlockManager(num_blocks=20, block_size=4)
    a = seq(list(range(30)))  # 7 full blocks
    assert bm.get_computed_blocks(a) == [] and len(a.block_hashes) == 1
    bm.hash_blocks(a)
    assert len(a.block_hashes) == 7
    run_prefill(bm, a)
    b = seq(list(range(12)) + [99] * 18)  # 3 blocks in common, then a miss
    hits = bm.get_computed_blocks(b)
    assert hits == a.block_table[:3] and len(b.block_hashes) == 4
    assert bm.num_cached_prefix_tokens(seq(list(range(30)))) == 28


def test_always_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(list(range(8)))
    run_prefill(bm, a)
    same = seq(list(range(8)))
    assert len(bm.get_computed_blocks(same)) == 1  # the last block holds the token to recompute


def test_freed_blocks_stay_cached_until_reused_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(list(range(8)))
    run_prefill(bm, a)
    bm.free(a)
    assert len(bm.get_computed_blocks(seq(list(range(8)) + [1]))) == 2  # still there
    # Taking all four blocks evicts them.
    big = seq(list(range(100, 116)))
    run_prefill(bm, big)
    assert bm.get_computed_blocks(seq(list(range(8)) + [1])) == []
    bm.free(big)


def test_different_extra_keys_do_not_hit():
    class ImageSeq(Sequence):
        def __init__(self, *a, image_hash="x", **k):
            super().__init__(*a, **k)
            self.image_hash = image_hash

        def block_extra_keys(self, i, bs):
            return (self.image_hash,)

    bm = BlockManager(num_blocks=8, block_size=4)
    a = ImageSeq(1, "r", 0, list(range(9)), SamplingParams(), image_hash="cat")
    run_prefill(bm, a)
    other = ImageSeq(2, "r", 0, list(range(9)), SamplingParams(), image_hash="dog")
    same = ImageSeq(3, "r", 0, list(range(9)), SamplingParams(), image_hash="cat")
    assert bm.get_computed_blocks(other) == []
    assert len(bm.get_computed_blocks(same)) == 2


def test_which_media_cached_blocks_hold():
    """may_hold_media: an item's content hash while a cached block holds its tokens (the engine then
    leaves its encoder to the step, which may find the tokens in the prefix cache), not after the
    last such block is evicted or the cache reset."""
    from vlmserve.multimodal.inputs import MultiModalItem

    bm = BlockManager(num_blocks=4, block_size=4)
    a = Sequence(next(_ids), "r", 0, list(range(10)), SamplingParams(),
                 mm_items=[MultiModalItem("image", 2, 5, {}, "cat"), MultiModalItem("image", 8, 1, {}, "dog")])
    assert not bm.may_hold_media("cat")
    run_prefill(bm, a)  # full blocks 0 and 1 hold the cat; the dog is in block 2, not full
    assert bm.may_hold_media("cat") and not bm.may_hold_media("dog") and bm.media_blocks["cat"] == 2
    bm.free(a)
    assert bm.may_hold_media("cat")  # freed blocks stay cached
    big = seq(list(range(100, 112)))  # takes 3 free blocks: the least recently freed first
    run_prefill(bm, big)
    assert bm.may_hold_media("cat") and bm.media_blocks["cat"] == 1  # block 0 stays, the last freed
    bm.free(big)
    bm.reset_prefix_cache()
    assert not bm.may_hold_media("cat") and not bm.media_blocks


def _drive(sched, steps=1000):
    """Pretend to run the model: computed tokens advance; each finished prefill/decode samples a
    token until 5 are out. Returns the order sequences finished in."""
    done = []
    for _ in range(steps):
        out = sched.schedule()
        if not out:
            assert not sched.has_unfinished(), "scheduler stalled with work left"
            return done
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            sched.block_manager.cache_computed_blocks(s.seq)
            if s.seq.num_computed_tokens == s.seq.num_tokens:
                s.seq.token_ids.append(7)
                if s.seq.num_output_tokens == 5:
                    sched.finish(s.seq)
                    done.append(s.seq)
    raise AssertionError("did not finish")


def test_chunked_prefill_respects_token_budget():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), bm)
    seqs = [seq(list(range(37))), seq(list(range(5)))]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [x.num_new_tokens for x in out.scheduled] == [10]
    assert out.num_tokens <= 10
    assert len(_drive(sched)) == 2


def test_preemption_under_block_pressure_never_deadlocks():
    bm = BlockManager(num_blocks=6, block_size=4)  # 24 tokens of cache
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), bm)
    # 9-token prompts take 3 blocks each, so two start; each grows to 4 blocks: one must yield.
    seqs = [seq(list(range(10 * i, 10 * i + 9))) for i in range(5)]
    for s in seqs:
        sched.add(s)
    done = _drive(sched)
    assert len(done) == 5 and sched.num_preemptions > 0
    assert bm.num_free_blocks == 6
    assert all(s.num_output_tokens == 5 for s in seqs)


def test_max_num_seqs_limits_the_batch():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100), bm)
    for i in range(5):
        sched.add(seq([i + 1, i + 2]))
    assert len(sched.schedule().scheduled) == 2
    assert len(_drive(sched)) == 5
