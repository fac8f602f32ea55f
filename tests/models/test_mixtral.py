"""Mixtral against transformers: checkpoint names, batched paged prefill, greedy decode."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import MixtralConfig
from transformers import MixtralForCausalLM as HFMixtral

from workers.models.attention import AttentionMetadata
from workers.models.mixtral import MixtralForCausalLM

BLOCK = 4
NUM_BLOCKS = 32
# non-contiguous, interleaved block tables: 9 blocks (36 tokens) per sequence
TABLES = [
    [3, 17, 5, 30, 9, 1, 22, 12, 24],
    [0, 8, 25, 14, 2, 31, 19, 6, 13],
    [28, 4, 11, 20, 7, 15, 26, 10, 21],
]
PROMPTS = [[5, 77, 3, 190, 42, 8, 250], [11, 99, 140, 7], [201, 64, 33, 2, 128, 9, 76, 18, 55, 3]]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=256,
        max_position_embeddings=128,
        eos_token_id=None,
        bos_token_id=None,
    )
    hf = HFMixtral(config).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.gate.weight.mul_(20.0)  # decisive routing: no near-ties in top-k
    path = tmp_path_factory.mktemp("mixtral")
    hf.save_pretrained(path)
    return path, hf


def _load(path) -> MixtralForCausalLM:
    config = MixtralConfig.from_pretrained(path)
    model = MixtralForCausalLM(config)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert set(model.checkpoint_tensors()) == names
        model.load_checkpoint({n: f.get_tensor(n) for n in names})
    return model.eval()


def _cache(model: MixtralForCausalLM) -> list[torch.Tensor]:
    return [torch.zeros(NUM_BLOCKS * BLOCK, *model.kv_token_shape) for _ in range(model.num_layers)]


@torch.no_grad()
def test_prefill_matches_transformers(checkpoint):
    path, hf = checkpoint
    model = _load(path)
    meta = AttentionMetadata.build([0, 0, 0], [len(p) for p in PROMPTS], TABLES, BLOCK)
    ids = torch.tensor([t for p in PROMPTS for t in p])
    logits = model.compute_logits(model(ids, meta, _cache(model)))  # [T, V]
    start = 0
    for prompt in PROMPTS:
        ref = hf(torch.tensor([prompt])).logits[0].float()
        torch.testing.assert_close(logits[start : start + len(prompt)], ref, atol=1e-4, rtol=0)
        start += len(prompt)


@torch.no_grad()
def test_greedy_decode_matches_generate(checkpoint):
    path, hf = checkpoint
    model = _load(path)
    cache = _cache(model)
    seqs = [list(p) for p in PROMPTS]
    cached = [0, 0, 0]
    new = [list(p) for p in PROMPTS]
    for _ in range(NEW_TOKENS):
        meta = AttentionMetadata.build(cached, [len(n) for n in new], TABLES, BLOCK)
        hidden = model(torch.tensor([t for n in new for t in n]), meta, cache)
        next_ids = model.compute_logits(hidden[meta.last_token_index]).argmax(-1).tolist()
        cached = [c + len(n) for c, n in zip(cached, new, strict=True)]
        new = [[t] for t in next_ids]
        for seq, t in zip(seqs, next_ids, strict=True):
            seq.append(t)
    for prompt, seq in zip(PROMPTS, seqs, strict=True):
        ref = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert seq == ref[0].tolist()
        assert len(set(seq[len(prompt) :])) > 3  # a real continuation, not one repeated token


def test_sliding_window_rejected():
    config = MixtralConfig(
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        vocab_size=64,
        sliding_window=16,
        max_position_embeddings=128,
    )
    with pytest.raises(NotImplementedError, match="sliding_window=16"):
        MixtralForCausalLM(config)
