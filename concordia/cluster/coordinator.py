"""The recovery coordinator: decode jobs on Ray worker actors, warm standbys, failure detection,
and the four-phase recovery (detect, load, apply, resume) of the paper's Figure 4.

A worker is declared dead when Ray reports its actor gone (a crash or SIGKILL: the pending
call fails at once) or when it is hung: its heartbeat goes unanswered, or it answers without
progress while decoding, for longer than `deadline_s`. A slow worker, one that still makes a
step within the deadline, is left alone. The dead worker's process is then SIGKILLed (a hung
one may still be alive), and a standby takes the job over from the job's newest log that
holds a commit, writing a new log of its own (see worker.py: one writer per log). A standby
that dies during the takeover is replaced by the next one; with none left the job is lost,
which is reported, never hidden.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import ray
from ray._private import ray_constants
from ray.exceptions import RayActorError


from .worker import DecodeWorker, decode_args, device_of


RemoteDecodeWorker = ray.remote(DecodeWorker)


@dataclass
class FailoverPlan:
    """What to run and which faults to inject."""
    workers: int = 2
    standby: int = 1
    kill: int = 0            # SIGKILL this many times, at random steps (a job's server each time)
    hang: int = 0            # SIGSTOP this many workers at a random step (detected by deadline)
    slow: int = 0            # this many workers sleep `slow_step_s` every step (must survive)
    kill_standby: int = 0    # SIGKILL this many standbys in the middle of their takeover
    backend: str = "reference"
    standby_backend: str | None = None   # None: the workers' backend
    spec: dict = field(default_factory=dict)   # the decode job (see worker.SPEC_KEYS)
    deadline_s: float = 2.0
    heartbeat_s: float = 0.02
    slow_step_s: float = 0.2
    pace_s: float = 0.0      # every worker sleeps this per step: gives a toy model's few-ms
    #                          steps a real model's pace, so that faults land mid-job
    seed: int = 0
    log_dir: str = "."
    gpus_per_worker: float = 0.0


def fresh(path: str) -> str:
    """An epoch's log path with no file left at it by an earlier run: a worker given it writes
    a new log, and a standby that dies before writing its own leaves nothing that could be
    taken for this run's newest commit."""
    if os.path.exists(path):
        os.remove(path)
    return path


@dataclass
class Job:
    name: str
    prompt_seed: int
    logs: list = field(default_factory=list)
    actor: object = None
    info: dict = field(default_factory=dict)   # the serving actor's describe()
    ref: object = None
    kills: list = field(default_factory=list)  # positions at which to SIGKILL its server
    hang_at: int | None = None
    step_delay: float = 0.0
    status: dict = field(default_factory=dict)
    hb_ref: object = None
    hb_sent: float = 0.0
    progress_at: float = 0.0   # when its position last moved
    fault: tuple | None = None  # (kind, wall time) of a fault injected and not yet detected
    pending: dict | None = None  # the recovery under way
    result: dict | None = None

    def next_log(self, log_dir: str) -> str:
        """The job's next epoch file, cleared (see fresh)."""
        self.logs.append(fresh(os.path.join(log_dir, f"{self.name}.e{len(self.logs)}.clog")))
        return self.logs[-1]


class Coordinator:
    """What both coordinators share: the plan, the fault dice, the timeline, the actors made."""

    def __init__(self, plan: FailoverPlan, say=print):
        self.plan, self.say = plan, say
        self.rng = np.random.default_rng(plan.seed)
        self.t0 = time.time()
        self.timeline: list[dict] = []
        self.recoveries: list[dict] = []
        self.lost: list[str] = []
        self.standby_kills = plan.kill_standby
        self.actors: list = []

    def event(self, what: str, **kw):
        t = time.time() - self.t0
        self.timeline.append({"t": round(t, 4), "event": what, **kw})
        self.say(f"  {t:7.3f}s  {what}")

    def make_actor(self, remote_cls, name: str, backend: str):
        """A threaded actor of `remote_cls` (named for the timeline only: Ray names would
        outlive a run), a GPU of its own on cuda."""
        opts = dict(max_concurrency=4, num_cpus=0, max_restarts=0)
        if device_of(backend) == "cuda":
            opts["num_gpus"] = self.plan.gpus_per_worker or 1
        actor = remote_cls.options(**opts).remote(name, backend, self.plan.spec)
        self.actors.append(actor)
        return actor

    def stop_actors(self):
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


