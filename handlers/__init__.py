"""Checkpoint and recovery: IR handlers, the delta log, regions, kernel contexts and
migration, the persistent runtime.

    from concordia.handlers import Checkpointer
    ckpt = Checkpointer(rt, {"kv": kv}, "state.clog", page_size=4096)
"""
from concordia_ir.passes.tracking import instrument_stores

from .checkpointer import MODES, Checkpointer, CheckpointStats, apply_pages
from .log import DeltaLog, LogError, compact, committed_image, scan_log
from .migration import KernelContext, SnapshotError
from .regions import Region

__all__ = ["Checkpointer", "CheckpointStats", "MODES", "DeltaLog", "LogError", "Region",
           "scan_log", "committed_image", "compact", "apply_pages", "instrument_stores",
           "KernelContext", "SnapshotError"]
