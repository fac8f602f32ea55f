"""The cluster end to end: real Ray Serve (gang-scheduled prefill and decode ranks, gloo), real
gRPC on loopback to the Router's own server, a DeepSeek-V3 tiny checkpoint (MLA: the handoff is the
latent cache). One deployment for the whole module: 1 prefill gang x 2 ranks, 2 decode gangs x
2 ranks, auth on, a small request bound.

Waits on the cluster's state poll GetClusterStatus with a deadline: ranks report every 0.5 s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray
from ray._private import state as ray_state
from ray.experimental.internal_kv import internal_kv_get_gcs_client

from cluster.app import APP_NAME
from cluster.embedded import start_embedded_ray
from cluster.launch import deploy, undeploy
from cluster.net import free_port
from cluster.offline import PromptSpec, run_offline
from cluster.tiny import make_tiny
from router.client import ClientError, InferenceClient, generate_request
from router.proto import inference_pb2 as pb
from router.proto import inference_pb2_grpc as pbg
from tests.cluster.shapes import two_stage_config
from workers.engine import SamplingParams
from workers.engine.build import build_engine
from workers.messages import Fetch, Hello, KVData
from workers.wire import WireError, WireKey, connect

TOKEN = "s3cret-token"
MAX_INFLIGHT = 8
pytestmark = pytest.mark.timeout(600)


# the Prometheus port, taken when the module's cluster starts (not at import: see test_scaling's
# http_port)
metrics_port = functools.cache(free_port)


@pytest.fixture(scope="module")
def ray_cluster():
    """This module's Ray exports metrics on a known Prometheus port, reported every second."""
    start_embedded_ray(
        num_cpus=2,
        include_dashboard=False,
        _metrics_export_port=metrics_port(),
        _system_config={"metrics_report_interval_ms": 1000},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepseek-long")
    return make_tiny("deepseek_v3", out, seed=0, overrides={"max_position_embeddings": 4096})


@pytest.fixture(scope="module")
def cluster(model_dir, ray_cluster):
    port = free_port()
    cfg = two_stage_config(
        model_dir,
        port,
        step_token_budget=16,
        max_prefill_chunk=4,
        auth_tokens=[TOKEN],
        max_queued_requests=MAX_INFLIGHT,
    )
    deploy(cfg.with_overrides(http_port=free_port(), **{"decode.niceness": 17}), timeout_s=300)
    yield f"localhost:{port}"
    undeploy()


@pytest.fixture
def client(cluster):
    with InferenceClient(cluster, token=TOKEN, timeout_s=120) as c:
        yield c


def _ranks(client: InferenceClient, stage: str) -> list[pb.RankStatus]:
    status = client.cluster_status()
    (dep,) = [d for d in status.deployments if d.name == stage]
    return [r for g in dep.gangs for r in g.ranks]


def _wait_status(
    client: InferenceClient, ok: Callable[[dict[str, list[pb.RankStatus]]], bool], what: str
) -> dict[str, list[pb.RankStatus]]:
    deadline = time.monotonic() + 60
    while True:
        ranks = {s: _ranks(client, s) for s in ("prefill", "decode")}
        if ok(ranks):
            return ranks
        if time.monotonic() > deadline:
            pytest.fail(f"cluster status never showed {what}: {_brief(ranks)}")
        time.sleep(0.2)  # the ranks report every 0.5 s; this polls, bounded by the deadline


def _brief(ranks: dict[str, list[pb.RankStatus]]) -> str:
    return "; ".join(
        f"{stage} {r.replica_id}: running {r.running_requests}, queued "
        f"{r.queued_prompt_tokens}, kv {r.kv_blocks_used}/{r.kv_blocks_total}"
        for stage, rs in ranks.items()
        for r in rs
    )


def _idle(ranks: dict[str, list[pb.RankStatus]]) -> bool:
    all_ranks = ranks["prefill"] + ranks["decode"]
    return len(all_ranks) == 6 and all(
        r.running_requests == 0 and r.kv_blocks_used == 0 for r in all_ranks
    )


PROMPTS = ["The quick brown fox", "Mixture of experts models route each token", "Once upon"]


def test_greedy_output_equals_offline(client, model_dir):
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    specs = [PromptSpec(f"#{i}", p, params) for i, p in enumerate(PROMPTS)]
    specs.append(PromptSpec("ids", [5, 17, 3, 99, 42, 7, 7, 1], params))
    offline = run_offline(build_engine(model_dir), specs)
    for spec, want in zip(specs, offline, strict=True):
        prompt = spec.prompt if isinstance(spec.prompt, str) else None
        ids = None if prompt is not None else spec.prompt
        got = client.complete(
            prompt, prompt_token_ids=ids, max_tokens=20, temperature=0.0, ignore_eos=True
        )
        assert got.token_ids == want.token_ids, spec.source
        assert got.text == want.text
        assert got.finish_reason == "length"
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.completion_tokens == 20


def test_first_chunk_is_the_prefill_token_then_decode_streams(client):
    chunks = list(client.generate("Once upon", max_tokens=5, temperature=0.0, ignore_eos=True))
    assert [len(c.token_ids) for c in chunks] == [1] * 5
    assert [c.finish_reason for c in chunks] == [None] * 4 + ["length"]
    # max_tokens=1 ends at prefill: no decode rank involved
    (only,) = list(client.generate("Once upon", max_tokens=1, temperature=0.0))
    assert only.finish_reason == "length" and only.token_ids == chunks[0].token_ids


MULTI_BYTE = "naïve café 日本"


@pytest.mark.parametrize("interval", [1, 4])
def test_stream_interval_output_equals_offline(client, model_dir, interval):
    """Seeded sampling of text with multi-byte characters: over the cluster, with 1 or 4 tokens
    per message, ids and text equal the offline engine's; a character whose bytes span tokens
    arrives whole; messages come in order: the first token alone, then `interval` tokens each,
    the last one with finish_reason and usage."""
    new = 23  # seed 6 of this checkpoint: a character whose bytes span two tokens
    params = SamplingParams(max_tokens=new, temperature=1.0, seed=6, ignore_eos=True)
    engine = build_engine(model_dir)
    engine.add_request("mb", params, prompt=MULTI_BYTE)
    pieces, want_ids = [], []
    while engine.has_unfinished():
        for out in engine.step():
            pieces.append(out.new_text)
            want_ids += out.new_token_ids
    want_text = "".join(pieces)
    # random tokens: some bytes form characters across tokens, some never do (U+FFFD)
    spans = [
        b for a, b in zip(pieces, pieces[1:], strict=False)
        if a == "" and any(127 < ord(ch) != 0xFFFD for ch in b)
    ]  # fmt: skip
    assert spans, "no character spans two tokens in this output"
    chunks = list(
        client.generate(
            MULTI_BYTE,
            max_tokens=new,
            temperature=1.0,
            seed=6,
            ignore_eos=True,
            stream_interval=interval,
        )
    )
    assert [t for c in chunks for t in c.token_ids] == want_ids
    assert "".join(c.text for c in chunks) == want_text
    rest = new - 1
    tail = [rest % interval] if rest % interval else []
    assert [len(c.token_ids) for c in chunks] == [1] + [interval] * (rest // interval) + tail
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == new
    with pytest.raises(ClientError) as err:
        client.complete("hi", stream_interval=5000)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details.startswith("sampling.stream_interval: ")


def test_first_tokens_of_a_burst_do_not_wait_for_a_long_prefill(client, cluster):
    """A burst: two 3,900-token prompts (one per prefill rank: fewest queued prompt tokens;
    244+ steps each at 16 tokens per step) and four 40-token ones. Each short prompt shares its
    prefill rank with a long one (max_prefill_chunk: the long prompt takes 4 tokens a step while
    others want the budget), so every short stream gets its first token, and ends after two
    decode steps, before either long prompt's first token."""
    _wait_status(client, _idle, "an idle cluster")
    firsts: dict[str, float] = {}
    ends: dict[str, float] = {}

    def run(name: str, ids: list[int], new: int) -> None:
        with InferenceClient(cluster, token=TOKEN, timeout_s=120) as c:
            for _ in c.generate(prompt_token_ids=ids, max_tokens=new, ignore_eos=True):
                firsts.setdefault(name, time.monotonic())
            ends[name] = time.monotonic()

    with ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(run, f"long{i}", [7 + i] * 3900, 1) for i in range(2)]
        jobs += [pool.submit(run, f"short{i}", [3, i] * 20, 3) for i in range(4)]
        for j in jobs:
            j.result(timeout=120)
    long_first = min(firsts["long0"], firsts["long1"])
    for i in range(4):
        assert ends[f"short{i}"] < long_first, f"short{i} waited for a long prefill"


def test_tokenize_and_model_info(client, model_dir):
    info = client.model_info()
    assert info.architecture == "deepseek_v3" and info.max_model_len == 4096
    assert info.num_experts > 0 and info.dtype == "float32"
    ids = client.tokenize("Once upon")
    assert ids == build_engine(model_dir).tokenizer.encode("Once upon", add_special_tokens=False)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "prompt"),
        ({"prompt": "hi", "prompt_token_ids": [1, 2]}, "prompt"),
        ({"prompt_token_ids": [1, 10**6]}, "prompt_token_ids"),
        ({"prompt": "hi", "temperature": -0.5}, "sampling.temperature"),
        ({"prompt": "hi", "top_p": 1.5}, "sampling.top_p"),
        ({"prompt": "hi", "top_k": -1}, "sampling.top_k"),
        ({"prompt": "hi", "max_tokens": 5000}, "sampling.max_tokens"),
        ({"prompt": "hi", "stop": ("x",) * 17}, "sampling.stop"),
        ({"prompt": "hi", "stop": ("y" * 300,)}, "sampling.stop[0]"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(client, kwargs, field):
    prompt = kwargs.pop("prompt", None)
    with pytest.raises(ClientError) as err:
        client.complete(prompt, **kwargs)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details.startswith(f"{field}: ")
    assert "Traceback" not in err.value.details


def test_auth(cluster):
    for token in (None, "wrong"):
        with InferenceClient(cluster, token=token, timeout_s=30) as c:
            for call in (lambda: c.complete("hi", max_tokens=2), c.model_info):
                with pytest.raises(ClientError) as err:
                    call()
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert "Traceback" not in err.value.details
    with InferenceClient(cluster, token=TOKEN, timeout_s=30) as c:
        assert c.complete("hi", max_tokens=2).usage.completion_tokens == 2


def test_prefill_follows_queued_prompt_tokens(client, cluster):
    """A long prompt (244 prefill steps at 16 tokens each) is queued on one prefill rank; the
    short prompts sent meanwhile, all at once, go to the other rank."""
    _wait_status(client, _idle, "an idle cluster")
    before = {r.replica_id: r.tokens_processed for r in _ranks(client, "prefill")}
    with (
        InferenceClient(cluster, token=TOKEN, timeout_s=120) as other,
        ThreadPoolExecutor(5) as pool,
    ):
        long = pool.submit(other.complete, prompt_token_ids=[13] * 3900, max_tokens=1)
        _wait_status(
            client,
            lambda rs: any(r.queued_prompt_tokens > 0 for r in rs["prefill"]),
            "the long prompt queued on a prefill rank",
        )
        shorts = [
            pool.submit(other.complete, prompt_token_ids=[17, 40 + i] * 25, max_tokens=1)
            for i in range(4)
        ]
        assert all(s.result(120).finish_reason == "length" for s in shorts)
        assert long.result(120).finish_reason == "length"
    after = _wait_status(
        client,
        lambda rs: sum(r.tokens_processed for r in rs["prefill"]) >= sum(before.values()) + 4100,
        "all prefill tokens counted",
    )
    short, long_ = sorted(r.tokens_processed - before[r.replica_id] for r in after["prefill"])
    # the 4 short prompts (50 tokens each) on one rank, the long one alone on the other; the
    # slack (< 50) covers earlier tests' last tokens that reached `before` after it was read
    assert 3900 <= long_ < 3950 and 200 <= short < 250, (before, _brief(after))


def _prefill_counters(client: InferenceClient) -> dict[str, tuple[int, int]]:
    return {
        r.replica_id: (r.prefix_query_tokens, r.prefix_hit_tokens)
        for r in _ranks(client, "prefill")
    }


def _counted(client: InferenceClient, before: dict[str, tuple[int, int]], tokens: int):
    """Per prefill rank: (tokens looked up, tokens hit) since `before`, once `tokens` more
    were looked up in all (status lags the ranks by up to 0.5 s)."""

    def done(rs: dict[str, list[pb.RankStatus]]) -> bool:
        return (
            sum(r.prefix_query_tokens for r in rs["prefill"])
            >= sum(q for q, _ in before.values()) + tokens
        )

    _wait_status(client, done, f"{tokens} more prompt tokens admitted on the prefill ranks")
    after = _prefill_counters(client)
    return {k: (q - before[k][0], h - before[k][1]) for k, (q, h) in after.items()}


def test_shared_prefixes_land_where_they_are_cached_and_unrelated_prompts_spread(client, cluster):
    """One request puts a 196-token prefix in one prefill rank's cache; 16 requests sharing
    it, 8 at a time (the module's request bound), all go there and compute only their own
    tails (8 tokens each); 4 unrelated 200-token prompts sent at once still spread over both
    ranks."""
    _wait_status(client, _idle, "an idle cluster")
    prefix = [(31 * i) % 400 + 50 for i in range(196)]
    before = _prefill_counters(client)
    client.complete(prompt_token_ids=prefix + [1, 2, 3, 4], max_tokens=1)
    warm = _counted(client, before, 200)
    (holder,) = [k for k, (q, _) in warm.items() if q == 200]

    def run(ids: list[int]) -> str:
        with InferenceClient(cluster, token=TOKEN, timeout_s=120) as c:
            return c.complete(prompt_token_ids=ids, max_tokens=1).finish_reason

    before = _prefill_counters(client)
    n = 2 * MAX_INFLIGHT  # 16, in two bursts of the module's request bound
    tails = [[5 + i, 6 + i, 7, 8, 9, 10, 11, 12] for i in range(n)]
    with ThreadPoolExecutor(MAX_INFLIGHT) as pool:
        assert list(pool.map(run, [prefix + t for t in tails])) == ["length"] * n
    shared = _counted(client, before, n * 204)
    # each finds the 196-token prefix (49 blocks of 4) cached on the holder
    assert shared[holder] == (n * 204, n * 196), shared

    before = _prefill_counters(client)
    unrelated = [[(7 * i + 13 * j) % 450 + 30 for i in range(200)] for j in range(4)]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, unrelated)) == ["length"] * 4
    spread = _counted(client, before, 4 * 200)
    assert sorted(q for q, _ in spread.values()) == [400, 400], spread
    status = {r.replica_id: r for r in _ranks(client, "prefill")}[holder]
    assert status.kv_blocks_cached >= 49 and 0 < status.prefix_hit_rate < 1


