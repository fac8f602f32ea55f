"""`moe-cluster`: the command line for people. Logs go to stderr; results to stdout."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("moe_cluster")

# engine field -> CLI flag, so errors name what the user typed
_FLAGS = {
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "seed": "--seed",
    "prompt": "--prompt",
    "prompt_token_ids": "--prompt-ids",
    "input": "--input",
    "dtype": "--dtype",
    "model": "--model",
    "ep": "--ep",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-cluster", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("make-tiny", help="write a tiny random checkpoint + tokenizer")
    t.add_argument("--arch", required=True, choices=["deepseek_v3", "qwen3_moe", "mixtral"])
    t.add_argument("--out", required=True, type=Path, help="output directory")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--preset", default="tiny", choices=["tiny", "bench"])

    o = sub.add_parser("offline", help="generate for prompts in this process")
    o.add_argument("--model", required=True, type=Path, help="HF checkpoint directory")
    o.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    o.add_argument("--max-tokens", type=int, default=16)
    o.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    o.add_argument("--top-p", type=float, default=1.0)
    o.add_argument("--top-k", type=int, default=0, help="0 disables")
    o.add_argument("--seed", type=int, default=None)
    o.add_argument("--ignore-eos", action="store_true")
    o.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    o.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    o.add_argument("--prompt-ids", action="append", default=[], help="e.g. 1,2,3 (repeatable)")
    o.add_argument("--input", type=Path, help="JSONL file: {'prompt': ...} per line")
    o.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    o.add_argument(
        "--ep", type=int, default=1, help="expert-parallel ranks (Ray actors, gloo); 1: in-process"
    )
    o.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="recompute every prompt (default: reuse the KV of shared prefixes)",
    )

    s = sub.add_parser("serve", help="start the cluster (embedded Ray or --address) and serve gRPC")
    s.add_argument("--model", type=Path, help="HF checkpoint directory (or model.path in --config)")
    s.add_argument("--config", type=Path, help="YAML with the ClusterConfig fields")
    s.add_argument("--port", type=int, help="gRPC port (default 9000)")
    s.add_argument("--address", help="join this Ray cluster (e.g. auto); default: embedded Ray")
    s.add_argument("--prefill-gangs", type=int)
    s.add_argument("--prefill-gang-size", type=int, help="expert-parallel ranks per prefill gang")
    s.add_argument("--decode-gangs", type=int)
    s.add_argument("--decode-gang-size", type=int, help="expert-parallel ranks per decode gang")
    s.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="every rank recomputes every prompt (config: prefix_caching: false)",
    )
    s.add_argument(
        "--http-port",
        type=int,
        help="port of the OpenAI-compatible HTTP API (Serve's HTTP proxy; default 8000; "
        "config router.http_port: null turns it off)",
    )
    s.add_argument(
        "--http-host",
        default="127.0.0.1",
        help="address Serve's HTTP proxy binds with router.http_server: serve (default "
        "loopback; 0.0.0.0 to expose it); the Router's own HTTP server binds every address",
    )
    s.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for ready")
    s.add_argument("--demo", metavar="PROMPT", help="once ready, stream one greedy completion")

    g = sub.add_parser("generate", help="stream one completion from a running cluster")
    g.add_argument("prompt", help="prompt text")
    g.add_argument("--host", default="localhost")
    g.add_argument("--port", type=int, default=9000)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=None, help="0 is greedy; default 1")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=0, help="0 disables")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument(
        "--stream-interval", type=int, default=0, help="tokens per message (0: the cluster's)"
    )
    g.add_argument("--token", default=None, help="bearer token (default: $MOE_CLUSTER_TOKEN)")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole call")
    return p


def _offline(args: argparse.Namespace) -> int:
    from cluster.offline import PromptSpec, parse_prompt_ids, read_jsonl, result_json, run_offline
    from workers.engine import EngineConfig, InvalidRequestError, SamplingParams
    from workers.engine.build import build_engine

    base = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        stop=tuple(args.stop),
    )
    try:
        base.validate()
        specs = [PromptSpec(f"--prompt #{i + 1}", p, base) for i, p in enumerate(args.prompt)]
        specs += [
            PromptSpec(f"--prompt-ids #{i + 1}", parse_prompt_ids(p), base)
            for i, p in enumerate(args.prompt_ids)
        ]
        if args.input is not None:
            specs += read_jsonl(args.input, base)
        if not specs:
            raise InvalidRequestError(
                "prompt", "no prompts: give --prompt, --prompt-ids or --input"
            )
        if not (args.model / "config.json").exists():
            raise InvalidRequestError(
                "model", f"{args.model} has no config.json; point --model at an HF checkpoint dir"
            )
        config = EngineConfig(prefix_caching=args.prefix_caching)
        if args.ep == 1:
            outputs = run_offline(build_engine(args.model, dtype=args.dtype, config=config), specs)
        else:
            from cluster.ep_offline import run_offline_ep

            outputs = run_offline_ep(
                args.model, specs, args.ep, dtype=args.dtype, engine_config=config
            )
    except InvalidRequestError as e:
        flag = _FLAGS.get(e.field, e.field)
        msg = str(e).removeprefix(f"{e.field}: ")
        print(f"moe-cluster offline: error: {flag}: {msg}", file=sys.stderr)
        return 2
    for out in outputs:
        if args.json:
            print(result_json(out))
        else:
            print(f"{out.text!r} [{len(out.token_ids)} tokens, {out.finish_reason}]")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.command == "make-tiny":
            from cluster.tiny import make_tiny

            out = make_tiny(args.arch, args.out, seed=args.seed, preset=args.preset)
            print(f"wrote {args.arch} checkpoint to {out}", file=sys.stderr)
            return 0
        if args.command == "serve":
            from cluster.serve_cmd import serve_command

            return serve_command(args)
        if args.command == "generate":
            from cluster.serve_cmd import generate_command

            return generate_command(args)
        return _offline(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"moe-cluster {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. an expert-parallel rank failed (cluster.ep_offline)
        print(f"moe-cluster {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
