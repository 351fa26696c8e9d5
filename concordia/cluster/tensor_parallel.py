"""A tensor-parallel decode job (TP=2) whose ranks are Ray actors joined by torch.distributed
(NCCL on GPUs, gloo on CPUs). Each rank checkpoints its own shard of the KV cache (with the
adapter and scheduler state) into its own log.

When a rank dies the communicator is rebuilt, never checkpointed: the survivors abort the
broken process group (their pending collective fails instead of waiting forever), every rank
rolls back to the newest step that all ranks hold committed (a survivor may be one step ahead
of the dead rank's log), a standby takes the dead rank's place and restores its log, and the
group is formed again under a new rendezvous. Each rank then writes a new log (one writer per
log, as for single workers).
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from datetime import timedelta

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.exceptions import RayActorError

from concordia_ir.errors import ConcordiaError

from ..backends import Runtime
from ..handlers.log import committed_image, scan_log
from ..llm import DecodeRun, Shard
from .coordinator import Coordinator, fresh
from .worker import decode_args, device_of, warm

WORLD = 2


def _all_reduce(t):
    dist.all_reduce(t)
    return t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TPRank:
    """A rank of the job, or a warm standby for any rank: weights and both shards loaded,
    kernels compiled, before it is needed."""

    def __init__(self, name: str, backend: str, spec: dict):
        torch.set_num_threads(1)
        self.name, self.backend = name, backend
        self.rt = Runtime(backend)
        self.runs = {}
        for rank in range(WORLD):
            run = DecodeRun(decode_args(spec, backend), Shard(rank, WORLD))
            warm(run, self.rt, backend)   # no collective yet: the shard's partial sums
            self.runs[rank] = run
        self.dist_backend = "nccl" if device_of(backend) == "cuda" else "gloo"
        self._lock, self._aborted = threading.Lock(), False
        self._status = {"state": "idle", "pos": 0, "since": time.time()}

    def _enter(self, state: str, pos: int):
        """The rank's state for heartbeats, with when it last changed (a decoding rank's
        changes with each token: the coordinator bounds a rank's time without progress)."""
        self._status = {"state": state, "pos": pos, "since": time.time()}

    def describe(self) -> dict:
        return {"name": self.name, "backend": self.backend, "pid": os.getpid()}

    def heartbeat(self) -> dict:
        with self._lock:
            return dict(self._status, t=time.time())

    def abort(self) -> bool:
        """Leave a broken group: its pending collective fails instead of waiting forever."""
        self._aborted = True
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        try:
            if abort is not None:
                abort()
            else:
                dist.destroy_process_group()
        except Exception:   # already torn down by the failed collective
            pass
        # a rendezvous that failed half-way leaves torch's group counter raised, and the next
        # group would be named apart from a fresh standby's: start the count again
        world = getattr(dist.distributed_c10d, "_world", None)
        if world is not None and not dist.is_initialized():
            world.group_count = 0
        return True

    def decode(self, rank: int, init_method: str, prompt_seed: int, log_out: str,
               log_in: str | None = None, checkpoint: int | None = None,
               step_delay: float = 0.0, join_timeout_s: float = 60.0) -> dict:
        run, phases = self.runs[rank], {}
        self._aborted = False
        start = None
        if log_in is not None:     # rejoin or take over: roll back to the agreed commit
            self._enter("loading", 0)
            run.args.log = log_in
            rec = run.resume(self.backend, self.rt, checkpoint)
            start = rec["restored_pos"]
            phases.update(load_s=rec["detect_s"] + rec["load_log_s"], apply_s=rec["apply_s"],
                          restored_pos=start)
        self._enter("joining", start or 0)
        t_join = time.time()
        try:   # a rank that never comes (a standby dead before joining) ends the wait
            dist.init_process_group(self.dist_backend, init_method=init_method, rank=rank,
                                    world_size=WORLD, timeout=timedelta(seconds=join_timeout_s))
        except Exception as e:
            self._enter("aborted", start or 0)
            self.abort()
            return {"aborted": True, "rank": rank, "error": f"{type(e).__name__}: {e}"[:300]}
        phases["join_s"] = time.time() - t_join
        phases["joined_at"] = time.time()
        run.model.shard = Shard(rank, WORLD, _all_reduce)
        run.args.log, run.args.prompt_seed = log_out, prompt_seed
        run.open_checkpointer(self.rt)
        first = []

        def tick(pos):
            if not first:
                first.append(time.time())
            self._enter("decoding", pos)
            if step_delay:
                time.sleep(step_delay)
        try:
            tokens = run.generate(start_pos=start, on_token=tick)
            run.ckpt.flush()
        except Exception as e:   # a collective failed: the group is broken (a rank died)
            self._enter("aborted", self._status["pos"])
            self.abort()
            return {"aborted": True, "rank": rank, "error": f"{type(e).__name__}: {e}"[:300]}
        finally:
            run.ckpt.close()
            run.ckpt = None
        dist.barrier()
        dist.destroy_process_group()
        self._enter("done", self._status["pos"])
        phases["first_token"] = first[0] if first else None
        return {"aborted": False, "rank": rank, "tokens": tokens.tolist(), "phases": phases,
                "worker": self.name, "backend": self.backend}


