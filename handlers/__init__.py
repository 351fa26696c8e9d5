"""Checkpoint and recovery: IR handlers, the delta log, regions, and (later) migration.

    from handlers import Checkpointer
    ckpt = Checkpointer(rt, {"kv": kv}, "state.clog", page_size=4096)
"""
from .checkpointer import MODES, Checkpointer, CheckpointStats, apply_pages
from .log import DeltaLog, LogError, compact, committed_image, scan_log
from .regions import Region
from .tracking import instrument_stores

__all__ = ["Checkpointer", "CheckpointStats", "MODES", "DeltaLog", "LogError", "Region",
           "scan_log", "committed_image", "compact", "apply_pages", "instrument_stores"]
