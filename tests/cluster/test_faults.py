"""Faults against the served cluster: real Ray Serve, real gRPC, real SIGKILL of real replica
processes by PID. One deployment for the module: 1 prefill gang x 2 ranks, 2 decode gangs x 2
ranks, tiny DeepSeek-V3 (4k context), auth off.

- a decode rank killed with 8 greedy streams in flight: every stream completes with the tokens
  of a fault-free run (they migrate to the other decode gang);
- a prefill rank killed during prefill: the same (the requests wait for a prefill gang, bounded
  by their deadline, and their first tokens come from the restarted one);
- the Router replica killed: its clients get UNAVAILABLE, never INTERNAL; new requests succeed
  once Serve restarted it and its ranks aborted every request it had submitted;
- a cancel storm: every rank back to 0 KV blocks and 0 requests within 2 s;
- degenerate sampling values: no rank restarts (same replica PIDs before and after);
- a 5 MB prompt is refused before any work and does not stall another stream;
- attacks on every rank's port while streams run (tests/attacks.py): nothing changes but one
  log line each;
- GetClusterStatus answers after each fault.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray
from ray._private import state as ray_state

from cluster.app import APP_NAME
from cluster.launch import deploy, undeploy
from cluster.net import free_port
from cluster.registry import RankListing, list_ranks
from cluster.tiny import make_tiny
from cluster.wire_key import wire_key
from router.client import ClientError, InferenceClient
from router.proto import inference_pb2 as pb
from tests.attacks import ATTACKS, attack
from tests.cluster.shapes import two_stage_config
from workers.engine import SamplingParams
from workers.engine.build import build_engine

pytestmark = pytest.mark.timeout(900)
NEW_TOKENS = 160  # long enough that the kill lands mid-stream
DRAIN_TOKENS = 640  # the drain test's: still decoding when a (0.5 s-old) status shows them
RECOVER_S = 180  # a gang restart loads the model again on a loaded 2-core machine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepseek-faults")
    return make_tiny("deepseek_v3", out, seed=1, overrides={"max_position_embeddings": 4096})


@pytest.fixture(scope="module")
def target(model_dir, ray_cluster):
    port = free_port()
    cfg = two_stage_config(
        model_dir, port, step_token_budget=32, request_timeout_s=240, max_queued_requests=256
    )
    deploy(cfg.with_overrides(http_port=free_port()), timeout_s=300)
    yield f"localhost:{port}"
    undeploy()


@pytest.fixture
def client(target):
    with InferenceClient(target, timeout_s=240) as c:
        yield c


def _ranks(client: InferenceClient) -> dict[str, list[pb.RankStatus]]:
    status = client.cluster_status()
    return {d.name: [r for g in d.gangs for r in g.ranks] for d in status.deployments}


def _wait(client: InferenceClient, ok, what: str, timeout_s: float = RECOVER_S):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ranks = _ranks(client)
            if ok(ranks):
                return ranks
        except ClientError as e:  # GetClusterStatus must keep answering: only UNAVAILABLE
            assert e.code == grpc.StatusCode.UNAVAILABLE, e
            ranks = {}
        if time.monotonic() > deadline:
            brief = "; ".join(
                f"{stage} {r.replica_id}: running {r.running_requests}, queued "
                f"{r.queued_prompt_tokens}, kv {r.kv_blocks_used}"
                for stage, rs in ranks.items()
                for r in rs
            )
            pytest.fail(f"cluster status never showed {what}: {brief}")
        time.sleep(0.2)  # polling the cluster's state, bounded by the deadline


def _healthy_and_idle(ranks) -> bool:
    all_ranks = ranks.get("prefill", []) + ranks.get("decode", [])
    return (
        len(ranks.get("prefill", [])) == 2
        and len(ranks.get("decode", [])) == 4
        and all(r.running_requests == 0 and r.kv_blocks_used == 0 for r in all_ranks)
    )


def _replica_pids() -> dict[str, int]:
    """Serve replica id -> PID of every live replica actor of this app."""
    pids = {}
    for a in ray_state.actors(actor_state_name="ALIVE").values():
        name = a["Name"] or ""
        if name.startswith("SERVE_REPLICA::"):
            pids[name.rsplit("#", 1)[-1]] = int(a["Pid"])
    return pids


def _signal_rank(replica_id: str, sig: int) -> int:
    """Send sig to the replica's process; returns its PID. Ray's actor table can lag a replica
    that Serve has just replaced or restarted, so a PID that is gone is looked up again."""
    deadline = time.monotonic() + 30
    while True:
        pid = _replica_pids().get(replica_id)
        if pid is not None:
            try:
                os.kill(pid, sig)
                return pid
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            pytest.fail(f"no live process for replica {replica_id} (last PID {pid})")
        time.sleep(0.2)  # polling Ray's actor table, bounded by the deadline


def _router_pid() -> int:
    for a in ray_state.actors(actor_state_name="ALIVE").values():
        if (a["Name"] or "").startswith("SERVE_REPLICA::") and "#Router#" in a["Name"]:
            return int(a["Pid"])
    raise AssertionError("no live Router replica")


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(3, 500) for _ in range(length)] for _ in range(n)]


def _reference(model_dir, prompts, params) -> list[list[int]]:
    return [o.token_ids for o in build_engine(model_dir).generate([(p, params) for p in prompts])]


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


class _Streams:
    """Streams run on threads; each records its chunks' token ids and its error."""

    def __init__(self, target: str, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> None:
        self.new_tokens = new_tokens
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.errors: list[ClientError | None] = [None] * len(prompts)
        self.started = [threading.Event() for _ in prompts]
        self._pool = ThreadPoolExecutor(len(prompts))
        self._futures = [self._pool.submit(self._run, target, i, p) for i, p in enumerate(prompts)]

    def _run(self, target: str, i: int, prompt: list[int]) -> None:
        with InferenceClient(target, timeout_s=240) as c:
            try:
                for chunk in c.generate(
                    prompt_token_ids=prompt,
                    max_tokens=self.new_tokens,
                    temperature=0.0,
                    ignore_eos=True,
                ):
                    self.tokens[i] += chunk.token_ids
                    if len(self.tokens[i]) >= 3:
                        self.started[i].set()
            except ClientError as e:
                self.errors[i] = e
            finally:
                self.started[i].set()

    def wait_started(self, timeout_s: float = 120) -> None:
        for e in self.started:
            assert e.wait(timeout_s), "a stream did not start"

    def join(self, timeout_s: float = 300) -> None:
        for f in self._futures:
            f.result(timeout_s)
        self._pool.shutdown()


def _decoding(
    target, client, model_dir, n: int, seed: int, new_tokens: int = NEW_TOKENS
) -> tuple[_Streams, list, Any]:
    """n greedy streams decoding (most of them on decode ranks now), their offline tokens and
    the decode rank holding the most of them."""
    _wait(client, _healthy_and_idle, "a healthy idle cluster")
    prompts = _prompts(n, 12, seed=seed)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ref = _reference(model_dir, prompts, params)
    streams = _Streams(target, prompts, new_tokens)
    streams.wait_started()
    ranks = _wait(
        client,
        lambda rs: sum(r.running_requests for r in rs.get("decode", [])) >= n - 2,
        "the streams decoding",
        timeout_s=60,
    )
    return streams, ref, max(ranks["decode"], key=lambda r: r.running_requests)


def test_killed_decode_rank_loses_no_stream(client, target, model_dir):
    streams, ref, victim = _decoding(target, client, model_dir, 8, seed=1)
    _signal_rank(victim.replica_id, signal.SIGKILL)
    streams.join()
    assert streams.errors == [None] * 8
    assert streams.tokens == ref
    _wait(client, _healthy_and_idle, "the decode gang back and every rank idle")


def _ray_log_lines() -> list[str]:
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    lines: list[str] = []
    for f in logs.rglob("*"):
        if f.is_file() and f.suffix in (".err", ".out", ".log"):
            lines += f.read_text(errors="replace").splitlines()
    return lines


def _serving_ranks(client: InferenceClient, timeout_s: float = 30) -> list:
    """The registry's entries of the 6 ranks the Router serves through now (an entry of a rank
    killed by an earlier test lingers in the registry for up to STALE_AFTER_S)."""
    deadline = time.monotonic() + timeout_s
    while True:
        serving = {r.replica_id for rs in _ranks(client).values() for r in rs}
        listed = [a for a in list_ranks(APP_NAME, RankListing()) if a.replica_id in serving]
        if len(serving) == 6 and len(listed) == 6:
            return listed
        if time.monotonic() > deadline:
            pytest.fail(f"the registry lists {len(listed)} of the {len(serving)} serving ranks")
        time.sleep(0.2)  # the ranks re-publish every 0.5 s; bounded by the deadline


def test_attacks_on_rank_ports_change_nothing(client, target, model_dir, tmp_path):
    """The issue's attack, on the served cluster: while 8 greedy streams decode, every attack of
    tests/attacks.py (a crafted pickle, garbage, an oversized length, our handshake without the
    key, a recorded KV pull replayed) on every rank's port. Nothing runs, no rank restarts,
    every stream is exact, and the logs have one line per attempt naming its address."""
    streams, ref, _ = _decoding(target, client, model_dir, 8, seed=5)
    before = _replica_pids()
    marker = tmp_path / "pwned"
    key = wire_key(APP_NAME)  # this process holds Ray's token, as every node of the cluster
    ranks = _serving_ranks(client)
    attempts = [
        (f"rank port {a.port} closed the connection from {addr}:", why)
        for a in ranks
        for name in ATTACKS
        for addr, why in [attack(name, a.host, a.port, key, marker)]
    ]  # (the line's start, the reason): an attacker's port may recur, on another rank's port
    streams.join()
    assert not marker.exists()
    assert streams.errors == [None] * 8 and streams.tokens == ref
    assert _replica_pids() == before
    deadline = time.monotonic() + 30
    while True:  # the ranks' stderr reaches the log files a moment later
        lines = _ray_log_lines()
        found = {start: [x for x in lines if start in x] for start, _ in attempts}
        if all(len(v) == 1 for v in found.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # polling log files, bounded by the deadline
    for start, why in attempts:
        assert len(found[start]) == 1 and why in found[start][0], (start, found[start])
    _wait(client, _healthy_and_idle, "every rank idle")


def test_frozen_decode_rank_is_detected_and_loses_no_stream(client, target, model_dir):
    """SIGSTOP (a stuck peer, not a dead one): its channel misses its heartbeats for
    router.rank_timeout_s and its gang peer's collectives time out after
    decode.collective_timeout_s; both hand their streams back, which finish elsewhere."""
    streams, ref, victim = _decoding(target, client, model_dir, 8, seed=7)
    pid = _signal_rank(victim.replica_id, signal.SIGSTOP)
    try:
        streams.join()
    finally:
        with contextlib.suppress(ProcessLookupError):  # Serve may have killed it already
            os.kill(pid, signal.SIGCONT)
    assert streams.errors == [None] * 8
    assert streams.tokens == ref
    _wait(client, _healthy_and_idle, "the frozen rank's gang replaced and every rank idle")


def test_killed_prefill_rank_during_prefill_loses_no_stream(client, target, model_dir):
    _wait(client, _healthy_and_idle, "a healthy idle cluster")
    prompts = _prompts(8, 400, seed=2)  # 13 prefill steps each at 32 tokens per step
    ref = _reference(model_dir, prompts, GREEDY)
    streams = _Streams(target, prompts)
    ranks = _wait(
        client,
        lambda rs: any(r.queued_prompt_tokens > 0 for r in rs.get("prefill", [])),
        "prompts queued on a prefill rank",
        timeout_s=60,
    )
    victim = max(ranks["prefill"], key=lambda r: r.queued_prompt_tokens)
    _signal_rank(victim.replica_id, signal.SIGKILL)
    streams.join()
    assert streams.errors == [None] * 8
    assert streams.tokens == ref
    _wait(client, _healthy_and_idle, "the prefill gang back and every rank idle")


def test_killed_router_is_unavailable_then_serves_again(client, target):
    _wait(client, _healthy_and_idle, "a healthy idle cluster")
    streams = _Streams(target, _prompts(4, 8, seed=3))
    streams.wait_started()
    os.kill(_router_pid(), signal.SIGKILL)
    streams.join()
    for e in streams.errors:
        if e is not None:
            assert e.code == grpc.StatusCode.UNAVAILABLE, e
            assert "Actor" not in e.details and "pid" not in e.details.lower(), e.details
    # the ranks aborted what the dead router had submitted; a new router serves
    _wait(client, _healthy_and_idle, "every rank idle after the router died")
    got = client.complete(prompt_token_ids=[5, 6, 7], max_tokens=4, temperature=0.0)
    assert got.usage.completion_tokens == 4


def test_cancel_storm_frees_everything_within_2s(client, target):
    _wait(client, _healthy_and_idle, "a healthy idle cluster")
    rnd = random.Random(4)

    def one(i: int) -> None:
        with InferenceClient(target, timeout_s=120) as c:
            stream = c.generate(
                prompt_token_ids=[rnd.randrange(3, 500) for _ in range(rnd.randrange(4, 200))],
                max_tokens=3000,
                ignore_eos=True,
            )
            cut = rnd.choice([0, 1, 2, 5, 20])  # 0: before the first token
            try:
                for n, _ in enumerate(stream, 1):
                    if n >= cut:
                        break
            finally:
                stream.close()

    with ThreadPoolExecutor(25) as pool:
        list(pool.map(one, range(100)))
    cancelled = time.monotonic()
    _wait(client, _healthy_and_idle, "0 KV blocks and 0 requests after the storm", timeout_s=30)
    assert time.monotonic() - cancelled <= 2.5  # 2 s + one status report period
    assert client.cluster_status().router_requests == 0  # no Generate call left in progress


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1e-40},
        {"temperature": 5e-324},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": 1e30},
        {"top_p": float("nan")},
        {"top_p": 1e-40},
        {"temperature": 1e-40, "top_p": 1e-40, "top_k": 1},
        {"temperature": 3.0, "top_k": 2**31 - 1},
        {"logprobs": 20, "temperature": 1e-30},
        {"seed": -(2**63), "temperature": 0.5},
    ],
)
def test_degenerate_sampling_never_restarts_a_rank(client, target, sampling):
    before = _replica_pids()
    req = pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(max_tokens=8))
    for k, v in sampling.items():
        setattr(req.sampling, k, v)
    with grpc.insecure_channel(target) as channel:
        stub = channel.unary_stream(
            "/moe.v1.Inference/Generate",
            request_serializer=pb.GenerateRequest.SerializeToString,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        try:
            chunks = list(stub(req, timeout=120))
            assert chunks[-1].finish_reason in ("length", "stop")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
            assert e.details().startswith("sampling."), e.details()
    # a second, ordinary request still works on the same ranks
    assert client.complete("Once upon", max_tokens=3, temperature=0.0).usage.completion_tokens
    assert _replica_pids() == before


def test_huge_prompt_is_refused_without_stalling_others(client, target):
    _wait(client, _healthy_and_idle, "a healthy idle cluster")
    arrivals: list[float] = []

    def stream() -> None:
        with InferenceClient(target, timeout_s=120) as c:
            for _ in c.generate(prompt_token_ids=[5] * 8, max_tokens=60, ignore_eos=True):
                arrivals.append(time.monotonic())

    with ThreadPoolExecutor(3) as pool:
        other = pool.submit(stream)
        while len(arrivals) < 5:
            time.sleep(0.01)  # waits for the other stream to be decoding
        big = "lorem ipsum " * (5 * 1024 * 1024 // 12)
        sent = time.monotonic()
        errors = list(pool.map(lambda _: _refused(target, big), range(2)))
        other.result(120)
    assert all(e.code == grpc.StatusCode.INVALID_ARGUMENT for e in errors)
    assert all(e.details.startswith("prompt: ") for e in errors)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False) if b >= sent]
    assert gaps and max(gaps) < 1.0, f"the other stream stalled {max(gaps):.2f} s"


