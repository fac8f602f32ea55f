"""GPU checks (`make gpu-check`), skipped where CUDA is absent: bf16 parity with transformers on
CUDA for the three families, and the NCCL dispatch path.

bf16 tolerance: the first FIRST_EQUAL greedy tokens equal transformers' (bf16 on the same GPU),
and up to the first divergence every token's log-probability within LOGPROB_ATOL. Exact
equality is not expected in bf16: the two systems sum in different orders, and a near-tie
between the two best tokens may flip; FIRST_EQUAL tokens on decisive checkpoints must not.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from tests.engine.test_parity import transformers_greedy
from workers.engine import SamplingParams
from workers.engine.build import build_engine
from workers.moe.dispatch import AllToAllDispatcher
from workers.moe.experts import RoutedExperts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NEW_TOKENS = 16
FIRST_EQUAL = 8
LOGPROB_ATOL = 5e-2


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_bf16_greedy_matches_transformers_on_cuda(name, tiny_checkpoint):
    path = tiny_checkpoint(name)
    engine = build_engine(path, dtype="bfloat16", device="cuda")
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, engine.vocab_size, (n,), generator=gen).tolist() for n in (5, 33)]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    outputs = engine.generate([(p, params) for p in prompts])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    for prompt, out in zip(prompts, outputs, strict=True):
        ref_tokens, ref_logprobs = transformers_greedy(hf, prompt, NEW_TOKENS, "cuda")
        assert out.token_ids[:FIRST_EQUAL] == ref_tokens[:FIRST_EQUAL], name
        for i, (a, b) in enumerate(zip(out.token_ids, ref_tokens, strict=True)):
            if a != b:
                break
            assert abs((out.logprobs or [])[i][a] - ref_logprobs[i]) <= LOGPROB_ATOL, (name, i)


def test_nccl_dispatch_equals_local_experts(tmp_path):
    """One-rank NCCL group on the GPU: dispatch + experts + combine equal the experts alone."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        experts = RoutedExperts(8, range(8), 64, 32).to("cuda", torch.bfloat16)
        with torch.no_grad():
            experts.w13.normal_(0, 0.1)
            experts.w2.normal_(0, 0.1)
            x = torch.randn(40, 64, device="cuda", dtype=torch.bfloat16)
            w, ids = torch.randn(40, 8, device="cuda").softmax(-1).topk(2)
            local = experts(x, ids, w)
            experts.dispatcher = AllToAllDispatcher(torch.zeros(8, dtype=torch.int64))
            routed = experts(x, ids, w)
        torch.testing.assert_close(routed, local, atol=0, rtol=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("t", [1, 16, 300])
@pytest.mark.parametrize("owned", [range(8), [1, 4, 6]])
def test_grouped_mm_experts_on_cuda(t, owned):
    """bf16 on CUDA takes torch._grouped_mm; it agrees with the fp32 per-expert path within
    bf16's rounding, experts owned elsewhere included (they contribute nothing)."""
    torch.manual_seed(0)
    m = RoutedExperts(8, owned, 64, 32).to("cuda")
    with torch.no_grad():
        m.w13.normal_(0, 0.1)
        m.w2.normal_(0, 0.1)
        x = torch.randn(t, 64, device="cuda")
        w, ids = torch.randn(t, 8, device="cuda").softmax(-1).topk(2)
        m.use_grouped_mm = False
        ref = m(x, ids, w)  # fp32, padded or looped
        m = m.to(torch.bfloat16)
        m.use_grouped_mm = None  # the default: grouped on CUDA in bf16
        assert m._grouped_mm_on(x.bfloat16())
        out = m(x.bfloat16(), ids, w).float()
    tol = 3e-2 * ref.abs().max().item()
    torch.testing.assert_close(out, ref, atol=tol, rtol=3e-2)
