"""`concordia failover`: the command line of the recovery coordinator."""
from __future__ import annotations

import json
import os
import tempfile
import time

import ray
import torch

from concordia_ir.errors import ConcordiaError

from ..backends import backend_status
from ..llm import CONFIGS
from .coordinator import FailoverPlan, run_failover, start_ray
from .tensor_parallel import run_tp_failover
from .worker import device_of


def _check(args):
    for name in ("workers", "batch", "prompt", "tokens"):
        if getattr(args, name) < 1:
            raise ConcordiaError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("standby", "kill", "hang", "slow", "kill_standby"):
        if getattr(args, name) < 0:
            raise ConcordiaError(f"--{name.replace('_', '-')} cannot be negative")
    if args.tokens < 6:
        raise ConcordiaError("--tokens must be at least 6: faults land between the 2nd and the "
                             "last-but-two new token")
    if args.config not in CONFIGS:
        raise ConcordiaError(f"--config: no model {args.config!r}; there are: "
                             f"{', '.join(sorted(CONFIGS))}")
    if args.deadline <= 0:
        raise ConcordiaError("--deadline must be positive")
    if args.tp == 2 and (args.hang or args.slow):
        raise ConcordiaError("--tp 2 injects --kill and --kill-standby only (no --hang or --slow)")
    status = backend_status()
    for flag, b in (("--backend", args.backend), ("--standby-backend", args.standby_backend)):
        st = status.get(b.split(":")[0])
        if st is None:
            raise ConcordiaError(f"{flag}: no backend {b!r}; there are: {', '.join(status)}")
        if not st.ok:
            raise ConcordiaError(f"{flag}: {b} cannot run here: {st.reason}")
    if device_of(args.backend) == "cuda" or device_of(args.standby_backend) == "cuda":
        need = args.workers + args.standby if args.tp == 1 else 2 + args.standby
        have = torch.cuda.device_count()
        if have < 1:
            raise ConcordiaError("a cuda backend needs a GPU; this machine has none")
        if need > have:
            print(f"note: {need} GPU actors on {have} GPUs: they share the cards")


def failover_main(args) -> int:
    args.backend = args.backend or ("cuda" if torch.cuda.is_available() else "reference")
    args.standby_backend = args.standby_backend or args.backend
    _check(args)
    mixed = device_of(args.backend) != device_of(args.standby_backend)
    spec = dict(config=args.config, batch=args.batch, prompt=args.prompt, tokens=args.tokens,
                block_size=16, seed=0, adapter_every=8, every=1, fsync="always",
                when_full="wait",
                # one dtype for both devices when a GPU's log is applied on a CPU
                dtype="float32" if mixed or device_of(args.backend) == "cpu" else "bfloat16")
    with tempfile.TemporaryDirectory(prefix="concordia-failover-") as tmp:
        log_dir = args.log_dir or tmp
        os.makedirs(log_dir, exist_ok=True)
        t = time.time()
        print("starting Ray on the loopback address ...", flush=True)
        gpus = torch.cuda.device_count()
        start_ray(num_gpus=gpus)
        print(f"  Ray up in {time.time() - t:.1f} s; starting workers and warm standbys "
              f"(model loaded, kernels compiled) ...", flush=True)
        plan = FailoverPlan(workers=args.workers, standby=args.standby, kill=args.kill,
                            hang=args.hang, slow=args.slow, kill_standby=args.kill_standby,
                            backend=args.backend, standby_backend=args.standby_backend,
                            spec=spec, deadline_s=args.deadline, seed=args.seed,
                            log_dir=log_dir, gpus_per_worker=1.0 if gpus else 0.0,
                            pace_s=0.01 if args.config == "tiny" else 0.0)
        try:
            if args.tp == 2:
                report = run_tp_failover(plan)
            else:
                report = run_failover(plan)
        finally:
            ray.shutdown()
    _summary(report)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0 if report["verified"] and not report["lost"] else 1


def _summary(report: dict):
    for r in report["recoveries"]:
        extra = f", after {len(r['failed_standbys'])} standby death(s)" if r["failed_standbys"] else ""
        if "restored_pos" in r and r["restored_pos"] is None:
            extra += ", restarted from the start (no commit was durable yet)"
        head = (f"{r['job']}: {r['from_worker']} ({r['from']}) {r['failure']} -> {r['to_worker']} "
                f"({r['to']}){extra}")
        if r.get("total_s") is None:   # its standby was replaced in turn: the next line has it
            print(f"{head}: detect {r['detect_s'] * 1e3:.1f} ms; its standby failed in turn")
            continue
        print(f"{head}: detect {r['detect_s'] * 1e3:.1f} ms, load "
              f"{r['load_s'] * 1e3:.1f} ms, apply {r['apply_s'] * 1e3:.1f} ms, resume "
              f"{r['resume_s'] * 1e3:.1f} ms; first new token {r['total_s'] * 1e3:.1f} ms after "
              f"the failure; {r['requests']} requests continued")
    if report.get("faults_made", 0) < report.get("faults_planned", 0):
        print(f"note: {report['faults_planned'] - report['faults_made']} planned fault(s) not "
              f"made: their job finished first")
    for name in report["lost"]:
        print(f"{name}: lost (no standby left)")
    if report["verified"]:
        print(f"verified: every request's tokens equal an uninterrupted run's "
              f"({len(report['jobs'])} jobs, {len(report['recoveries'])} recoveries)")
    else:
        bad = [j["job"] for j in report["jobs"]
               if not j["verified"] and j["job"] not in report["lost"]]
        print("NOT verified: " + "; ".join(
            [f"{', '.join(report['lost'])} lost"] * bool(report["lost"])
            + [f"{', '.join(bad)} differ from an uninterrupted run"] * bool(bad)))
