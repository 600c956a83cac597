"""Builds the C++ CPU kernels in csrc/ on first use with torch's extension builder. The build is
cached on disk and tuned for the CPU it runs on (-march=native), so the cache name carries a
fingerprint of that CPU: a home directory shared by different machines never loads a build made for
another one. A failed build (no compiler, say) is logged once and callers use their torch path."""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading

logger = logging.getLogger(__name__)
_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
_lock = threading.Lock()
_modules: dict[str, object] = {}
_failed: set[str] = set()


def disabled() -> bool:
    return bool(os.environ.get("VLMSERVE_DISABLE_CPU_KERNELS"))


def cpu_fingerprint() -> str:
    """Model name and ISA flags of this CPU, hashed."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    text += line
                if line.strip() == "":  # the first CPU's block is enough
                    break
    except OSError:
        text += platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _headers_digest() -> str:
    """torch rebuilds when a source changes but not when a header does: name the build after them."""
    h = hashlib.sha256()
    for f in sorted(os.listdir(_CSRC)):
        if f.endswith(".h"):
            with open(os.path.join(_CSRC, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:8]


def load_cpu_extension(name: str, source: str):
    """The built module of csrc/`source`, or None where it cannot be built."""
    module = _modules.get(name)
    if module is not None:  # the hot path: layers ask on every call
        return module
    with _lock:
        if name in _modules or name in _failed:
            return _modules.get(name)
        if disabled():
            _failed.add(name)
            return None
        try:
            from torch.utils.cpp_extension import load
            _modules[name] = load(name=f"{name}_{cpu_fingerprint()}_{_headers_digest()}",
                                  sources=[os.path.join(_CSRC, source)],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno",
                                                "-fno-trapping-math"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:
            _failed.add(name)
            logger.warning("the CPU kernel %s could not be built (%s); using the torch path", name, e)
        return _modules.get(name)
