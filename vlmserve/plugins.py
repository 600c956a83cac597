"""Plugins: how an installed package brings its models to every entry point (`LLM`, `vlmserve serve`,
the benchmarks) without the user importing it first.

A package names a function in its metadata under the entry-point group `vlmserve.plugins`, e.g. in
its pyproject.toml:

    [project.entry-points."vlmserve.plugins"]
    toy_vlm = "toy_vlm:register"

vlmserve calls every such function once per process, before it reads a model's config.json, so the
function can register a config class (`AutoConfig.register`), processors and architectures
(`ModelRegistry.register_model`). `VLMSERVE_PLUGINS=name1,name2` loads only those names; an empty
value loads none."""
from __future__ import annotations

import logging
import os
import threading
from importlib.metadata import entry_points

logger = logging.getLogger(__name__)
PLUGIN_GROUP = "vlmserve.plugins"
_lock = threading.Lock()
_loaded: list[str] | None = None


class PluginError(RuntimeError):
    """A plugin that could not be loaded or whose function failed."""


def load_plugins() -> list[str]:
    """Call every plugin function once per process; returns the names loaded."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        wanted = os.environ.get("VLMSERVE_PLUGINS")
        allowed = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
        names = []
        for ep in entry_points(group=PLUGIN_GROUP):
            if allowed is not None and ep.name not in allowed:
                continue
            try:
                ep.load()()
            except Exception as e:
                raise PluginError(f"vlmserve plugin {ep.name!r} ({ep.value}) failed: "
                                  f"{type(e).__name__}: {e}") from e
            logger.info("loaded vlmserve plugin %s (%s)", ep.name, ep.value)
            names.append(ep.name)
        _loaded = names
        return names