def test_decode_follows_kv_usage_and_cancel_frees_kv(client):
    """Four long streams land on the four decode ranks (two gangs); the fifth goes to the rank
    with the least KV in use; cancelling every stream frees every block."""
    _wait_status(client, _idle, "an idle cluster")
    lengths = [800, 600, 400, 10]  # KV gaps far above what decoding adds meanwhile
    streams = []
    try:
        for n in lengths:
            s = client.generate(prompt_token_ids=[9] * n, max_tokens=3000, ignore_eos=True)
            next(s), next(s)  # decoding now
            streams.append(s)
        ranks = _wait_status(
            client,
            lambda rs: sum(r.running_requests for r in rs["decode"]) == 4,
            "4 running decode requests",
        )
        assert sorted(r.running_requests for r in ranks["decode"]) == [1, 1, 1, 1]
        least = min(ranks["decode"], key=lambda r: r.kv_blocks_used)
        s = client.generate(prompt_token_ids=[9] * 10, max_tokens=3000, ignore_eos=True)
        next(s), next(s)
        streams.append(s)
        ranks = _wait_status(
            client,
            lambda rs: sum(r.running_requests for r in rs["decode"]) == 5,
            "5 running decode requests",
        )
        by_id = {r.replica_id: r.running_requests for r in ranks["decode"]}
        assert by_id[least.replica_id] == 2
        # the router's bound: MAX_INFLIGHT streams at once, then RESOURCE_EXHAUSTED
        for _ in range(MAX_INFLIGHT - len(streams)):
            s = client.generate(prompt_token_ids=[4] * 8, max_tokens=3000, ignore_eos=True)
            next(s)
            streams.append(s)
        with pytest.raises(ClientError) as err:
            client.complete(prompt_token_ids=[4] * 8, max_tokens=4)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for s in streams:
            s.close()  # cancels the call: the ranks abort the requests
    _wait_status(client, _idle, "every KV block free after cancelling")


