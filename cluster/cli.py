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
    return p


def _offline(args: argparse.Namespace) -> int:
    from cluster.offline import PromptSpec, parse_prompt_ids, read_jsonl, result_json, run_offline
    from workers.engine import InvalidRequestError, SamplingParams
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
        if args.ep == 1:
            outputs = run_offline(build_engine(args.model, dtype=args.dtype), specs)
        else:
            from cluster.ep_offline import run_offline_ep

            outputs = run_offline_ep(args.model, specs, args.ep, dtype=args.dtype)
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
        return _offline(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"moe-cluster {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. an expert-parallel rank failed (cluster.ep_offline)
        print(f"moe-cluster {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
