"""The loader against real tiny checkpoints written by transformers: single file and sharded,
per-expert and fused experts, fp8 block-quantized weights, and every error it promises."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, Qwen3MoeConfig
from transformers import MixtralForCausalLM as HFMixtral
from transformers import Qwen3MoeForCausalLM as HFQwen3Moe

import workers.loader as loader
from workers.loader import CheckpointError, CheckpointReader, dequantize_fp8_blocks, load_model
from workers.models import UnsupportedArchitectureError
from workers.models.attention import AttentionMetadata

NUM_EXPERTS, MOE_LAYERS, I, H = 8, (0, 2), 32, 64  # layer 1 is dense
OWNED = [1, 5, 6]
PROMPT = [5, 77, 3, 190, 42, 8, 250, 11]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        hidden_size=H,
        intermediate_size=96,
        moe_intermediate_size=I,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        vocab_size=256,
        mlp_only_layers=[1],
        norm_topk_prob=True,
    )
    hf = HFQwen3Moe(config).eval()
    single = tmp_path_factory.mktemp("qwen_single")
    sharded = tmp_path_factory.mktemp("qwen_sharded")
    hf.save_pretrained(single)
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    return hf, single, sharded


def _copy(src, tmp_path, name="ckpt"):
    return shutil.copytree(src, tmp_path / name)


def _rewrite(path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _expert_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("experts") + 1]) if "experts" in parts else None


class SpyReader(CheckpointReader):
    """A real reader that also remembers which tensor names it read."""

    instances: list[SpyReader] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.names: list[str] = []
        SpyReader.instances.append(self)

    def read(self, wanted, dtype=torch.float32, device="cpu"):
        self.names += list(wanted)
        return super().read(wanted, dtype, device)


@torch.no_grad()
def _logits(model, prompt=PROMPT) -> torch.Tensor:
    meta = AttentionMetadata.build([0], [len(prompt)], [[3, 0, 2]], 4)
    cache = [torch.zeros(16, *model.kv_token_shape) for _ in range(model.num_layers)]
    return model.compute_logits(model(torch.tensor(prompt), meta, cache))


def test_full_model_matches_transformers(qwen):
    hf, single, sharded = qwen
    model = load_model(single, progress=False)
    assert not model.training
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(_logits(model), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(_logits(load_model(sharded, progress=False)), _logits(model))


def test_owned_experts_read_only_owned(qwen, monkeypatch):
    _, single, sharded = qwen
    monkeypatch.setattr(loader, "CheckpointReader", SpyReader)
    SpyReader.instances.clear()
    model = load_model(sharded, owned_experts=OWNED, progress=False)
    (reader,) = SpyReader.instances
    all_names = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    non_expert = [n for n in all_names if _expert_of(n) is None]
    assert reader.tensors_read == len(non_expert) + 3 * len(OWNED) * len(MOE_LAYERS)
    assert {_expert_of(n) for n in reader.names} == {None, *OWNED}
    full = load_file(str(single / "model.safetensors"))
    assert reader.bytes_read == sum(full[n].nbytes for n in set(reader.names))
    for layer in MOE_LAYERS:
        experts = model.model.layers[layer].mlp.experts
        prefix = f"model.layers.{layer}.mlp.experts"
        for local, e in enumerate(OWNED):
            assert torch.equal(experts.w13[local, :I], full[f"{prefix}.{e}.gate_proj.weight"])
            assert torch.equal(experts.w2[local], full[f"{prefix}.{e}.down_proj.weight"])


def test_dtype_and_progress_bar(qwen, capsys):
    model = load_model(qwen[1], dtype=torch.bfloat16, owned_experts=[0], progress=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert "Loading" in capsys.readouterr().err


def _fuse(tensors: dict[str, torch.Tensor]) -> None:
    for layer in MOE_LAYERS:
        p = f"model.layers.{layer}.mlp.experts"
        pop = [
            [tensors.pop(f"{p}.{e}.{w}.weight") for w in ("gate_proj", "up_proj", "down_proj")]
            for e in range(NUM_EXPERTS)
        ]
        tensors[f"{p}.gate_up_proj"] = torch.stack([torch.cat((g, u)) for g, u, _ in pop])
        tensors[f"{p}.down_proj"] = torch.stack([d for _, _, d in pop])  # [E, H, I]


def test_fused_experts_load_like_per_expert(qwen, tmp_path):
    _, single, _ = qwen
    fused = _copy(single, tmp_path)
    _rewrite(fused, _fuse)
    per_expert = load_model(single, owned_experts=OWNED, progress=False).state_dict()
    from_fused = load_model(fused, owned_experts=OWNED, progress=False).state_dict()
    assert per_expert.keys() == from_fused.keys()
    for name, value in per_expert.items():
        assert torch.equal(value, from_fused[name]), name
    wanted = load_model(single, owned_experts=OWNED, progress=False).checkpoint_tensors()
    a, b = CheckpointReader(single), CheckpointReader(fused)
    a.read(wanted), b.read(wanted)
    assert (b.tensors_read, b.bytes_read) == (a.tensors_read, a.bytes_read)  # slices only


def _quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax fp8 quantization (the inverse of the layout under test)."""
    br, bc = block
    rows, cols = w.shape
    scale = torch.empty(-(-rows // br), -(-cols // bc))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            scale[i, j] = w[i * br : (i + 1) * br, j * bc : (j + 1) * bc].abs().max() / 448.0
    q = w / scale.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return q.to(torch.float8_e4m3fn), scale


def _reference_dequant(w: torch.Tensor, s: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    out = torch.full(w.shape, float("nan"))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * br, (i + 1) * br), slice(j * bc, (j + 1) * bc)
            out[rows, cols] = w[rows, cols].float() * s[i, j]
    return out


def test_dequantize_fp8_blocks_matches_loop():
    torch.manual_seed(1)
    w = (torch.randn(300, 200) * 50).to(torch.float8_e4m3fn)  # edges: 300 = 2*128+44, 200
    s = torch.rand(3, 2) + 0.1
    torch.testing.assert_close(dequantize_fp8_blocks(w, s), _reference_dequant(w, s, 128, 128))
    w2, s2 = w[:50, :70], torch.rand(4, 3)
    got = dequantize_fp8_blocks(w2, s2, (16, 32))
    torch.testing.assert_close(got, _reference_dequant(w2, s2, 16, 32))
    with pytest.raises(ValueError, match=r"expected \(2, 1\)"):
        dequantize_fp8_blocks(w[:200, :100], s)


FP8_BLOCK = (48, 40)  # small, uneven blocks so every tensor has partial edge blocks


def test_fp8_weights_dequantized_on_load(qwen, tmp_path):
    _, single, _ = qwen
    path = _copy(single, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(FP8_BLOCK)}
    (path / "config.json").write_text(json.dumps(config))
    quantized = [
        "lm_head.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.2.mlp.experts.5.down_proj.weight",
    ]
    expected = {}

    def edit(tensors):
        for name in quantized:
            tensors[name], tensors[f"{name}_scale_inv"] = _quantize(tensors[name], FP8_BLOCK)
            expected[name] = _reference_dequant(
                tensors[name], tensors[f"{name}_scale_inv"], *FP8_BLOCK
            )

    _rewrite(path, edit)
    model = load_model(path, owned_experts=[5], progress=False)
    params = dict(model.named_parameters())
    torch.testing.assert_close(params["lm_head.weight"], expected["lm_head.weight"])
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(params[q], expected[q])
    down = expected["model.layers.2.mlp.experts.5.down_proj.weight"]
    torch.testing.assert_close(model.model.layers[2].mlp.experts.w2[0], down)


def test_fused_fp8_reads_one_experts_row_blocks(tmp_path):
    torch.manual_seed(2)
    gate_up = torch.randn(4, 2 * I, H)  # [E, 2I, H]; I=32 is not a multiple of the 48-row block
    q, s = zip(*(_quantize(m, FP8_BLOCK) for m in gate_up), strict=True)
    tensors = {
        "x.experts.gate_up_proj": torch.stack(q),
        "x.experts.gate_up_proj_scale_inv": torch.stack(s),
        "x.experts.down_proj": torch.randn(4, H, I),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path, fp8_block=FP8_BLOCK)
    got = reader.read(
        {"x.experts.2.gate_proj.weight": (I, H), "x.experts.2.up_proj.weight": (I, H)}
    )
    full = _reference_dequant(q[2], s[2], *FP8_BLOCK)
    torch.testing.assert_close(got["x.experts.2.gate_proj.weight"], full[:I])
    torch.testing.assert_close(got["x.experts.2.up_proj.weight"], full[I:])


def test_mixtral_loads_only_owned_experts(tmp_path, monkeypatch):
    config = MixtralConfig(
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        vocab_size=64,
        max_position_embeddings=64,
    )
    hf = HFMixtral(config).eval()
    hf.save_pretrained(tmp_path)
    monkeypatch.setattr(loader, "CheckpointReader", SpyReader)
    SpyReader.instances.clear()
    model = load_model(tmp_path, owned_experts=[2], progress=False)
    assert {_expert_of(n) for n in SpyReader.instances[0].names} == {None, 2}
    w1 = SpyReader.instances[0].read(
        {"model.layers.0.block_sparse_moe.experts.2.w1.weight": (16, 32)}
    )
    assert torch.equal(model.model.layers[0].block_sparse_moe.experts.w13[0, :16], *w1.values())


# --- errors ------------------------------------------------------------------------------
def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json not found.*Hugging Face"):
        load_model(tmp_path)


def test_missing_shard(qwen, tmp_path):
    path = _copy(qwen[2], tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (path / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"missing from .*: {shard}; the download"):
        load_model(path, progress=False)


def test_missing_key(qwen, tmp_path):
    path = _copy(qwen[1], tmp_path)
    _rewrite(path, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight is not in any of model\.safe"):
        load_model(path, progress=False)


def test_key_missing_from_the_shard_the_index_names(qwen, tmp_path):
    path = _copy(qwen[2], tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    wrong = next(
        f for f in index["weight_map"].values() if f != index["weight_map"]["lm_head.weight"]
    )
    index["weight_map"]["lm_head.weight"] = wrong
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{wrong} does not contain tensor lm_head\.weight"):
        load_model(path, progress=False)


def test_wrong_shape(qwen, tmp_path):
    path = _copy(qwen[1], tmp_path)
    _rewrite(path, lambda t: t.update({"model.norm.weight": torch.ones(32)}))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor model\.norm\.weight has "
        r"shape \[32\] but the model expects \[64\]",
    ):
        load_model(path, progress=False)


def test_unsupported_architecture(qwen, tmp_path):
    path = _copy(qwen[1], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="Qwen3MoeForCausalLM.*Mixtral"):
        load_model(path, progress=False)
