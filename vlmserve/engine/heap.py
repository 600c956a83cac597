"""Python's cyclic garbage collector beside a running engine.

A full collection (the oldest generation) walks every container object in the process. Once torch
and transformers are imported and a model is built that is over 400k objects: ~0.22 s on a 2-core
CI machine, and on an H200 host one such pause came in most throughput runs, the GPU idle for 0.23-0.26 s
while the engine thread could not queue the next step (BENCHMARKS.md). So a built engine moves what
exists into the collector's permanent generation (`gc.freeze`): later collections walk only the
objects made since (requests, sequences, outputs).

Frozen objects are still freed by reference counting; only cycles among them wait, until the engine
that froze them is deleted (`release_frozen_heap`) or the next engine is built, which first takes
everything back and collects it. VLMSERVE_GC_FREEZE=0 leaves the collector alone."""
from __future__ import annotations

import gc
import os


def freeze_startup_heap() -> bool:
    """Collect, then freeze everything left; whether it did (not with VLMSERVE_GC_FREEZE=0)."""
    if os.environ.get("VLMSERVE_GC_FREEZE", "1") == "0":
        return False
    gc.unfreeze()  # what an engine built before froze: its cycles, if it is gone, are garbage now
    gc.collect()
    gc.freeze()
    return True


def release_frozen_heap() -> None:
    """Let the collector see every frozen object again (an engine that froze them is going)."""
    if gc is not None:  # None late in interpreter shutdown
        gc.unfreeze()
