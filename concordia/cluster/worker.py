"""A decode worker: one device, one job at a time, its state protected by a Checkpointer.

Plain Python; `concordia.cluster.coordinator` runs it as a Ray actor (threaded, so that
`heartbeat` answers while `start` or `take_over` decodes). A standby is the same class, made
ahead of need and warm: its runtime open, its kernels compiled, the model's weights loaded
and (on a GPU) the decode step's CUDA graph captured, so that a takeover only reads and
applies the log.

Where the log lives: a file in a directory every worker of the job can open (node-local disk
for one machine, a shared filesystem across machines). Host memory would die with the
worker's process, and a file written with fsync=always survives a crash by construction.
Every takeover writes a new file (the job's next epoch): a worker declared dead that is in
fact still running (hung, then woken) can only write its own old epoch, which no one reads
again, so two workers never write one log.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time

import torch

from concordia_ir.errors import ConcordiaError

from ..backends import Runtime
from ..llm import DecodeRun, parse_args

# the job's settings that a worker and its standbys must share (they decode one model)
SPEC_KEYS = ("config", "batch", "prompt", "tokens", "block_size", "seed", "adapter_every",
             "dtype", "every", "fsync", "when_full")


def device_of(backend: str) -> str:
    """The torch device whose tensors a backend wraps: a CUDA GPU for cuda and hip-on-cuda,
    host memory for the others (reference, the Tenstorrent simulator)."""
    return "cuda" if backend.split(":")[0] in ("cuda", "hip-on-cuda") else "cpu"


def decode_args(spec: dict, backend: str):
    argv = ["--device", device_of(backend), "--backend", backend, "--async"]
    for key in SPEC_KEYS:
        if key in spec:
            argv += ["--" + key.replace("_", "-"), str(spec[key])]
    return parse_args(argv)


def warm(run: DecodeRun, rt, backend: str) -> None:
    """Run everything a takeover runs once, on a scratch log: a decode step (its CUDA graph
    captured), checkpoints (the scanners' kernels compiled) and a restore."""
    with tempfile.TemporaryDirectory(prefix="concordia-warm-") as tmp:
        run.args.log = os.path.join(tmp, "warm.clog")
        run.open_checkpointer(rt)
        run.generate(stop_after=2)
        run.ckpt.close()
        run.resume(backend, rt)
    run.ckpt, run.stats, run.handles = None, [], []


class DecodeWorker:
    def __init__(self, name: str, backend: str, spec: dict, threads: int = 1):
        torch.set_num_threads(threads)   # workers share the host's cores
        self.name, self.backend = name, backend
        self._lock = threading.Lock()
        self._status = {"state": "warming", "pos": 0, "generated": 0}
        self.rt = Runtime(backend)
        self.run = DecodeRun(decode_args(spec, backend))
        warm(self.run, self.rt, backend)
        self._set(state="idle")

    def _set(self, **kw):
        with self._lock:
            self._status.update(kw)

    # -- what the coordinator calls
    def pid(self) -> int:
        return os.getpid()

    def describe(self) -> dict:
        return {"name": self.name, "backend": self.backend, "pid": os.getpid(),
                "device": str(self.run.device)}

    def heartbeat(self) -> dict:
        with self._lock:
            return dict(self._status, t=time.time())

    def start(self, log: str, prompt_seed: int, step_delay: float = 0.0) -> dict:
        """Decode a job from its prompts, checkpointing every step into `log` (no file yet)."""
        self.run.args.prompt_seed = prompt_seed
        return self._decode(log, None, step_delay, {})

    def take_over(self, logs_in: list[str], log_out: str, prompt_seed: int,
                  step_delay: float = 0.0) -> dict:
        """Continue a dead worker's job: load the newest of its logs (`logs_in`, newest first)
        that holds a commit, apply it to this worker's tensors on this worker's backend, decode
        on from the restored step, logging into `log_out`. With no commit in any (the worker
        died before its first was durable) the job starts again from its prompts."""
        self._set(state="loading", t_start=time.time())
        self.run.args.prompt_seed = prompt_seed
        rec = None
        for log in logs_in:   # a standby that died early may have left a log with no commit
            self.run.args.log = log
            try:
                rec = self.run.resume(self.backend, self.rt)
                break
            except ConcordiaError:
                continue
        if rec is None:   # killed before its first commit was durable: nothing to keep
            phases = {"load_s": 0.0, "apply_s": 0.0, "restored_pos": None,
                      "applied_at": time.time(), "log_in": None}
        else:
            phases = {"load_s": rec["detect_s"] + rec["load_log_s"], "apply_s": rec["apply_s"],
                      "restored_pos": rec["restored_pos"], "applied_at": time.time(),
                      "log_in": log}
        self._set(phases=dict(phases))   # the coordinator closes the recovery at first token
        return self._decode(log_out, phases["restored_pos"], step_delay, phases)

    def _decode(self, log: str, start_pos, step_delay: float, phases: dict) -> dict:
        """Decode on, logging into `log`: a path the coordinator cleared (coordinator.fresh)."""
        run = self.run
        run.args.log = log
        run.open_checkpointer(self.rt)
        first: list[float] = []

        def tick(pos):
            if not first:
                first.append(time.time())
                self._set(first_token=first[0])
            self._set(state="decoding", pos=pos, generated=self._status["generated"] + 1)
            if step_delay:
                time.sleep(step_delay)
        self._set(state="decoding", generated=0, pos=start_pos or 0, first_token=None)
        try:
            tokens = run.generate(start_pos=start_pos, on_token=tick)
            run.ckpt.flush()
        finally:
            run.ckpt.close()
            run.ckpt = None
        if first and "applied_at" in phases:
            phases["resume_s"] = first[0] - phases["applied_at"]
        phases["first_token"] = first[0] if first else None
        self._set(state="done")
        return {"worker": self.name, "backend": self.backend, "tokens": tokens.tolist(),
                "phases": phases}