def _refused(target: str, prompt: str) -> ClientError:
    with InferenceClient(target, timeout_s=120) as c:
        with pytest.raises(ClientError) as err:
            c.complete(prompt, max_tokens=4)
        return err.value


def test_drain_finishes_in_flight_streams_and_turns_new_work_away(client, target, model_dir):
    """Drain one decode rank with streams on it: they finish (within router.drain_grace_s) with
    the fault-free tokens, new streams go to the other ranks; then drain the whole cluster: new
    requests get UNAVAILABLE at once. The module's last test: the drained ranks stay drained."""
    streams, ref, victim = _decoding(target, client, model_dir, 6, seed=5, new_tokens=DRAIN_TOKENS)
    drained = client.drain([victim.replica_id])
    assert list(drained.replica_ids) == [victim.replica_id] and drained.running_requests > 0
    with pytest.raises(ClientError) as err:
        client.drain(["no-such-rank"])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details.startswith("replica_ids[0]: ")
    more = _Streams(target, _prompts(3, 12, seed=6))
    streams.join()
    more.join()
    assert streams.errors == [None] * 6 and streams.tokens == ref
    assert more.errors == [None] * 3

    def victim_idle(rs) -> bool:  # its status lags the streams' ends by up to 0.5 s
        (r,) = [r for r in rs["decode"] if r.replica_id == victim.replica_id]
        return r.running_requests == 0

    ranks = _wait(client, victim_idle, "the drained rank without requests")
    (after,) = [r for r in ranks["decode"] if r.replica_id == victim.replica_id]
    assert not after.accepting
    client.drain()  # the whole cluster
    with pytest.raises(ClientError) as err:
        client.complete(prompt_token_ids=[5, 6], max_tokens=2)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details
