"""What another process on the same cores costs a decode step: the engine alone, then beside a
competitor that burns a fixed share of one core in short bursts.

    python -m bench.interference [--preset bench] [--streams 32] [--threads 2]
                                 [--burst-ms 0.3,1] [--every-ms 1.5,5]

C prompts of 64 random tokens are added at once to one in-process engine (a one-rank gang's:
its experts placed as a serving rank places them) and stepped until every one has 128 tokens;
reported: the p50 / p10 duration of the steps that decode all C rows. Then the same with each
competitor: a separate process that burns `--burst-ms[i]` of its own CPU time (work, as a
router's fan-out is: preempted, it takes longer, not less) every `--every-ms[i]`. As in the
cluster, the engine runs at `--niceness` (a rank's stage default, 15) and the competitors at
the niceness this process started with (the serving plane's, 0): they are started before the
engine's threads are lowered, stopped (SIGSTOP) until their row, and killed by PID. On a
machine with as many cores as the engine has threads, a step that grows by about the
competitor's CPU per step means every microsecond another process runs (a router, clients,
Ray) is a microsecond of decode: the serving benchmark's 1 + 1 gap.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

import torch

from bench.serve import checkpoint
from cluster.app import engine_config
from cluster.config import ClusterConfig
from workers.cores import set_niceness
from workers.engine import SamplingParams
from workers.engine.build import build_engine
from workers.ep_rank import num_routed_experts
from workers.loader import load_config
from workers.moe.placement import contiguous_placement

_BURN = """
import sys, time
busy, every = float(sys.argv[1]) / 1e3, float(sys.argv[2]) / 1e3
while True:
    start, spent = time.perf_counter(), time.thread_time()
    while time.thread_time() - spent < busy:
        pass
    time.sleep(max(0.0, every - (time.perf_counter() - start)))
"""


def decode_steps_ms(engine, prompts: list[list[int]], new: int) -> list[float]:
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", params, prompt_token_ids=p)
    out = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        dt = (time.perf_counter() - t) * 1e3
        s = engine.stats()
        if s.num_requests == len(prompts) and s.num_queued_prompt_tokens == 0:
            out.append(dt)
    return out[2:]  # the first full steps still import the last prefills' state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="deepseek_v3")
    ap.add_argument("--preset", default="bench", choices=["tiny", "bench"])
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--burst-ms", default="0.3,1")
    ap.add_argument("--every-ms", default="1.5,5")
    ap.add_argument("--niceness", type=int, default=15, help="the engine's (a served rank's)")
    args = ap.parse_args()
    bursts = [float(b) for b in args.burst_ms.split(",")]
    everies = [float(e) for e in args.every_ms.split(",")]
    if len(bursts) != len(everies) or any(
        b <= 0 or b >= e for b, e in zip(bursts, everies, strict=False)
    ):
        sys.exit(
            "--burst-ms and --every-ms need as many values, each burst shorter than its period"
        )

    args.start_niceness = os.getpriority(os.PRIO_PROCESS, 0)
    # the competitors first, at this process's niceness, paused until their row
    burns = [
        subprocess.Popen([sys.executable, "-c", _BURN, str(b), str(e)])
        for b, e in zip(bursts, everies, strict=True)
    ]
    for burn in burns:
        os.kill(burn.pid, signal.SIGSTOP)
    try:
        rows = _measure(args, bursts, everies, burns)
    finally:
        for burn in burns:
            burn.kill()
            burn.wait(10)
    _print(args, rows)


def _measure(args, bursts, everies, burns) -> list[tuple[str, float, list[float]]]:
    set_niceness(args.niceness)
    torch.set_num_threads(args.threads)
    path = checkpoint(args.arch, args.preset)
    cfg = ClusterConfig.from_args({"model": {"path": str(path)}})
    placement = contiguous_placement(num_routed_experts(load_config(path)), 1, None)
    engine = build_engine(
        path, progress=False, config=engine_config(cfg, "decode"), shard=(placement, 0)
    )
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 4000, (args.streams, 64), generator=g).tolist()
    decode_steps_ms(engine, prompts, 8)  # warm-up

    rows = [("alone", 0.0, decode_steps_ms(engine, prompts, args.new_tokens))]
    for busy, every, burn in zip(bursts, everies, burns, strict=True):
        os.kill(burn.pid, signal.SIGCONT)
        try:
            rows.append((f"{busy} ms every {every} ms", busy / every, decode_steps_ms(
                engine, prompts, args.new_tokens
            )))  # fmt: skip
        finally:
            os.kill(burn.pid, signal.SIGSTOP)
    return rows


def _print(args, rows: list[tuple[str, float, list[float]]]) -> None:
    base = statistics.median(rows[0][2])
    print(f"\n{args.arch} ({args.preset}), {args.streams} rows per decode step, "
          f"{args.threads} threads, engine at nice {args.niceness}, competitors at nice "
          f"{args.start_niceness}")  # fmt: skip
    print("| competitor | its share of a core | competitor CPU per step ms | step p50 / p10 ms | "
          "step longer by ms | per ms of its CPU |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name, share, steps in rows:
        p50, p10 = statistics.median(steps), sorted(steps)[len(steps) // 10]
        cost = f"{(p50 - base) / (share * p50):.2f}" if share else "—"
        print(f"| {name} | {share:.0%} | {share * p50:.1f} | {p50:.1f} / {p10:.1f} | "
              f"{p50 - base:+.1f} | {cost} |")  # fmt: skip


if __name__ == "__main__":
    main()