def test_overload_is_turned_away_fast_and_admitted_streams_finish(cluster, client):
    """10 x router.max_queued_requests calls at once: MAX_INFLIGHT are admitted and finish with
    all their tokens; every other one gets RESOURCE_EXHAUSTED at once: before any admitted
    stream ends (nothing waits for a slot) and within 0.5 s of being sent (bench/overload.py
    measures the latency; a rejected call costs the Router 0.75-1.1 ms of CPU, README). The
    calls are issued from one thread without waiting; grpc's own threads stamp each end."""
    _wait_status(client, _idle, "an idle cluster")
    n = 10 * MAX_INFLIGHT
    ended = [0.0] * n
    sent = [0.0] * n
    with grpc.insecure_channel(cluster) as channel:
        stub = pbg.InferenceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        calls = []
        for i in range(n):
            request = generate_request(
                prompt_token_ids=[4, i % 50] * 4, max_tokens=48, ignore_eos=True
            )
            sent[i] = time.perf_counter()
            call = stub.Generate(
                request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=120
            )
            call.add_done_callback(lambda _c, i=i: ended.__setitem__(i, time.perf_counter()))
            calls.append(call)
        outcomes: list[tuple[str, int]] = []
        for call in calls:
            try:
                outcomes.append(("OK", sum(len(m.token_ids) for m in call)))
            except grpc.RpcError as e:
                outcomes.append((e.code().name, 0))
    ok = [tokens for code, tokens in outcomes if code == "OK"]
    assert len(ok) == MAX_INFLIGHT and ok == [48] * MAX_INFLIGHT
    away = [i for i, (code, _) in enumerate(outcomes) if code != "OK"]
    assert {outcomes[i][0] for i in away} == {"RESOURCE_EXHAUSTED"}
    first_done = min(ended[i] for i, (code, _) in enumerate(outcomes) if code == "OK")
    assert all(ended[i] < first_done for i in away), "a rejection waited for an admitted stream"
    slowest = max(ended[i] - sent[i] for i in away)
    assert slowest <= 0.5, f"a rejection took {slowest * 1e3:.0f} ms"
    _wait_status(client, _idle, "every KV block free after the burst")


