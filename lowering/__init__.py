"""IR -> source for each target. `render_source(kernel, "cuda")` gives the CUDA C++ text.

Compile stages (source -> binary) live in `lowering.compile`; each takes one artefact and
returns the next, so any stage can be dumped (`concordia compile --emit source|binary`).
"""
from __future__ import annotations

import os
from functools import lru_cache

from .cstyle import CStyleRenderer
from .dialects import DIALECTS, Dialect

__all__ = ["render_source", "DIALECTS", "Dialect", "CStyleRenderer", "INCLUDE_DIR"]

INCLUDE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")


@lru_cache(maxsize=None)
def _renderer(target: str) -> CStyleRenderer:
    return CStyleRenderer(DIALECTS[target])


def render_source(kernel, target: str) -> str:
    """Source text of one IR kernel for a C-family target ('opencl', 'cuda' or 'hip')."""
    if target not in DIALECTS:
        raise KeyError(f"unknown target {target!r}; known: {', '.join(DIALECTS)}")
    return _renderer(target).render(kernel)
