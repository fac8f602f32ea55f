"""The CLI contract, called exactly as users and acceptance checks call it (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "cluster.cli"]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "qwen"
    _run("make-tiny", "--arch", "qwen3_moe", "--out", str(out), "--seed", "3")
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    return out


def test_offline_json_one_object_per_prompt_in_order(model, tmp_path):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"prompt_token_ids": [7, 8, 9, 10, 11]}\n{"prompt": "from a file"}\n')
    proc = _run(
        "offline",
        "--model",
        str(model),
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--ignore-eos",
        "--prompt",
        "Hello world",
        "--prompt-ids",
        "1,2,3",
        "--input",
        str(jsonl),
        "--json",
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4
    objs = [json.loads(line) for line in lines]
    assert all(set(o) == {"prompt_token_ids", "token_ids", "text", "finish_reason"} for o in objs)
    assert objs[1]["prompt_token_ids"] == [1, 2, 3]
    assert objs[2]["prompt_token_ids"] == [7, 8, 9, 10, 11]
    assert all(len(o["token_ids"]) == 6 and o["finish_reason"] == "length" for o in objs)
    # the same prompt alone gives the same tokens (batch invariance through the CLI)
    alone = _run(
        "offline",
        "--model",
        str(model),
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--prompt-ids",
        "1,2,3",
        "--json",
    )
    assert json.loads(alone.stdout)["token_ids"] == objs[1]["token_ids"]


def test_seeded_sampling_through_the_cli(model):
    args = (
        "offline",
        "--model",
        str(model),
        "--max-tokens",
        "8",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "5",
        "--ignore-eos",
        "--prompt",
        "abc",
        "--json",
    )
    assert _run(*args).stdout == _run(*args).stdout


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("--prompt", ""), "--prompt"),
        (("--prompt-ids", "1,x"), "--prompt-ids"),
        (("--prompt-ids", "1,99999"), "--prompt-ids"),
        (("--prompt-ids", ",".join(["5"] * 600)), "--prompt-ids"),
        (("--prompt", "hi", "--max-tokens", "0"), "--max-tokens"),
        (("--prompt", "hi", "--temperature", "-1"), "--temperature"),
        (("--prompt", "hi", "--top-p", "1.5"), "--top-p"),
        (("--prompt", "hi", "--top-p", "0"), "--top-p"),
        ((), "--prompt"),
    ],
)
def test_bad_input_exits_2_naming_the_flag(model, args, flag):
    proc = _run("offline", "--model", str(model), *args, check=False)
    assert proc.returncode == 2
    assert f"error: {flag}:" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_bad_jsonl_line_names_line_and_field(model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "x", "temprature": 1}\n')
    proc = _run("offline", "--model", str(model), "--input", str(bad), check=False)
    assert proc.returncode == 2 and "bad.jsonl:2" in proc.stderr and "temprature" in proc.stderr


def test_missing_model_dir_is_a_clear_error(tmp_path):
    proc = _run("offline", "--model", str(tmp_path / "nope"), "--prompt", "hi", check=False)
    assert proc.returncode == 2 and "--model" in proc.stderr and "config.json" in proc.stderr


def test_offline_ep2_prints_the_same_json_as_ep1(model):
    args = (
        "offline",
        "--model",
        str(model),
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--json",
        "--prompt",
        "Hello world",
        "--prompt-ids",
        "1,2,3",
        "--prompt-ids",
        "9,8,7,6",
    )
    single = _run(*args)
    expert_parallel = _run(*args, "--ep", "2")
    assert expert_parallel.stdout == single.stdout
    assert len(expert_parallel.stdout.strip().splitlines()) == 3


def test_offline_without_prefix_caching_prints_the_same_json(model):
    shared = ",".join(str(t) for t in range(40, 60))
    args = ("offline", "--model", str(model), "--max-tokens", "5", "--ignore-eos", "--json")
    prompts = ("--prompt-ids", shared + ",7", "--prompt-ids", shared + ",8,9")
    cached = _run(*args, *prompts)
    assert _run(*args, *prompts, "--no-prefix-caching").stdout == cached.stdout
    assert len(cached.stdout.strip().splitlines()) == 2


def test_bad_ep_size_is_a_clear_error(model):
    proc = _run("offline", "--model", str(model), "--prompt", "hi", "--ep", "0", check=False)
    assert proc.returncode == 2 and "error: --ep:" in proc.stderr


def test_serve_no_prefix_caching_flag_turns_the_cache_off(model):
    from cluster.cli import _parser
    from cluster.serve_cmd import _config

    def config(*flags: str):
        return _config(_parser().parse_args(["serve", "--model", str(model), *flags]))

    assert config().prefix_caching and not config("--no-prefix-caching").prefix_caching
