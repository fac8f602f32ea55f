"""DeepSeek-V3 vs transformers (the oracle) on tiny random checkpoints, fp32 on CPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, DeepseekV3Config
from transformers import DeepseekV3ForCausalLM as HFDeepseekV3

from workers.models.attention import AttentionMetadata
from workers.models.deepseek_v3 import DeepseekV3ForCausalLM

BLOCK = 4
NEW_TOKENS = 24
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "rope_theta": 10000.0,
    "beta_fast": 32,
    "beta_slow": 1,
}
ROPES = {
    "rope": None,
    "yarn": YARN,  # DeepSeek-V3's own shape: cos/sin factor 1, softmax scale * mscale^2
    "yarn-mscale": {**YARN, "mscale": 0.707},  # also scales cos/sin (attention factor != 1)
}


def tiny_config(q_lora_rank: int | None, rope: str, interleave: bool) -> DeepseekV3Config:
    wide = q_lora_rank is not None  # vary the routing shape along with q_lora_rank
    return DeepseekV3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=16 if wide else 8,
        n_shared_experts=1,
        num_experts_per_tok=4 if wide else 2,
        n_group=4 if wide else 2,
        topk_group=2 if wide else 1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        max_position_embeddings=256,
        rope_parameters=ROPES[rope],
        rope_interleave=interleave,
        initializer_range=0.05,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def make_checkpoint(config: DeepseekV3Config, path: Path, seed: int = 0) -> HFDeepseekV3:
    torch.manual_seed(seed)
    hf = HFDeepseekV3(config).eval()
    with torch.no_grad():  # decisive routing: no near-ties between our gating and transformers'
        for layer in hf.model.layers[config.first_k_dense_replace :]:
            layer.mlp.gate.weight.mul_(20.0)
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts) * 0.5)
    hf.save_pretrained(path)
    return hf


def load_ours(path: Path, owned: list[int] | None = None) -> DeepseekV3ForCausalLM:
    model = DeepseekV3ForCausalLM(AutoConfig.from_pretrained(path), owned_experts=owned).eval()
    tensors = load_file(path / "model.safetensors")
    wanted = model.checkpoint_tensors()
    assert set(wanted) == set(tensors)
    assert all(tuple(tensors[name].shape) == shape for name, shape in wanted.items())
    model.load_checkpoint(tensors)
    return model


@dataclass
class Pair:
    hf: HFDeepseekV3
    ours: DeepseekV3ForCausalLM


SHAPES = [(q, rope, i) for q in (None, 24) for rope in ("rope", "yarn") for i in (True, False)]
CASES = [
    pytest.param((q, rope, i), id=f"q{q}-{rope}-{'inter' if i else 'half'}")
    for q, rope, i in [*SHAPES, (24, "yarn-mscale", True)]
]


@pytest.fixture(scope="module", params=CASES)
def pair(request, tmp_path_factory) -> Pair:
    path = tmp_path_factory.mktemp("dsv3")
    hf = make_checkpoint(tiny_config(*request.param), path)
    return Pair(hf, load_ours(path))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    spinning threads made this file ~5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def new_cache(model: DeepseekV3ForCausalLM, num_blocks: int) -> list[torch.Tensor]:
    return [torch.zeros(num_blocks * BLOCK, *model.kv_token_shape) for _ in range(model.num_layers)]


def block_tables(num_seqs: int, blocks_each: int, seed: int = 1) -> list[list[int]]:
    """Non-contiguous, interleaved block ids (block 0 unused)."""
    perm = (
        torch.randperm(num_seqs * blocks_each, generator=torch.Generator().manual_seed(seed)) + 1
    ).tolist()
    return [perm[i * blocks_each : (i + 1) * blocks_each] for i in range(num_seqs)]


def prompts(seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g) for n in (7, 13, 3)]


@torch.no_grad()
def test_prefill_logits_match(pair: Pair) -> None:
    seqs = prompts()
    tables = block_tables(len(seqs), 4)
    meta = AttentionMetadata.build([0] * 3, [len(s) for s in seqs], tables, BLOCK)
    logits = pair.ours.compute_logits(pair.ours(torch.cat(seqs), meta, new_cache(pair.ours, 13)))
    expected = torch.cat([pair.hf(s[None]).logits[0] for s in seqs])
    assert (logits - expected).abs().max().item() < 1e-4


@torch.no_grad()
def test_greedy_decode_matches_generate(pair: Pair) -> None:
    seqs = prompts()
    blocks_each = (max(len(s) for s in seqs) + NEW_TOKENS + BLOCK - 1) // BLOCK
    tables = block_tables(len(seqs), blocks_each)
    cache = new_cache(pair.ours, len(seqs) * blocks_each + 1)
    cached, new = [0] * 3, [len(s) for s in seqs]
    step_ids = torch.cat(seqs)
    out: list[list[int]] = [[] for _ in seqs]
    for _ in range(NEW_TOKENS):  # step 0 prefills all three, then batched decode
        meta = AttentionMetadata.build(cached, new, tables, BLOCK)
        hidden = pair.ours(step_ids, meta, cache)
        step_ids = pair.ours.compute_logits(hidden[meta.last_token_index]).argmax(-1)
        for i, tok in enumerate(step_ids.tolist()):
            out[i].append(tok)
        cached, new = [c + n for c, n in zip(cached, new, strict=True)], [1] * 3
    for s, ours in zip(seqs, out, strict=True):
        ref = pair.hf.generate(s[None], max_new_tokens=NEW_TOKENS, do_sample=False)
        assert ours == ref[0, len(s) :].tolist()


@torch.no_grad()
def test_chunked_prefill_matches_one_chunk(pair: Pair) -> None:
    seqs = prompts(seed=3)
    a, b = seqs[1], seqs[0]  # a: 13 tokens in chunks of 6 + 7; b joins the second step whole
    tables = block_tables(2, 4, seed=4)
    whole = new_cache(pair.ours, 9)
    meta = AttentionMetadata.build([0, 0], [len(a), len(b)], tables, BLOCK)
    hidden = pair.ours(torch.cat((a, b)), meta, whole)
    expected = pair.ours.compute_logits(hidden[meta.last_token_index])

    chunked = new_cache(pair.ours, 9)
    pair.ours(a[:6], AttentionMetadata.build([0], [6], tables[:1], BLOCK), chunked)
    meta = AttentionMetadata.build([6, 0], [len(a) - 6, len(b)], tables, BLOCK)
    hidden = pair.ours(torch.cat((a[6:], b)), meta, chunked)
    logits = pair.ours.compute_logits(hidden[meta.last_token_index])
    assert (logits - expected).abs().max().item() < 1e-5
    for i in range(2):  # the chunked cache holds the same latents as the one-shot one
        used = torch.tensor([t * BLOCK + o for t in tables[i] for o in range(BLOCK)])
        assert torch.allclose(chunked[0][used], whole[0][used], atol=1e-6)


def test_owned_experts_only_in_checkpoint_tensors() -> None:
    config = tiny_config(24, "rope", interleave=True)
    full = DeepseekV3ForCausalLM(config).checkpoint_tensors()
    part = DeepseekV3ForCausalLM(config, owned_experts=[3, 12]).checkpoint_tensors()
    expert_names = {n for n in full if ".mlp.experts." in n}
    owned = {n for n in expert_names if n.split(".mlp.experts.")[1].split(".")[0] in ("3", "12")}
    assert len(owned) == 2 * 3 * (config.num_hidden_layers - config.first_k_dense_replace)
    assert set(part) == (set(full) - expert_names) | owned
    assert not any(n.startswith(f"model.layers.{config.num_hidden_layers}.") for n in full)


def test_correction_bias_stays_fp32_in_bf16() -> None:
    model = DeepseekV3ForCausalLM(tiny_config(None, "rope", interleave=True))
    gate = model.model.layers[1].mlp.gate
    values = torch.randn(8, dtype=torch.float64).float() * 0.5 + 3.0001
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(values)
    model.to(torch.bfloat16)
    assert gate.weight.dtype == torch.bfloat16
    assert gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, values)
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in model.checkpoint_tensors()
    meta = AttentionMetadata.build([0], [5], [[0, 1]], BLOCK)
    cache = [c.bfloat16() for c in new_cache(model, 2)]
    with torch.no_grad():  # random init is fine: this only checks the bf16 forward runs
        for p in model.parameters():
            if p.dtype == torch.bfloat16:
                p.normal_(0, 0.05)
        hidden = model(torch.arange(5), meta, cache)
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(hidden.float()).all()