class RecoveryCoordinator(Coordinator):
    def __init__(self, plan: FailoverPlan, say=print):
        super().__init__(plan, say)
        self.faults_made = 0

    def _actor(self, name: str, backend: str):
        return self.make_actor(RemoteDecodeWorker, name, backend)

    def start_actors(self):
        p = self.plan
        self.jobs = [Job(f"job-{i}", prompt_seed=1000 + i) for i in range(p.workers)]
        workers = [self._actor(f"worker-{i}", p.backend) for i in range(p.workers)]
        sb = p.standby_backend or p.backend
        self.standbys = [(self._actor(f"standby-{i}", sb), None) for i in range(p.standby)]
        infos = ray.get([a.describe.remote() for a in workers + [s for s, _ in self.standbys]])
        for job, actor, info in zip(self.jobs, workers, infos):
            job.actor, job.info = actor, info
        self.standbys = [(a, info) for (a, _), info in zip(self.standbys, infos[p.workers:])]
        self.event(f"{p.workers} workers on {p.backend}, {p.standby} warm standbys on {sb}")

    def plan_faults(self):
        """Kills at random positions, spread over the jobs; a hung and a slow worker each on a
        job of its own where there are jobs enough."""
        p, tokens, prompt = self.plan, self.plan.spec["tokens"], self.plan.spec["prompt"]
        pick = lambda: int(prompt + self.rng.integers(2, max(3, tokens - 2)))   # noqa: E731
        order = list(self.rng.permutation(len(self.jobs)))
        for k in range(p.kill):
            self.jobs[order[k % len(order)]].kills.append(pick())
        for job in self.jobs:
            job.kills.sort()
        rest = order[p.kill:] + order[:p.kill]   # jobs without a kill first
        for i in rest[:p.hang]:
            self.jobs[i].hang_at = pick()
        for job in self.jobs:
            job.step_delay = p.pace_s
        for i in (rest[p.hang:] + rest[:p.hang])[:p.slow]:
            self.jobs[i].step_delay = p.slow_step_s

    # -- the run
    def run(self) -> list[Job]:
        self.start_actors()
        self.plan_faults()
        for job in self.jobs:
            job.ref = job.actor.start.remote(job.next_log(self.plan.log_dir), job.prompt_seed,
                                             job.step_delay)
            job.progress_at = time.time()
        while any(j.result is None and j.name not in self.lost for j in self.jobs):
            self._poll()
        return self.jobs

    def _active(self):
        return [j for j in self.jobs if j.result is None and j.name not in self.lost]

    def _poll(self):
        refs = {j.ref: j for j in self._active()}
        done, _ = ray.wait(list(refs), num_returns=1, timeout=self.plan.heartbeat_s)
        for ref in done:
            self._finished(refs[ref])
        for job in self._active():
            self._heartbeat(job)
            self._inject(job)

    def _finished(self, job: Job):
        try:
            job.result = ray.get(job.ref)
        except RayActorError:
            self._failed(job, "died")
            return
        if job.pending is not None:   # finished before a heartbeat saw its first token
            ph = job.result["phases"]
            self._recovered(job, ph, ph["first_token"])
        self.event(f"{job.name} finished on {job.info['name']}")

    def _heartbeat(self, job: Job):
        now = time.time()
        if job.hb_ref is not None:
            ready, _ = ray.wait([job.hb_ref], timeout=0)
            if ready:
                try:
                    st = ray.get(job.hb_ref)
                except RayActorError:
                    return    # its run call reports the death
                if st.get("pos", 0) != job.status.get("pos") or st["state"] != "decoding":
                    job.progress_at = now
                job.status, job.hb_ref = st, None
                if job.pending is not None and st.get("first_token") and st.get("phases"):
                    self._recovered(job, st["phases"], st["first_token"])
                    self.event(f"{job.name} resumed on {job.info['name']}")
            elif now - job.hb_sent > self.plan.deadline_s:
                self._failed(job, "hung (no heartbeat)")
                return
        if job.status.get("state") == "decoding" and now - job.progress_at > self.plan.deadline_s:
            self._failed(job, "hung (no progress)")
            return
        if job.hb_ref is None:
            job.hb_ref, job.hb_sent = job.actor.heartbeat.remote(), now

    def _inject(self, job: Job):
        pos = job.status.get("pos", 0)
        if job.fault is not None or job.status.get("state") != "decoding":
            return
        if job.kills and pos >= job.kills[0]:
            job.kills.pop(0)
            self.faults_made += 1
            os.kill(job.info["pid"], signal.SIGKILL)
            job.fault = ("SIGKILL", time.time())
            self.event(f"SIGKILL {job.info['name']} ({job.info['backend']}) of {job.name} "
                       f"at position {pos}")
        elif job.hang_at is not None and pos >= job.hang_at:
            job.hang_at = None
            self.faults_made += 1
            os.kill(job.info["pid"], signal.SIGSTOP)
            job.fault = ("SIGSTOP", time.time())
            self.event(f"SIGSTOP {job.info['name']} of {job.name} at position {pos} (hung)")

    # -- recovery
    def _failed(self, job: Job, how: str):
        now = time.time()
        dead = job.info
        try:
            os.kill(dead["pid"], signal.SIGKILL)   # fence: a hung worker may still be alive
        except ProcessLookupError:
            pass
        ray.kill(job.actor, no_restart=True)
        since = job.fault[1] if job.fault else job.progress_at
        job.fault, job.hb_ref, job.status = None, None, {}
        if job.pending is not None:   # the standby died during its takeover
            self.event(f"{dead['name']} {how} during its takeover of {job.name}")
            job.pending["failed_standbys"].append(dead["name"])
        else:
            job.pending = {"job": job.name, "from": dead["backend"], "from_worker": dead["name"],
                           "failure": how, "detect_s": now - since, "fault_at": since,
                           "failed_standbys": []}
            self.event(f"{dead['name']} {how}: detected in {(now - since) * 1e3:.1f} ms")
        self._assign(job)

    def _assign(self, job: Job):
        if not self.standbys:
            self.lost.append(job.name)
            self.event(f"{job.name} lost: no standby left")
            return
        actor, info = self.standbys.pop(0)
        logs_in = list(reversed(job.logs))   # the standby reads the newest with a commit
        log_out = job.next_log(self.plan.log_dir)
        job.actor, job.info = actor, info
        job.ref = actor.take_over.remote(logs_in, log_out, job.prompt_seed, job.step_delay)
        job.progress_at = time.time()
        self.event(f"{info['name']} ({info['backend']}) takes over {job.name}")
        if self.standby_kills > 0:
            self.standby_kills -= 1
            time.sleep(float(self.rng.uniform(0.0, 0.005)))   # within its load or apply
            os.kill(info["pid"], signal.SIGKILL)
            job.fault = ("SIGKILL", time.time())
            self.event(f"SIGKILL {info['name']} mid-takeover")

    def _recovered(self, job: Job, ph: dict, first_token: float):
        """The recovery under way is over: its standby produced a token."""
        rec = job.pending
        rec.update(to=job.info["backend"], to_worker=job.info["name"], load_s=ph["load_s"],
                   apply_s=ph["apply_s"], resume_s=first_token - ph["applied_at"],
                   restored_pos=ph["restored_pos"], requests=self.plan.spec["batch"],
                   log=ph["log_in"] and os.path.basename(ph["log_in"]),
                   total_s=first_token - rec.pop("fault_at"))
        self.recoveries.append(rec)
        job.pending = None


