"""Concordia: portable GPU state. The public entry: what users touch.

    import concordia
    from concordia import kernel, Runtime, f32, i32, Ptr, global_id

The repository's folders are installed under this name (pyproject's package-dir):
`backends/` is `concordia.backends`, `lowering/` `concordia.lowering`, `handlers/`
`concordia.handlers`; `concordia_ir` (the IR, the ground floor) keeps its own name. Floors
point down: concordia_ir <- lowering <- backends <- handlers <- concordia.
"""
import os as _os

# In a source checkout the three folders sit beside this one: find them there too (an
# installed wheel has them inside this package, where the default __path__ finds them).
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "handlers", "checkpointer.py")):
    __path__.append(_root)

from concordia_ir import *  # noqa: E402,F401,F403  (the IR's public names)
from concordia_ir import __all__ as _ir_names  # noqa: E402

from .backends import Runtime, DeviceBuffer, backend_status  # noqa: E402
from .handlers import (Checkpointer, CheckpointStats, DeltaLog, KernelContext, LogError,  # noqa: E402
                       SnapshotError)
from .handlers.persistent import PersistentRuntime, TaskError  # noqa: E402

__version__ = "0.2.0"


def migrate(ctx: KernelContext, target) -> KernelContext:
    """Move a paused or running kernel context to `target` (a backend string or Runtime):
    quiesce, snapshot, re-lower, restore, verify, resume. Same as ctx.migrate(target)."""
    return ctx.migrate(target)


__all__ = list(_ir_names) + [
    "Runtime", "DeviceBuffer", "backend_status", "Checkpointer", "CheckpointStats", "DeltaLog",
    "LogError", "KernelContext", "SnapshotError", "migrate", "PersistentRuntime", "TaskError",
]
