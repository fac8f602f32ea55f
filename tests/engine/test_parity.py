"""Greedy output of our engine equals transformers' for every architecture (fp32, CPU).

Tolerance: the log-probability of every generated token agrees with transformers' within 1e-4
(absolute); tokens must be identical. Prompts of different lengths run in one batch, through
small KV blocks and a small step budget so chunked prefill and multi-block tables are exercised.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import CHECKPOINTS
from workers.engine import EngineConfig, SamplingParams, SchedulerConfig
from workers.engine.build import build_engine

NEW_TOKENS = 24
PROMPT_LENGTHS = (3, 11, 26, 40)


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(42)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def transformers_greedy(
    model, prompt: list[int], new_tokens: int = NEW_TOKENS, device: str = "cpu"
) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens for `prompt` and each one's log-probability."""
    ids = torch.tensor([prompt], device=device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=None,
        eos_token_id=None,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [
        float(torch.log_softmax(step[0].float(), -1)[t])
        for step, t in zip(out.logits, tokens, strict=True)
    ]
    return tokens, logprobs


@pytest.mark.parametrize("kernels", ["on", "off"])  # off: every pure-torch fallback path
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_greedy_tokens_match_transformers(name, kernels, tiny_checkpoint, monkeypatch):
    if kernels == "off":
        monkeypatch.setenv("MOE_KERNELS", "0")
    path = tiny_checkpoint(name)
    config = EngineConfig(block_size=4, scheduler=SchedulerConfig(max_num_batched_tokens=24))
    engine = build_engine(path, config=config)
    prompts = _prompts(engine.vocab_size)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    outputs = engine.generate([(p, params) for p in prompts])
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outputs, strict=True):
        ref_tokens, ref_logprobs = transformers_greedy(reference, prompt)
        assert out.token_ids == ref_tokens, f"{name}: prompt of {len(prompt)} tokens diverged"
        ours = [lp[t] for lp, t in zip(out.logprobs or [], out.token_ids, strict=True)]
        assert ours == pytest.approx(ref_logprobs, abs=1e-4)
        assert len(set(out.token_ids)) > 1, "degenerate output would hide bugs"
    assert engine.stats().kv_blocks_used == 0
