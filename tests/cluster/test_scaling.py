"""Scaling a running cluster in whole gangs with `serve deploy` of an updated config (what a
RayService update and the Ray dashboard's config do), while streams are in flight.

A local Ray cluster is started with `ray start --head` (dashboard on, for Serve's REST API;
Ray's token auth on);
the decode deployment goes 1 gang -> 2 gangs -> 1 gang through `deployments[].num_replicas`
(a lightweight update: no other replica restarts). Every stream started before or between the
changes must finish with the offline engine's tokens. Two Router replicas serve the same
`router.port` throughout (Serve scales the Router like any deployment).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import yaml
from ray import serve
from ray._private.authentication_test_utils import reset_auth_token_state

from cluster.app import APP_NAME
from cluster.embedded import RAY_ENV, join_ray
from cluster.launch import wait_running
from cluster.net import free_port
from cluster.tiny import make_tiny
from cluster.wire_key import ray_token_auth
from router.client import InferenceClient
from workers.engine import SamplingParams
from workers.engine.build import build_engine

BIN = Path(sys.executable).parent
NEW_TOKENS = 3000
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head --block` in its own process group and temp directory (so it leaves no
    /tmp/ray/ray_current_cluster for a later `ray.init()` to find); this test process connects as
    a driver. Stopped by signalling that process group, never `ray stop` (every Ray here)."""
    gcs, dashboard = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit
    # RAY_ENV as on a KubeRay head, token auth on as KubeRay's authOptions set it: the mode and
    # the token in the environment of every Ray process, this driver's and `serve deploy`'s too
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    saved = {k: os.environ.get(k) for k in token}
    os.environ.update(token)
    reset_auth_token_state()
    env = {**RAY_ENV, **os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(Path(temp) / "ray-start.log", "w+")  # noqa: SIM115 (closed in the finally)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         f"--temp-dir={temp}", f"--dashboard-port={dashboard}", "--include-dashboard=true",
         "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_head_started(head, Path(log.name), timeout_s=180)
        join_ray(f"127.0.0.1:{gcs}")
        assert ray_token_auth()
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        ray.shutdown()
        _stop_group(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_auth_token_state()


def _wait_head_started(head: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in log.read_text():
        if head.poll() is not None:
            pytest.fail(f"`ray start --head` exited {head.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"`ray start --head` not started in {timeout_s} s:\n{log.read_text()}")
        time.sleep(0.2)  # polling a log file: there is nothing to wait on


def _stop_group(head: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM to the head's process group (GCS, raylet, dashboard, workers: Ray's reaper takes
    down what is left), then SIGKILL to whatever outlives the grace."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    deadline = time.monotonic() + grace_s
    while _group_alive(head.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies awaiting their reaper do not count)."""
    for p in psutil.process_iter(["status"]):
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


@functools.cache
def http_port() -> int:
    """Serve's HTTP port for the module: Serve keeps the http/grpc options of its first deploy.
    Taken at the first deploy, not at import: a port picked at collection sat unused for minutes
    while other modules' clusters ran, and once was taken by then (`Failed to bind`)."""
    return free_port()


@pytest.fixture(scope="module")
def port() -> int:
    """One gRPC port for the module (see http_port)."""
    return free_port()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepseek-scale")
    return make_tiny("deepseek_v3", out, seed=0, overrides={"max_position_embeddings": 4096})


def _config(model: Path, port: int, decode_replicas: int) -> dict:
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": http_port()},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "cluster.app:build_app",
                "args": {
                    "model": {"path": str(model)},
                    "prefill": {"gang_size": 1, "num_cpus_per_rank": 0.01},
                    "decode": {
                        "gang_size": 2,
                        "num_cpus_per_rank": 0.01,
                        "block_size": 4,
                        "kv_blocks": 4096,
                    },
                    "router": {"port": port},
                },
                # scaling: a multiple of the gang size; only this changes between deploys
                "deployments": [
                    {"name": "DecodeRank", "num_replicas": decode_replicas},
                    # two Router replicas share router.port (the streams' connections spread)
                    {"name": "Router", "num_replicas": 2},
                ],
            }
        ],
    }


def _serve_deploy(dashboard: str, config: dict, tmp: Path) -> None:
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    r = subprocess.run(
        [str(BIN / "serve"), "deploy", str(path), "-a", dashboard],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def _decode_gangs(client: InferenceClient) -> dict[str, list[str]]:
    (dep,) = [d for d in client.cluster_status().deployments if d.name == "decode"]
    return {g.gang_id: [r.replica_id for r in g.ranks] for g in dep.gangs}


def _wait_gangs(client: InferenceClient, n: int, timeout_s: float = 300) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout_s
    while True:
        gangs = _decode_gangs(client)
        # the prefill rank too: the router's view fills in as ranks report (every 0.5 s)
        whole = len(gangs) == n and all(len(r) == 2 for r in gangs.values())
        if whole and _prefill_replicas(client):
            return gangs
        if time.monotonic() > deadline:
            pytest.fail(f"decode never had {n} gangs of 2 ranks: {gangs}")
        time.sleep(0.5)  # polling the cluster's status; bounded by the deadline


class _Stream(threading.Thread):
    def __init__(self, target: str, prompt: list[int], max_tokens: int = NEW_TOKENS) -> None:
        super().__init__(daemon=True)
        self.target, self.prompt, self.max_tokens = target, prompt, max_tokens
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.error: BaseException | None = None
        self.started = threading.Event()

    def run(self) -> None:
        try:
            with InferenceClient(self.target, timeout_s=600) as client:
                stream = client.generate(
                    prompt_token_ids=self.prompt, max_tokens=self.max_tokens, temperature=0.0,
                    ignore_eos=True,
                )  # fmt: skip
                for chunk in stream:
                    self.tokens += chunk.token_ids
                    if len(self.tokens) >= 2:
                        self.started.set()
                    self.finish = chunk.finish_reason
        except BaseException as e:
            self.error = e
            self.started.set()


def test_decode_gangs_scale_up_and_down_under_load(ray_cluster, model_dir, port, tmp_path):
    _serve_deploy(ray_cluster, _config(model_dir, port, 2), tmp_path)
    wait_running(300)
    target = f"localhost:{port}"
    routers = serve.status().applications[APP_NAME].deployments["Router"]
    assert routers.replica_states.get("RUNNING") == 2, routers  # both bound router.port
    with InferenceClient(target, timeout_s=60) as client:
        before = _wait_gangs(client, 1)
        prefill_before = _prefill_replicas(client)

        prompts = [[5 + i, 9, 11 + i, 3] for i in range(5)]
        streams = [_Stream(target, p) for p in prompts]
        for s in streams[:3]:
            s.start()
            assert s.started.wait(120) and s.error is None, s.error

        _serve_deploy(ray_cluster, _config(model_dir, port, 4), tmp_path)  # 2 decode gangs
        grown = _wait_gangs(client, 2)
        assert set(before) < set(grown)  # the first gang kept serving, a second one joined
        wait_running(300)
        for s in streams[3:]:  # land on the idle new gang (lowest KV usage)
            s.start()
            assert s.started.wait(120) and s.error is None, s.error
        assert all(s.is_alive() for s in streams), "streams too short to span the scaling"

        _serve_deploy(ray_cluster, _config(model_dir, port, 2), tmp_path)  # back to 1 gang
        shrunk = _wait_gangs(client, 1)
        assert set(shrunk) <= set(grown)
        wait_running(300)
        assert _prefill_replicas(client) == prefill_before  # lightweight: nothing else restarted

    for s in streams:
        s.join(600)
    assert [s.error for s in streams] == [None] * 5
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    want = build_engine(model_dir).generate([(p, params) for p in prompts])
    for s, w in zip(streams, want, strict=True):
        assert s.finish == "length" and s.tokens == w.token_ids
    assert serve.status().applications[APP_NAME].status == "RUNNING"


def test_decode_autoscales_in_whole_gangs_on_kv_usage(ray_cluster, model_dir, port, tmp_path):
    """`decode.autoscaling`: two streams whose KV use is far above target_kv_usage make Serve
    add a second decode gang on its own (record_autoscaling_stats -> the stage policy)."""
    config = _config(model_dir, port, 2)
    app = config["applications"][0]
    del app["deployments"]  # replica counts come from the policy now
    app["args"]["decode"].update(
        kv_blocks=512, autoscaling={"min_gangs": 1, "max_gangs": 2, "target_kv_usage": 0.05}
    )
    _serve_deploy(ray_cluster, config, tmp_path)
    wait_running(300)
    target = f"localhost:{port}"
    with InferenceClient(target, timeout_s=60) as client:
        assert len(_wait_gangs(client, 1)) == 1
        # 400 + 600 tokens = 250 of a rank's 512 blocks at most: far above 5 % from the start
        streams = [_Stream(target, [7 + i] * 400, max_tokens=600) for i in range(2)]
        for s in streams:
            s.start()
            assert s.started.wait(120) and s.error is None, s.error
        _wait_gangs(client, 2)
    for s in streams:
        s.join(600)
    assert [(s.error, s.finish, len(s.tokens)) for s in streams] == [(None, "length", 600)] * 2


def _prefill_replicas(client: InferenceClient) -> set[str]:
    (dep,) = [d for d in client.cluster_status().deployments if d.name == "prefill"]
    return {r.replica_id for g in dep.gangs for r in g.ranks}
