"""Where code makes the host wait for a CUDA device: torch's sync debug mode, with the Python
frames of each synchronizing call (for the GPU test of async scheduling and scripts/gpu_async_trace.py)."""
from __future__ import annotations

import contextlib
import os
import traceback
import warnings

import torch

_LIB = os.path.dirname(os.__file__)


@contextlib.contextmanager
def sync_sites(sites: list[str], depth: int = 4, skip_file: str | None = None):
    """Append to `sites`, for each synchronizing call in the block, its innermost `depth` frames
    outside the Python and site-packages libraries (and `skip_file`), innermost first, as
    "file:line function"."""
    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith(_LIB)
                  and "site-packages" not in f.filename and f.filename not in (__file__, skip_file)]
        sites.append(" <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                                 for f in frames[::-1][:depth]) or "?")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
