import os

import pytest
import torch

# Two cores on CI: one intra-op pool, no oversubscription.
torch.set_num_threads(int(os.environ.get("VLMSERVE_TEST_THREADS", "2")))

# Each engine built freezes the heap after a full collection (engine/heap.py): ~0.25 s in this process's
# heap on the CPU machine, for every engine a test builds (test_async_scheduling.py with test_llava.py:
# 13.1 s with it, 8.8 s without); tests/test_engine_heap.py turns it on where it is under test.
os.environ.setdefault("VLMSERVE_GC_FREEZE", "0")

# Without a GPU, the Triton kernels' tests run them in Triton's interpreter. It must be chosen before
# anything imports triton (transformers may), so for the whole session, not per test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vlmserve.testing.checkpoints import make_llava_checkpoint, make_text_checkpoint  # noqa: E402

# Variants that exercise each architecture's peculiarities, in both key layouts.
TEXT_MODELS = {
    "llama": dict(arch="llama", layout="hub", num_shards=3,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
    "llama_tied": dict(arch="llama", layout="v5", tie_word_embeddings=True, num_key_value_heads=1),
    "mistral": dict(arch="mistral", layout="v5", sliding_window=24),
    "qwen2": dict(arch="qwen2", layout="hub", num_shards=2),
    "phi3": dict(arch="phi3", layout="v5", num_key_value_heads=4, max_position_embeddings=2048,
                 original_max_position_embeddings=512, partial_rotary_factor=0.5,
                 rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(4)],
                               "long_factor": [2.0 + 0.5 * i for i in range(4)]}),
}


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory):
    made = {}

    def get(name: str) -> str:
        if name not in made:
            spec = dict(TEXT_MODELS[name])
            made[name] = make_text_checkpoint(str(tmp_path_factory.mktemp(name)), **spec)
        return made[name]

    return get


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    """A random-weight LLaVA in the hub (transformers 4.x) key layout: 64 px images, 64 tokens each."""
    return make_llava_checkpoint(str(tmp_path_factory.mktemp("llava")), layout="hub")