RemoteTPRank = ray.remote(TPRank)


def commit_for_position(scan, pos: int) -> int | None:
    """The checkpoint id of the log's newest commit whose scheduler state is at `pos`."""
    for cid in reversed(scan.checkpoint_ids):
        if commit_position(scan, cid) == pos:
            return cid
    return None


def commit_position(scan, checkpoint: int | None = None) -> int:
    """The decode position (the scheduler's kv_len) a commit holds."""
    image = committed_image(scan, checkpoint)
    sched = next(r for r in image.layout["regions"] if r["name"] == "sched")
    return int(image.rows[sched["id"]][0, :4].view(np.int32)[0])


class TPCoordinator(Coordinator):
    def __init__(self, plan, say=print):
        super().__init__(plan, say)
        self.history = [[] for _ in range(WORLD)]   # each rank's logs, oldest first
        self.pending = None                          # the recovery under way
        # a rank that never joins: give up then. It is also NCCL's collective timeout (its
        # watchdog), which must not fire on a first collective's communicator set-up: 10 s there
        self.join_timeout_s = 2 * plan.deadline_s
        if device_of(plan.backend) == "cuda" or device_of(plan.standby_backend or plan.backend) == "cuda":
            self.join_timeout_s = max(self.join_timeout_s, 10.0)

    def _actor(self, name, backend):
        return self.make_actor(RemoteTPRank, name, backend)

    def start(self):
        p = self.plan
        self.ranks = [self._actor(f"rank-{r}", p.backend) for r in range(WORLD)]
        self.standbys = [self._actor(f"standby-{i}", p.standby_backend or p.backend)
                         for i in range(p.standby)]
        infos = ray.get([a.describe.remote() for a in self.ranks + self.standbys])
        self.info = dict(zip(self.ranks + self.standbys, infos))
        self.event(f"TP={WORLD} job on {p.backend} ({WORLD} ranks), {p.standby} warm standbys")

    def _launch(self, epoch, logs_in=None, checkpoints=None):
        init = f"tcp://127.0.0.1:{free_port()}"
        self.logs = [os.path.join(self.plan.log_dir, f"tp-rank{r}.e{epoch}.clog")
                     for r in range(WORLD)]
        for r, log in enumerate(self.logs):
            self.history[r].append(fresh(log))
        return [a.decode.remote(r, init, 77, self.logs[r],
                                logs_in[r] if logs_in else None,
                                checkpoints[r] if checkpoints else None, self.plan.pace_s,
                                self.join_timeout_s)
                for r, a in enumerate(self.ranks)]

    def run(self, kills: list[int]):
        epoch, refs = 0, self._launch(0)
        results, waiting = [None] * WORLD, set(range(WORLD))
        while waiting:
            done, _ = ray.wait([refs[r] for r in waiting], num_returns=len(waiting),
                               timeout=self.plan.heartbeat_s)
            dead = []
            for ref in done:
                r = refs.index(ref)
                waiting.discard(r)
                try:
                    results[r] = ray.get(ref)
                except RayActorError:
                    dead.append(r)
            if dead:
                epoch += 1
                refs = self._recover(dead, refs, waiting, epoch)
                results, waiting = [None] * WORLD, set(range(WORLD))
            elif any(res is not None and res["aborted"] for res in results) and not waiting:
                raise ConcordiaError("the TP group broke with no rank dead: "
                                     + "; ".join(str(res.get("error")) for res in results))
            elif len(waiting) == WORLD:
                if self.pending is not None:
                    self._close_recovery()
                if kills:
                    self._maybe_kill(kills)
        return results

    def _close_recovery(self):
        """The recovery under way is over once every rank decodes in the rebuilt group."""
        try:
            states = ray.get([a.heartbeat.remote() for a in self.ranks])
        except RayActorError:
            return   # a rank died: its decode call reports it
        if all(st["state"] == "decoding" for st in states):
            self.recoveries.append(self.pending)
            self.pending = None

    def _maybe_kill(self, kills):
        rank = int(self.rng.integers(0, WORLD))
        status = ray.get(self.ranks[rank].heartbeat.remote())
        pos = status["pos"]
        # decoding: until its decode call starts, a rank reports the previous pass's end (on a
        # loaded host a kill then came before the new log's first commit)
        if status["state"] == "decoding" and pos >= kills[0]:
            kills.pop(0)
            os.kill(self.info[self.ranks[rank]]["pid"], signal.SIGKILL)
            self.fault_at = time.time()
            self.event(f"SIGKILL rank {rank} ({self.info[self.ranks[rank]]['name']}) "
                       f"at position {pos}")

    def _recover(self, dead: list[int], refs, waiting, epoch):
        now = time.time()
        names = ", ".join(self.info[self.ranks[d]]["name"] for d in dead)
        self.event(f"rank {', '.join(map(str, dead))} ({names}) died: detected in "
                   f"{(now - self.fault_at) * 1e3:.1f} ms")
        if self.pending is not None:    # a standby died before the group was rebuilt
            self.pending["failed_standbys"].append(names)
        else:
            self.pending = {"job": "tp", "from": self.plan.backend, "rank": dead[0],
                            "failure": "died", "from_worker": names,
                            "detect_s": now - self.fault_at, "failed_standbys": [],
                            "fault_at": self.fault_at}
        for r in waiting:   # survivors in the broken collective (or rendezvous) leave it
            self.ranks[r].abort.remote()
        also = [r for r in sorted(waiting) if not self._await_leave(r, refs[r])]
        if also:    # a survivor died on its way out: its rank is replaced as well
            self.event(f"rank {', '.join(map(str, also))} died while leaving the broken group")
            self.pending["failed_survivors"] = also
            dead = sorted(dead + also)
        t_agree = time.time()
        self.event(f"the survivors left the broken group in {(t_agree - now) * 1e3:.1f} ms")
        if len(self.standbys) < len(dead):
            self.lost.append("tp")
            raise ConcordiaError(f"{len(dead)} TP rank(s) died and {len(self.standbys)} "
                                 f"standby(s) are left")
        logs_in, checkpoints, target, positions = self._rollback_point()
        self.event(f"rollback point: position {target} (the ranks' last commits: {positions}), "
                   f"agreed in {(time.time() - t_agree) * 1e3:.1f} ms")
        for d in dead:
            self.ranks[d] = self.standbys.pop(0)
            self.event(f"{self.info[self.ranks[d]]['name']} takes rank {d}; the group is "
                       f"rebuilt (epoch {epoch})")
        refs = self._launch(epoch, logs_in=logs_in, checkpoints=checkpoints)
        standby = self.ranks[dead[0]]
        self.pending.update(to=self.info[standby]["backend"], to_worker=self.info[standby]["name"],
                            leave_s=t_agree - now, agree_s=time.time() - t_agree,
                            requests=self.plan.spec["batch"])
        if self.standby_kills > 0:
            self.standby_kills -= 1
            time.sleep(float(self.rng.uniform(0.0, 0.005)))
            os.kill(self.info[standby]["pid"], signal.SIGKILL)
            self.fault_at = time.time()
            self.event(f"SIGKILL {self.info[standby]['name']} before the group is rebuilt")
        return refs

    def _stuck_after(self, state: str) -> float:
        """How long a leaving rank may stay in `state` with no change before it is taken for
        hung. A rendezvous with a dead peer ends at its timeout, and its client retries the
        connection once; a broken collective fails at most at the same timeout (each given
        twice that on a loaded host: a gloo survivor took 2.9 s with a 2 s timeout on the
        2-core box); loading a log is progress, bounded only against a hang."""
        if state == "joining":
            return 4 * self.join_timeout_s + self.plan.deadline_s
        if state == "loading":
            return max(60.0, 10 * self.join_timeout_s)
        return 2 * self.join_timeout_s + self.plan.deadline_s

    def _await_leave(self, r: int, ref) -> bool:
        """Wait for survivor `r` to leave the broken group, for as long as it is on its way
        out: it answers heartbeats and has not stayed in one state past `_stuck_after` (timed
        by the rank's own clock, so a loaded host's slow restore is not taken for a hang, and
        counted from when this wait began: a rank whose new call has not started yet still
        reports its last pass's end). False: it died on the way."""
        began = time.time()
        while not ray.wait([ref], timeout=0.25)[0]:
            try:
                st = ray.get(self.ranks[r].heartbeat.remote(), timeout=10 * self.plan.deadline_s)
            except RayActorError:
                break   # it died as well: its decode call says so below
            except ray.exceptions.GetTimeoutError:
                raise ConcordiaError(f"rank {r} stopped answering heartbeats while leaving the "
                                     f"broken group") from None
            stuck = min(st["t"] - st["since"], time.time() - began)
            if stuck > self._stuck_after(st["state"]):
                raise ConcordiaError(f"rank {r} did not leave the broken group: {st['state']} "
                                     f"with no change for {stuck:.1f} s")
        try:
            ray.get(ref)
        except RayActorError:
            return False
        return True

    def _rollback_point(self):
        """Each rank's newest log holding a commit gives its last step; the rollback point is
        the smallest, and each rank restores the commit at it from the newest of its logs that
        holds one (a new epoch whose group never formed has none and is passed over). A rank
        with no commit at all (killed before its first one was durable) sends the job back to
        its start."""
        scans = []
        for r in range(WORLD):
            mine = []
            for log in reversed(self.history[r]):
                try:
                    scan = scan_log(log)
                except ConcordiaError:   # never written (its rank died before joining)
                    continue
                if scan.commit_ends:
                    mine.append(scan)
            if not mine:   # it died before its first commit was durable: nothing to keep
                return None, None, "the start", f"none on rank {r}"
            scans.append(mine)
        positions = [commit_position(mine[0]) for mine in scans]
        target = min(positions)
        logs_in, checkpoints = [], []
        for r, mine in enumerate(scans):
            found = next(((scan.path, cid) for scan in mine
                          if (cid := commit_for_position(scan, target)) is not None), None)
            if found is None:
                raise ConcordiaError(f"rank {r}: no commit at position {target} in its logs")
            logs_in.append(found[0])
            checkpoints.append(found[1])
        return logs_in, checkpoints, target, positions


