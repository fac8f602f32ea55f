"""Chaos against the served cluster (the README's "Reliability" table).

Deploys the default shape plus a second decode gang (1 prefill gang x 2 ranks, 2 decode gangs x
2 ranks, tiny DeepSeek-V3 with a 4k context) in this script's own Ray, then, for each kind of
fault in turn (a decode rank, a prefill rank, the Router replica), `--kills` times: starts N
greedy streams, SIGKILLs one replica process by PID while they stream (or SIGSTOPs a decode
rank: a stuck peer, found by missed heartbeats and collective timeouts), and reports
- lost: streams that ended with an error (for the Router kill, UNAVAILABLE is the contract; any
  other code counts as wrong),
- mismatched: streams whose tokens differ from the offline engine (duplicated or missing tokens
  show up here),
- longest stall: the longest gap between two tokens of any stream,
- back after: seconds from the kill until GetClusterStatus shows every rank again.
Then a cancel storm (100 streams cancelled at random points: before the first token, between
prefill and decode, mid-stream) and the KV blocks / requests still held 2 s later, and
`--fuzz` random requests (every field, absurd values included) counting INTERNAL/UNKNOWN answers.

    .venv/bin/python -m bench.chaos                  # --streams 16 --kills 3 --fuzz 1000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import ray
from ray._private import state as ray_state

from cluster.config import ClusterConfig
from cluster.embedded import start_embedded_ray
from cluster.launch import deploy, undeploy
from cluster.net import free_port
from cluster.tiny import make_tiny
from router.client import ClientError, InferenceClient
from router.proto import inference_pb2 as pb
from workers.engine import SamplingParams
from workers.engine.build import build_engine

NEW_TOKENS = 48


def _alive_replicas() -> dict[str, tuple[str, int]]:
    """Serve replica id -> (deployment, PID)."""
    out = {}
    for a in ray_state.actors(actor_state_name="ALIVE").values():
        name = a["Name"] or ""
        if name.startswith("SERVE_REPLICA::"):
            _, deployment, rid = name.split("#")
            out[rid] = (deployment, int(a["Pid"]))
    return out


def _ranks(c: InferenceClient) -> dict[str, list[pb.RankStatus]]:
    try:
        s = c.cluster_status()
    except ClientError:
        return {}
    return {d.name: [r for g in d.gangs for r in g.ranks] for d in s.deployments}


def _wait_full(c: InferenceClient, idle: bool = False, timeout_s: float = 300) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        rs = _ranks(c)
        full = len(rs.get("prefill", [])) == 2 and len(rs.get("decode", [])) == 4
        quiet = all(
            r.running_requests == 0 and r.kv_blocks_used == 0 for v in rs.values() for r in v
        )
        if full and (quiet or not idle):
            return time.monotonic() - t0
        time.sleep(0.1)
    raise TimeoutError("the cluster did not come back")


class _Stream:
    def __init__(self, target: str, prompt: list[int]) -> None:
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.error: ClientError | None = None
        self.thread = threading.Thread(target=self._run, args=(target, prompt), daemon=True)
        self.thread.start()

    def _run(self, target: str, prompt: list[int]) -> None:
        with InferenceClient(target, timeout_s=600) as c:
            try:
                for ch in c.generate(
                    prompt_token_ids=prompt, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True
                ):
                    self.tokens += ch.token_ids
                    self.times.append(time.monotonic())
            except ClientError as e:
                self.error = e


def _fault(kind: str, target: str, c: InferenceClient, prompts, ref) -> dict:
    _wait_full(c, idle=True)
    streams = [_Stream(target, p) for p in prompts]
    deadline = time.monotonic() + 120
    while sum(len(s.tokens) >= 3 for s in streams) < len(streams) * 3 // 4:
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    replicas = _alive_replicas()
    ranks = _ranks(c)
    if kind == "Router":
        victim = next(rid for rid, (dep, _) in replicas.items() if dep == "Router")
    else:
        stage = "prefill" if kind == "PrefillRank" else "decode"
        key = (
            (lambda r: r.running_requests)
            if stage == "decode"
            else (lambda r: r.queued_prompt_tokens + r.running_requests)
        )
        victim = max(ranks[stage], key=key).replica_id
    killed_at = time.monotonic()
    pid = replicas[victim][1]
    os.kill(pid, signal.SIGSTOP if kind == "FrozenDecodeRank" else signal.SIGKILL)
    for s in streams:
        s.thread.join(600)
    if kind == "FrozenDecodeRank":
        with contextlib.suppress(ProcessLookupError):  # Serve may have replaced it already
            os.kill(pid, signal.SIGCONT)
    back = _recovery_time(c, killed_at)
    gaps = [b - a for s in streams for a, b in zip(s.times, s.times[1:], strict=False)]
    lost = [s.error for s in streams if s.error is not None]
    wrong_code = [e for e in lost if kind != "Router" or e.code != grpc.StatusCode.UNAVAILABLE]
    ok = [s for s in streams if s.error is None]
    return {
        "lost": len(lost),
        "wrong_code": len(wrong_code),
        "mismatched": sum(s.tokens != r for s, r in zip(streams, ref, strict=True) if s in ok),
        "stall": max(gaps, default=0.0),
        "back": back,
        "codes": sorted({e.code.name for e in lost}),
    }


def _recovery_time(c: InferenceClient, killed_at: float) -> float:
    _wait_full(c)
    return time.monotonic() - killed_at


def _cancel_storm(target: str, c: InferenceClient, n: int = 100) -> tuple[int, int]:
    _wait_full(c, idle=True)
    rnd = random.Random(7)

    def one(i: int) -> None:
        with InferenceClient(target, timeout_s=120) as cl:
            stream = cl.generate(
                prompt_token_ids=[rnd.randrange(3, 500)] * rnd.randrange(4, 300),
                max_tokens=3000,
                ignore_eos=True,
            )
            cut = rnd.choice([0, 1, 2, 10, 60])
            try:
                for k, _ in enumerate(stream, 1):
                    if k >= cut:
                        break
            except ClientError:
                pass
            finally:
                stream.close()

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(n)))
    time.sleep(2.0)  # the measurement: what is still held 2 s after the last cancel
    rs = _ranks(c)
    return (
        sum(r.kv_blocks_used for v in rs.values() for r in v),
        sum(r.running_requests for v in rs.values() for r in v),
    )


def _fuzz(target: str, n: int) -> dict[str, int]:
    rnd = random.Random(11)
    weird = [0.0, -1.0, 1e-40, 5e-324, 1e30, float("nan"), float("inf"), -float("inf"), 0.5, 2.0]
    codes: dict[str, int] = {}
    channel = grpc.insecure_channel(target)
    call = channel.unary_stream(
        "/moe.v1.Inference/Generate",
        request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=pb.GenerateResponse.FromString,
    )

    def one(i: int) -> str:
        req = pb.GenerateRequest()
        shape = rnd.random()  # mostly exactly one input, sometimes both or neither
        if shape < 0.55 or shape > 0.95:
            n = rnd.randrange(0, 40)
            req.prompt = "".join(chr(rnd.randrange(32, 0x2FFF)) for _ in range(n))
        if shape > 0.5:
            n = rnd.randrange(0, 20)
            req.prompt_token_ids.extend(rnd.randrange(-5, 600) for _ in range(n))
        s = req.sampling
        s.max_tokens = rnd.choice([0, 1, 2, 8, 8, 8, 16, -3, 5000, 2**31 - 1])
        if rnd.random() < 0.8:
            s.temperature = rnd.choice(weird)
        if rnd.random() < 0.3:
            s.top_p = rnd.choice(weird + [1.0, 0.9, 1e-9])
        s.top_k = rnd.choice([0, 1, -1, 2**31 - 1])
        if rnd.random() < 0.3:
            s.seed = rnd.randrange(-(2**63), 2**63)
        if rnd.random() < 0.2:
            s.stop.extend(["", "a" * rnd.randrange(1, 400)][: rnd.randrange(0, 3)])
        if rnd.random() < 0.2:
            s.stop_token_ids.extend([rnd.randrange(-3, 600)])
        s.ignore_eos = rnd.random() < 0.5
        if rnd.random() < 0.3:
            s.logprobs = rnd.choice([-1, 0, 5, 20, 21])
        try:
            list(call(req, timeout=120))
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    with ThreadPoolExecutor(16) as pool:
        for code in pool.map(one, range(n)):
            codes[code] = codes.get(code, 0) + 1
    channel.close()
    return codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--fuzz", type=int, default=1000)
    ap.add_argument("--kinds", default="DecodeRank,PrefillRank,Router,FrozenDecodeRank")
    args = ap.parse_args()
    model = Path(tempfile.mkdtemp()) / "tiny"
    make_tiny("deepseek_v3", model, seed=1, overrides={"max_position_embeddings": 4096})
    start_embedded_ray(num_cpus=2, include_dashboard=False)
    port = free_port()
    cfg = ClusterConfig.from_args(
        {
            "model": {"path": str(model)},
            "prefill": {"gang_size": 2, "step_token_budget": 64, "num_cpus_per_rank": 0.01},
            "decode": {"gang_size": 2, "num_gangs": 2, "num_cpus_per_rank": 0.01},
            "router": {"port": port, "request_timeout_s": 600, "max_queued_requests": 512},
        }
    )
    deploy(cfg.with_overrides(http_port=free_port()), timeout_s=600)
    target = f"localhost:{port}"
    rnd = random.Random(3)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    engine = build_engine(model)
    try:
        with InferenceClient(target, timeout_s=60) as c:
            print(
                "| fault | kills | streams | lost | wrong code | mismatched | longest stall s "
                "(max) | back after s (max) |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            for kind in args.kinds.split(","):
                rows = []
                for _ in range(args.kills):
                    length = 300 if kind == "PrefillRank" else 12
                    prompts = [
                        [rnd.randrange(3, 500) for _ in range(length)] for _ in range(args.streams)
                    ]
                    ref = [o.token_ids for o in engine.generate([(p, params) for p in prompts])]
                    rows.append(_fault(kind, target, c, prompts, ref))
                print(
                    f"| {kind} | {args.kills} | {args.streams} | "
                    f"{sum(r['lost'] for r in rows)} | {sum(r['wrong_code'] for r in rows)} | "
                    f"{sum(r['mismatched'] for r in rows)} | "
                    f"{max(r['stall'] for r in rows):.2f} | {max(r['back'] for r in rows):.1f} |"
                    f" {sorted({x for r in rows for x in r['codes']})}",
                    flush=True,
                )
            kv, running = _cancel_storm(target, c)
            print(
                f"\ncancel storm (100 streams): 2 s later {kv} KV blocks, {running} requests held"
            )
            codes = _fuzz(target, args.fuzz)
            bad = codes.get("INTERNAL", 0) + codes.get("UNKNOWN", 0)
            print(f"fuzz ({args.fuzz} requests): {codes}; INTERNAL/UNKNOWN: {bad}")
    finally:
        undeploy()
        ray.shutdown()


if __name__ == "__main__":
    main()
