"""`moe-cluster serve` as an operator runs it: its own embedded Ray, `ready on HOST:PORT`, grpcurl
(a client nobody here wrote) through Serve's gRPC proxy with reflection, `moe-cluster generate`,
then SIGTERM -> a clean exit. Auth is off here (no tokens configured)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.net import free_port
from cluster.offline import PromptSpec, run_offline
from tests.cluster.serve_process import ServeProcess, iter_queue
from workers.engine import SamplingParams
from workers.engine.build import build_engine

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(600)
DRAIN_GRACE_S = 30.0  # router.drain_grace_s default


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """No Ray in the test process: `moe-cluster serve` starts its own embedded one."""
    yield


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "moe-cluster"), *args], capture_output=True, text=True, timeout=timeout
    )


def test_bad_flags_exit_2_naming_the_flag(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint("qwen3_moe"))
    r = _cli("serve", "--model", model, "--decode-gangs", "0")
    assert r.returncode == 2 and "--decode-gangs: must be >= 1" in r.stderr
    r = _cli("serve", "--model", str(tmp_path))
    assert r.returncode == 2 and "--model:" in r.stderr and "config.json" in r.stderr
    bad = tmp_path / "cluster.yaml"
    bad.write_text("model: {path: x}\nrouter: {prot: 9000}\n")
    r = _cli("serve", "--config", str(bad))
    assert r.returncode == 2 and "router.prot: unknown key; did you mean 'port'?" in r.stderr
    assert "Traceback" not in r.stderr


def test_serve_grpcurl_generate_and_sigterm(tiny_checkpoint):
    model = tiny_checkpoint("qwen3_moe")
    port = free_port()
    # embedded means a new Ray even where the environment names a cluster long gone (as a dead
    # `ray start` leaves in /tmp/ray/ray_current_cluster): a bare ray.init() would try to join it
    gone = {"RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    server = ServeProcess(
        ["--model", str(model), "--port", str(port), "--http-port", str(free_port())], env=gone
    )
    streams: list[subprocess.Popen] = []
    try:
        ready = server.wait_for("ready on", 300)
        assert f":{port}" in ready
        target = f"localhost:{port}"

        listed = subprocess.run(
            [str(BIN / "grpcurl"), "-plaintext", target, "list"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "moe.v1.Inference" in listed.stdout.split(), listed.stderr

        body = '{"prompt":"hi","sampling":{"max_tokens":8}}'
        call = subprocess.run(
            [str(BIN / "grpcurl"), "-plaintext", "-d", body, target, "moe.v1.Inference/Generate"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert call.returncode == 0, call.stderr
        chunks = _json_objects(call.stdout)
        assert sum(len(c.get("tokenids", [])) for c in chunks) == 8
        assert chunks[-1]["finishreason"] == "length"
        assert chunks[-1]["usage"]["completiontokens"] == 8

        bad = subprocess.run(
            [
                str(BIN / "grpcurl"),
                "-plaintext",
                "-d",
                '{"prompt":"hi","sampling":{"top_p":3}}',
                target,
                "moe.v1.Inference/Generate",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "InvalidArgument" in bad.stderr and "sampling.top_p" in bad.stderr

        params = SamplingParams(max_tokens=12, temperature=0.0)
        (want,) = run_offline(build_engine(model), [PromptSpec("p", "Once upon a time", params)])
        gen = _cli(
            "generate",
            "Once upon a time",
            "--port",
            str(port),
            "--max-tokens",
            "12",
            "--temperature",
            "0",
        )
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout == want.text
        assert "[length, " in gen.stderr

        # streams in flight when SIGTERM arrives finish (drain), then the process exits
        long = [str(BIN / "moe-cluster"), "generate", "Once upon a time", "--port", str(port)]
        long += ["--max-tokens", "150", "--temperature", "0", "--ignore-eos"]
        streams += [
            subprocess.Popen(long, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(3)
        ]
        for p in streams:
            assert p.stdout is not None
            p.stdout.read(1)  # streaming now
    finally:
        server.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            code = server.proc.wait(timeout=DRAIN_GRACE_S + 10 + 30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            pytest.fail("`moe-cluster serve` did not exit within grace + 40 s of SIGTERM")
    for p in streams:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0 and "+ 150 completion tokens]" in err, err
    server.wait_for("stopped", 10)
    assert code == 0
    output = "".join(server.seen) + "".join(iter_queue(server.lines))
    assert "failed to shut down" not in output, output[-2000:]
    assert time.monotonic() - sent < DRAIN_GRACE_S + 40


def _json_objects(text: str) -> list[dict]:
    """grpcurl prints one pretty JSON object per streamed message; keys are normalized to
    lower case without underscores (grpcurl versions print `token_ids` or `tokenIds`)."""

    def norm(obj):
        if isinstance(obj, dict):
            return {k.replace("_", "").lower(): norm(v) for k, v in obj.items()}
        return obj

    dec, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = dec.raw_decode(text, i)
        out.append(norm(obj))
    return out