def run_tp_failover(plan, say=print) -> dict:
    """A clean TP pass (the reference tokens), then the same job with `plan.kill` rank kills."""
    coord = TPCoordinator(plan, say)
    try:
        coord.start()
        t = time.time()
        clean = coord.run([])
        coord.event("clean pass done (the reference tokens)")
        p = plan.spec["prompt"]
        kills = sorted(int(p + coord.rng.integers(2, plan.spec["tokens"] - 2))
                       for _ in range(plan.kill))
        got = coord.run(kills)
        if coord.pending is not None:   # the job ended before a heartbeat saw it decoding
            coord.recoveries.append(coord.pending)
            coord.pending = None
        wall = time.time() - t
    finally:
        coord.stop_actors()
    for rec in coord.recoveries:   # the new standby's phases, from the rank that replaced
        ph = next((g["phases"] for g in got if g["worker"] == rec["to_worker"]), None)
        fault_at = rec.pop("fault_at")
        if ph is None or ph.get("first_token") is None:   # replaced again later: phases gone
            rec["total_s"] = None
            continue
        # a job sent back to its start (no rank had a commit) loads and applies nothing
        rec.update(load_s=ph.get("load_s", 0.0), apply_s=ph.get("apply_s", 0.0),
                   restored_pos=ph.get("restored_pos"), join_s=ph["join_s"],
                   resume_s=ph["first_token"] - ph["joined_at"],
                   total_s=ph["first_token"] - fault_at)
    verified = all(np.array_equal(np.asarray(a["tokens"]), np.asarray(b["tokens"]))
                   for a, b in zip(clean, got)) and \
        np.array_equal(np.asarray(got[0]["tokens"]), np.asarray(got[1]["tokens"]))
    return {"verified": bool(verified), "tp": WORLD, "workers": WORLD, "standby": plan.standby,
            "backend": plan.backend, "standby_backend": plan.standby_backend or plan.backend,
            "spec": plan.spec, "seconds": wall, "recoveries": coord.recoveries,
            "lost": coord.lost, "jobs": [{"job": "tp", "verified": bool(verified)}],
            "timeline": coord.timeline}
