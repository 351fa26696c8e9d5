"""The command line of the LLM workload (concordia/llm.py): a Qwen3-architecture decode loop
whose KV cache, LoRA adapter and scheduler state are checkpointed by Concordia.

    python examples/llm_decode.py --config tiny --tokens 48 --log run.clog --every 4
    python examples/llm_decode.py --config tiny --tokens 48 --log run.clog --every 4 \\
        --crash-after 30          # SIGKILLs itself mid-generation
    python examples/llm_decode.py --config tiny --tokens 48 --log run.clog --resume \\
        --restore-backend reference   # a new process restores and continues

Greedy decoding: the resumed run's tokens equal an uninterrupted run's (the test checks it).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if "ring" in sys.argv:   # --device-side ring: every kernel loaded before the resident one starts
    os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

from concordia.llm import DecodeRun, parse_args  # noqa: E402


def main(argv=None) -> int:
    from concordia_ir.errors import ConcordiaError
    a = parse_args(argv)
    try:
        run = DecodeRun(a)
        report = {"config": asdict(run.cfg), "batch": a.batch, "device": str(run.device)}
        if a.resume:
            rec = run.resume(a.restore_backend or a.backend or run.default_backend())
            t = time.perf_counter()
            first = []
            tokens = run.generate(start_pos=rec["restored_pos"],
                                  on_token=lambda pos: first.append(time.perf_counter() - t))
            rec["resume_s"] = first[0] if first else 0.0
            report["recovery"] = rec
            print(f"resumed at position {rec['restored_pos']} of round {int(run.sched.host[4])} "
                  f"(detect {rec['detect_s'] * 1e3:.1f} ms, load {rec['load_log_s'] * 1e3:.1f} ms, "
                  f"apply {rec['apply_s'] * 1e3:.1f} ms, first token {rec['resume_s'] * 1e3:.1f} ms)")
        else:
            if a.log:
                if os.path.exists(a.log):
                    os.remove(a.log)   # a fresh run starts a fresh log
                run.open_checkpointer()
            t = time.perf_counter()
            tokens = run.generate(crash_after=a.crash_after)
            report["seconds"] = time.perf_counter() - t
            report["checkpoints"] = run.stats
        if run.ckpt is not None:
            run.ckpt.close()
        if a.out:
            np.save(a.out, tokens)
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(report, fh, indent=2)
        print(f"generated {a.tokens} tokens x {a.batch} sequences; last: {tokens[:, -4:].tolist()}")
        return 0
    except ConcordiaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
