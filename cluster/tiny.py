"""Tiny random Hugging Face checkpoints (and a locally trained tokenizer) for tests and benchmarks.

`make_tiny(arch, out)` writes a directory that `transformers.AutoModelForCausalLM` and
`AutoTokenizer` load like a real model: config.json, model.safetensors (fp32, the original
per-expert key layout), generation_config.json and the tokenizer files. Nothing is downloaded.

Default-init routers give near-uniform expert weights, so a near-tie that flips between the
engine and the reference (bf16, kernel order) swaps experts carrying equal mass. Every router is
rescaled so its logits have std `ROUTER_LOGIT_STD[arch]` (x25 over the default init at hidden 64
for softmax routers, x12.5 for DeepSeek's sigmoid one, which saturates beyond |logit| ~4): the top
experts then carry most of the weight. Rescaling cannot change which experts a softmax router
picks (top-k is scale-invariant); it makes the choice matter less when a near-tie flips.
DeepSeek's `e_score_correction_bias` is randomized (small enough that every expert still gets
load) so an engine that ignores it picks other experts.

Parameter counts of the "bench" preset (vocab 8192, hidden 512, 8 layers), as `param_count`
computes them:
    deepseek_v3  64 routed (moe 192) + 1 shared, top-8, 8 groups, MLA   151.6M (~0.6 GB fp32)
    qwen3_moe    48 experts (moe 256), top-8, GQA 8/4 heads, head 64     165.9M
    mixtral      8 experts (ffn 1024), top-2, GQA 8/4 heads, head 64     115.4M
Building one takes ~3-9 s on 2 CPU cores, most of it init and the safetensors write.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GenerationConfig,
    MixtralConfig,
    MixtralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from cluster.tiny_corpus import CORPUS

__all__ = ["ARCHS", "PRESETS", "build_config", "build_tokenizer", "make_tiny", "param_count"]

ARCHS = ("deepseek_v3", "qwen3_moe", "mixtral")
PRESETS = ("tiny", "bench")

# Special tokens take ids 0..3 in this order: bos, eos, pad, unk.
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
TOKENIZER_VOCAB = 512
# Plain-text chat format so chat requests work without a model-specific template.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
ROUTER_LOGIT_STD = {"deepseek_v3": 2.0, "qwen3_moe": 4.0, "mixtral": 4.0}
E_SCORE_BIAS_STD = 0.05  # 0.3 leaves some bench experts without any token

_CLASSES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    "mixtral": (MixtralConfig, MixtralForCausalLM),
}

# Shapes per (arch, preset). vocab_size and max_position_embeddings are added in build_config.
_SHAPES: dict[tuple[str, str], dict[str, Any]] = {
    ("deepseek_v3", "tiny"): dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        first_k_dense_replace=1,
        n_shared_experts=1,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
    ),
    ("deepseek_v3", "bench"): dict(
        hidden_size=512,
        intermediate_size=1536,
        moe_intermediate_size=192,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        q_lora_rank=256,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        first_k_dense_replace=1,
        n_shared_experts=1,
        n_routed_experts=64,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
    ),
    ("qwen3_moe", "tiny"): dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=16,
        num_experts_per_tok=4,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    ),
    ("qwen3_moe", "bench"): dict(
        hidden_size=512,
        intermediate_size=1536,
        moe_intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        num_experts=48,
        num_experts_per_tok=8,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    ("mixtral", "tiny"): dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
    ("mixtral", "bench"): dict(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
}
# Fields that hold for every preset of an arch (real-model conventions).
_COMMON: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(
        rope_interleave=True,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_mtp_layers=0,
    ),
    "qwen3_moe": dict(norm_topk_prob=True, use_sliding_window=False, sliding_window=None),
    "mixtral": dict(sliding_window=None),
}
_PRESET: dict[str, dict[str, int]] = {
    "tiny": dict(vocab_size=0, max_position_embeddings=512),  # 0: the tokenizer's, rounded up
    "bench": dict(vocab_size=8192, max_position_embeddings=4096),
}


def _check(arch: str, preset: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: pick one of {', '.join(ARCHS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: pick one of {', '.join(PRESETS)}")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train the byte-level BPE (`TOKENIZER_VOCAB` ids, specials first) on the embedded corpus.

    Deterministic: the same corpus and library version give the same tokenizer.json. No bos is
    added automatically, so `decode(encode(text)) == text` for any UTF-8 text.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[BOS, EOS, PAD, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(
    arch: str,
    preset: str = "tiny",
    overrides: dict[str, Any] | None = None,
    *,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> PretrainedConfig:
    """The transformers config of `arch` at `preset`, with `overrides` (config kwargs) applied.

    vocab_size and the bos/eos/pad ids follow `tokenizer` (default: `build_tokenizer()`).
    """
    _check(arch, preset)
    tok = tokenizer or build_tokenizer()
    config_cls, _ = _CLASSES[arch]
    kwargs: dict[str, Any] = {**_PRESET[preset], **_COMMON[arch], **_SHAPES[(arch, preset)]}
    kwargs["vocab_size"] = max(kwargs["vocab_size"], math.ceil(len(tok) / 64) * 64)
    kwargs.update(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    unknown = [k for k in overrides or {} if not hasattr(config_cls(), k)]
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no field(s) {unknown}: fix the overrides")
    kwargs.update(overrides or {})
    config = config_cls(**kwargs)
    if config.vocab_size < len(tok):
        raise ValueError(f"vocab_size {config.vocab_size} < tokenizer size {len(tok)}: raise it")
    return config


def param_count(arch: str, preset: str = "tiny", overrides: dict[str, Any] | None = None) -> int:
    """Number of parameters, counted on the meta device (no memory, no init)."""
    config = build_config(arch, preset, overrides)
    with torch.device("meta"):
        model = _CLASSES[arch][1](config)
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _make_routing_decisive(model: PreTrainedModel, logit_std: float, seed: int) -> None:
    """Rescale each router so its logits on unit-RMS inputs have std `logit_std`.

    The router input is RMS-normed (entries ~1), so logit std = std(W) * sqrt(H).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if not name.endswith("mlp.gate"):  # the MoE router of every arch; dense layers have none
            continue
        weight = module.weight  # [E, H]
        weight.mul_(logit_std / (weight.std() * math.sqrt(weight.shape[1])))
        bias = getattr(module, "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, generator=gen) * E_SCORE_BIAS_STD)


def make_tiny(
    arch: str,
    out: str | Path,
    *,
    seed: int = 0,
    preset: str = "tiny",
    overrides: dict[str, Any] | None = None,
    tokenizer: bool = True,
) -> Path:
    """Write a random `arch` checkpoint at `preset` size to `out` and return `out` as a Path.

    Same (arch, seed, preset, overrides) -> byte-identical model.safetensors. `overrides` are
    config kwargs applied last, e.g. {"q_lora_rank": None} or {"rope_parameters": {...}}.
    With `tokenizer=False` only the model files are written (vocab_size is unchanged).
    """
    _check(arch, preset)
    out = Path(out)
    tok = build_tokenizer()
    config = build_config(arch, preset, overrides, tokenizer=tok)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = _CLASSES[arch][1](config).float().eval()  # fp32 whatever the default dtype
    _make_routing_decisive(model, ROUTER_LOGIT_STD[arch], seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer:
        tok.model_max_length = config.max_position_embeddings
        tok.save_pretrained(out)
    return out