def reference_tokens(plan: FailoverPlan, job: Job) -> np.ndarray:
    """The job's tokens from an uninterrupted run in this process (no log)."""
    from ..llm import DecodeRun
    args = decode_args(plan.spec, plan.backend)
    args.log, args.async_checkpoints, args.prompt_seed = None, False, job.prompt_seed
    return DecodeRun(args).generate()


def start_ray(num_gpus: int = 0):
    """A private Ray instance bound to the loopback address (every Ray server listens on
    127.0.0.1 only), with usage reporting off: no traffic leaves the machine. Ray maps an
    asked-for 127.0.0.1 to the host's reachable address unless its single-machine mode is on
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read by Ray at import: set here for the processes
    it starts, and in its constants for this one)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    if ray.is_initialized():
        return
    ray.init(address="local", include_dashboard=False, num_cpus=max(2, os.cpu_count() or 2),
             num_gpus=num_gpus, log_to_driver=False, logging_level=logging.ERROR,
             configure_logging=True)


def run_failover(plan: FailoverPlan, say=print) -> dict:
    """Run the plan; the report `concordia failover --json` writes."""
    coord = RecoveryCoordinator(plan, say)
    t = time.time()
    try:
        jobs = coord.run()
    finally:
        coord.stop_actors()
    wall = time.time() - t
    verified, per_job = True, []
    for job in jobs:
        ok = job.result is not None and np.array_equal(
            np.asarray(job.result["tokens"]), reference_tokens(plan, job))
        verified &= ok
        per_job.append({"job": job.name, "verified": ok, "logs": job.logs,
                        "served_by": job.result["worker"] if job.result else None})
    return {"verified": bool(verified), "workers": plan.workers, "standby": plan.standby,
            "backend": plan.backend, "standby_backend": plan.standby_backend or plan.backend,
            "spec": plan.spec, "seconds": wall, "recoveries": coord.recoveries,
            "lost": coord.lost, "jobs": per_job, "timeline": coord.timeline,
            "faults_planned": plan.kill + plan.hang, "faults_made": coord.faults_made}
