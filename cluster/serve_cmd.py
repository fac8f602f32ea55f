"""`moe-cluster serve` and `moe-cluster generate`.

serve: validate the config (errors name the flag or the config field, exit 2), start an
embedded Ray or join `--address`, deploy, print `ready on HOST:PORT`, and on SIGINT/SIGTERM take
the application, Serve and an embedded Ray down (exit 0).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from cluster.config import OVERRIDES, ClusterConfig, ConfigError

__all__ = ["generate_command", "serve_command"]

_FLAG_OF = {path: "--" + name.replace("_", "-") for name, path in OVERRIDES.items()}


class _Stop(Exception):
    """Raised in the main thread by SIGINT/SIGTERM."""


def _config(args: argparse.Namespace) -> ClusterConfig:
    flat: dict[str, Any] = {
        "model": str(args.model) if args.model is not None else None,
        "port": args.port,
        "http_port": args.http_port,
        "prefill_gangs": args.prefill_gangs,
        "prefill_gang_size": args.prefill_gang_size,
        "decode_gangs": args.decode_gangs,
        "decode_gang_size": args.decode_gang_size,
        "prefix_caching": False if args.no_prefix_caching else None,
    }
    if args.config is not None:
        return ClusterConfig.from_yaml(args.config, **flat)
    return ClusterConfig.from_args(None, **flat)


def _config_errors(e: ConfigError, config_file: Any) -> list[str]:
    lines = []
    for path, msg in e.problems:
        if path in _FLAG_OF:
            lines.append(f"{_FLAG_OF[path]}: {msg}")
        elif config_file is not None:
            lines.append(f"{config_file}: {path}: {msg}")
        else:
            lines.append(f"{path}: {msg} (set it in a --config YAML file)")
    return lines


def serve_command(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args)
    except ConfigError as e:
        for line in _config_errors(e, args.config):
            print(f"moe-cluster serve: error: {line}", file=sys.stderr)
        return 2
    if not os.path.exists(os.path.join(cfg.model.path, "config.json")):
        print(
            f"moe-cluster serve: error: --model: {cfg.model.path} has no config.json; point it "
            "at an HF checkpoint directory (moe-cluster make-tiny writes one)",
            file=sys.stderr,
        )
        return 2

    import ray

    from cluster.embedded import join_ray, start_embedded_ray
    from cluster.launch import DeployError, deploy, head_node_ip, undeploy

    def stop(signum: int, frame: Any) -> None:
        raise _Stop(signal.Signals(signum).name)

    embedded = args.address is None
    if embedded:
        start_embedded_ray()
    else:
        try:
            join_ray(args.address)
        except RuntimeError as e:
            print(f"moe-cluster serve: error: --address: {e}", file=sys.stderr)
            return 2
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    host = "localhost"  # the Router serves router.port on the head node
    try:
        deploy(cfg, http_host=args.http_host, timeout_s=args.timeout)
        host = "localhost" if embedded else head_node_ip()
        http = cfg.router.http_port
        # Serve's proxy binds --http-host; the Router's own HTTP server every address, as gRPC
        http_host = args.http_host if cfg.router.starts_serve_proxy else host
        api = f" (OpenAI HTTP API on {http_host}:{http}/v1)" if http is not None else ""
        print(f"moe-cluster serve: ready on {host}:{cfg.router.port}{api}", flush=True)
        if args.demo:
            _demo(f"{host}:{cfg.router.port}", args.demo, cfg.router.auth_tokens)
        print("moe-cluster serve: serving until Ctrl-C or SIGTERM", file=sys.stderr, flush=True)
        threading.Event().wait()  # until a signal raises _Stop
    except _Stop as e:
        print(f"moe-cluster serve: {e}: draining, then shutting down", file=sys.stderr, flush=True)
        _drain(f"{host}:{cfg.router.port}", cfg.router.auth_tokens, cfg.router.drain_grace_s)
    except DeployError as e:
        print(f"moe-cluster serve: error: {e}", file=sys.stderr)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        undeploy(shutdown_serve=embedded)
        if embedded:
            ray.shutdown()
        print("moe-cluster serve: stopped", file=sys.stderr, flush=True)
    return code


def _drain(target: str, tokens: list[str], grace_s: float) -> None:
    """Stop admissions on every rank and wait (at most the grace + 2 s) for the streams in
    flight to finish; the ranks migrate or end what is left when the grace runs out."""
    import time

    from router.client import ClientError, InferenceClient

    deadline = time.monotonic() + grace_s + 2
    try:
        with InferenceClient(target, token=tokens[0] if tokens else None, timeout_s=10) as c:
            held = c.drain().running_requests
            print(f"moe-cluster serve: {held} requests in flight", file=sys.stderr, flush=True)
            quiet = 0  # a request moving from prefill to decode is briefly on no rank
            while time.monotonic() < deadline and quiet < 5:
                status = c.cluster_status()
                busy = any(
                    r.running_requests for d in status.deployments for g in d.gangs for r in g.ranks
                )
                quiet = 0 if busy else quiet + 1
                time.sleep(0.2)  # polling the cluster's state; bounded by the grace
    except ClientError as e:  # the router is gone already: nothing left to drain through it
        print(f"moe-cluster serve: drain skipped ({e.details})", file=sys.stderr, flush=True)


def _demo(target: str, prompt: str, tokens: list[str]) -> None:
    from router.client import InferenceClient

    with InferenceClient(target, token=tokens[0] if tokens else None, timeout_s=120) as client:
        print(f"demo> {prompt}", flush=True)
        for chunk in client.generate(prompt, max_tokens=32, temperature=0.0):
            print(chunk.text, end="", flush=True)
            if chunk.finish_reason is not None:
                print(f"\n[{chunk.finish_reason}]", flush=True)


def generate_command(args: argparse.Namespace) -> int:
    from router.client import ClientError, InferenceClient

    token = args.token or os.environ.get("MOE_CLUSTER_TOKEN") or None
    try:
        with InferenceClient(f"{args.host}:{args.port}", token=token) as client:
            stream = client.generate(
                args.prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                stop=tuple(args.stop),
                ignore_eos=args.ignore_eos,
                stream_interval=args.stream_interval,
                timeout_s=args.timeout,
            )
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                if chunk.finish_reason is not None:
                    usage = chunk.usage
                    done = f"[{chunk.finish_reason}"
                    if usage is not None:
                        done += f", {usage.prompt_tokens} prompt + "
                        done += f"{usage.completion_tokens} completion tokens"
                    print(f"\n{done}]", file=sys.stderr)
    except ClientError as e:
        print(f"\nmoe-cluster generate: error: {e}", file=sys.stderr)
        return 1 if e.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL") else 2
    return 0