def test_deadline_stops_the_work(client):
    with pytest.raises(ClientError) as err:
        list(
            client.generate(
                prompt_token_ids=[9] * 10, max_tokens=3000, ignore_eos=True, timeout_s=1.0
            )
        )
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_status(client, _idle, "every KV block free after the deadline")


def _scrape() -> dict[str, list[tuple[str, float]]]:
    """Ray's Prometheus text: metric name -> [(labels, value)] for the ray_moe_* series."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port()}/metrics", timeout=10).read()
    series: dict[str, list[tuple[str, float]]] = {}
    for line in text.decode().splitlines():
        if line.startswith("ray_moe_"):
            name_labels, value = line.rsplit(" ", 1)
            name, _, labels = name_labels.partition("{")
            series.setdefault(name, []).append((labels, float(value)))
    return series


def test_metrics_on_rays_prometheus_endpoint(client):
    client.complete("Once upon", max_tokens=6, temperature=0.0, ignore_eos=True)
    for _ in range(2):  # the second finds the first's prompt blocks cached
        client.complete(prompt_token_ids=list(range(60, 81)), max_tokens=1)
    want = {
        "ray_moe_ttft_seconds_count": lambda ls: sum(v for _, v in ls) >= 1,
        "ray_moe_itl_seconds_count": lambda ls: sum(v for _, v in ls) >= 1,  # sampled
        "ray_moe_generated_tokens_total": lambda ls: sum(v for _, v in ls) >= 6,
        "ray_moe_requests_total": lambda ls: any('finish_reason="length"' in lb for lb, _ in ls),
        "ray_moe_queued_prompt_tokens": lambda ls: any('stage="prefill"' in lb for lb, _ in ls),
        "ray_moe_kv_usage": lambda ls: sum('stage="decode"' in lb for lb, _ in ls) == 4,
        "ray_moe_expert_load_imbalance": lambda ls: any('layer="' in lb and v >= 1 for lb, v in ls),
        "ray_moe_dispatch_bytes_total": lambda ls: any(
            'direction="sent"' in lb and v > 0 for lb, v in ls
        ),
        "ray_moe_prefix_cache_query_tokens_total": lambda ls: sum(v for _, v in ls) >= 42,
        "ray_moe_prefix_cache_hit_tokens_total": lambda ls: sum(v for _, v in ls) >= 20,
        "ray_moe_prefix_cache_hit_rate": lambda ls: any(v > 0 for _, v in ls),
        "ray_moe_kv_blocks_cached": lambda ls: any(v >= 5 for _, v in ls),
    }
    deadline = time.monotonic() + 60
    while True:
        series = _scrape()
        missing = [name for name, ok in want.items() if not ok(series.get(name, []))]
        if not missing:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not on the Prometheus endpoint after 60 s: {missing}")
        time.sleep(1)  # Ray exports every second here; bounded by the deadline


def test_status_groups_ranks_by_stage_and_gang(client):
    status = client.cluster_status()
    assert [d.name for d in status.deployments] == ["prefill", "decode"]
    prefill, decode = status.deployments
    assert len(prefill.gangs) == 1 and len(decode.gangs) == 2
    for gang in (*prefill.gangs, *decode.gangs):
        assert [r.rank for r in gang.ranks] == [0, 1]
        for r in gang.ranks:
            assert r.kv_blocks_total > 0 and len(r.expert_load) > 0
    assert ray.is_initialized() and APP_NAME


def _thread_niceness(pid: int) -> set[int]:
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            out.add(os.getpriority(os.PRIO_PROCESS, int(tid)))
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux only")
def test_ranks_run_below_the_serving_plane(client):
    """Every thread of a rank runs at its stage's niceness (prefill: the default 15; decode: 17
    in this module's config), the Router's at 0 (RAY_ENV's RAY_worker_niceness)."""
    assert client.cluster_status().deployments  # up
    seen: dict[str, list[set[int]]] = collections.defaultdict(list)
    for a in ray_state.actors(actor_state_name="ALIVE").values():
        name = a["Name"] or ""
        for kind in ("Router", "PrefillRank", "DecodeRank"):
            if name.startswith("SERVE_REPLICA::") and f"#{kind}#" in name:
                seen[kind].append(_thread_niceness(int(a["Pid"])))
    assert seen == {"Router": [{0}], "PrefillRank": [{15}] * 2, "DecodeRank": [{17}] * 4}


def test_deadline_during_prefill_stops_the_prefill(client):
    """A client deadline that passes mid-prefill aborts it on the prefill rank: the rank stops
    short of the prompt's 3,900 tokens and frees the blocks. (A prompt no other test sends: a
    cached one would finish before the deadline.)"""
    _wait_status(client, _idle, "an idle cluster")
    before = sum(r.tokens_processed for r in _ranks(client, "prefill"))
    with pytest.raises(ClientError) as err:
        list(client.generate(prompt_token_ids=[19] * 3900, max_tokens=1, timeout_s=0.5))
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    ranks = _wait_status(
        client,
        lambda rs: _idle(rs) and sum(r.tokens_processed for r in rs["prefill"]) > before,
        "every KV block free after the deadline, the prefill's first chunks counted",
    )
    assert 0 < sum(r.tokens_processed for r in ranks["prefill"]) - before < 3900


def test_a_wiped_registry_is_refilled_and_requests_go_on(client):
    """The registry is soft state in GCS: with every rank entry deleted (as a GCS restarted
    without persistence would), each rank re-publishes within its report period and requests
    go on."""
    from cluster.registry import NAMESPACE, RankListing, list_ranks

    gcs = internal_kv_get_gcs_client()
    assert len(list_ranks(APP_NAME, RankListing())) == 6
    assert gcs.internal_kv_del(f"{APP_NAME}/rank/".encode(), True, NAMESPACE) == 6
    deadline = time.monotonic() + 30
    while len(list_ranks(APP_NAME, RankListing())) < 6:
        assert time.monotonic() < deadline, "the 6 ranks did not re-publish within 30 s"
        time.sleep(0.1)  # ranks re-publish every 0.5 s; bounded by the deadline
    out = client.complete("Once upon", max_tokens=4, temperature=0.0, ignore_eos=True)
    assert len(out.token_ids) == 4


def test_the_wire_key_is_rays_token_and_without_it_a_deployment_secret(cluster, monkeypatch):
    """This module's Ray runs with token auth, so the ranks' wire key derives from Ray's token:
    this driver, holding the token, completes a KV pull with a live rank, a guessed key does
    not, and no deployment secret was made in GCS. With Ray's auth off, every process of an app
    gets one key from the app's secret in GCS (another app, another key), and the app's undeploy
    (drop_registry) removes it."""
    from cluster import wire_key as wk
    from cluster.registry import NAMESPACE, RankListing, drop_registry, list_ranks

    assert wk.ray_token_auth()
    gcs = internal_kv_get_gcs_client()
    assert gcs.internal_kv_get(f"{APP_NAME}/wire-secret".encode(), NAMESPACE) is None
    rank = list_ranks(APP_NAME, RankListing())[0]

    async def pull(key: WireKey) -> object:
        stream = await connect(rank.host, rank.port, key)
        try:
            stream.send(Hello("kv:test"))
            stream.send(Fetch("no-such-kv"))
            return await stream.recv()
        finally:
            stream.close()

    assert asyncio.run(pull(wk.wire_key(APP_NAME))) == KVData("no-such-kv", None)
    with pytest.raises(WireError, match="failed authentication"):
        asyncio.run(pull(WireKey.generate(APP_NAME)))

    monkeypatch.setattr(wk, "ray_token_auth", lambda: False)
    a1, a2, b = wk.wire_key("app-a"), wk.wire_key("app-a"), wk.wire_key("app-b")
    assert a1.mac(b"x") == a2.mac(b"x") != b.mac(b"x")
    assert len(gcs.internal_kv_get(b"app-a/wire-secret", NAMESPACE)) == 32
    drop_registry("app-a")
    drop_registry("app-b")
    assert gcs.internal_kv_get(b"app-a/wire-secret", NAMESPACE) is None
