"""A built engine freezes the heap it was built on (engine/heap.py), so the garbage collector's full
walks skip it; deleting the engine gives its cycles back to the collector, and VLMSERVE_GC_FREEZE=0
leaves the collector alone. On a GPU (the default device there) the same checks hold for an engine
with CUDA graphs."""
import gc
import weakref

import numpy as np
from PIL import Image

from vlmserve import LLM, SamplingParams


def _generate(llm):
    img = Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8))
    out = llm.generate({"prompt": "USER: <image>\nWhat is it? ASSISTANT:", "multi_modal_data": {"image": img}},
                       SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_engine_freezes_its_heap_and_a_deleted_engine_is_collected(llava_dir, monkeypatch):
    monkeypatch.setenv("VLMSERVE_GC_FREEZE", "1")  # the default; conftest turns it off for the other tests
    gc.unfreeze()
    llm = LLM(llava_dir)
    frozen = gc.get_freeze_count()
    model = llm.llm_engine.runner.model
    assert frozen > 10_000 and gc.is_tracked(model)
    _generate(llm)
    model.cycle = model  # a cycle through frozen objects: collectable only once they are unfrozen
    gone = [weakref.ref(model), weakref.ref(next(model.parameters())), weakref.ref(llm.llm_engine.runner.kv_caches[0])]
    del model, llm
    gc.collect()
    assert [r() is None for r in gone] == [True] * 3, "the deleted engine's model, weights or KV cache are alive"
    assert gc.get_freeze_count() < frozen


def test_switch_leaves_the_collector_alone(llava_dir, monkeypatch):
    monkeypatch.setenv("VLMSERVE_GC_FREEZE", "0")
    gc.unfreeze()
    llm = LLM(llava_dir)
    assert gc.get_freeze_count() == 0
    _generate(llm)
    del llm
