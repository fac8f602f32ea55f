"""The engine's tokenizer.json path (no transformers) against transformers' tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from workers.engine.build import engine_tokenizer, load_tokenizer
from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.tokenizer import TokenizerJson, plain_tokenizer_json

TEXTS = [
    "Once upon a time",
    "  leading spaces, trailing  ",
    "multi-byte: héllo wörld — 日本語 🙂 ok",
    "</s> and <s> as text, <pad>",
    "line\nbreaks\tand tabs",
    "",
]


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_same_ids_text_and_eos_as_transformers(name, tiny_checkpoint):
    path = tiny_checkpoint(name)
    assert plain_tokenizer_json(path)
    ours, theirs = engine_tokenizer(path), load_tokenizer(path)
    assert isinstance(ours, TokenizerJson)
    assert ours.eos_token_id == theirs.eos_token_id is not None
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        with_specials = ids + [theirs.eos_token_id] + ids
        for skip in (True, False):
            assert ours.decode(with_specials, skip_special_tokens=skip) == theirs.decode(
                with_specials, skip_special_tokens=skip
            )
    gen = torch.Generator().manual_seed(3)
    noise = torch.randint(0, theirs.vocab_size, (300,), generator=gen).tolist()
    assert ours.decode(noise, skip_special_tokens=True) == theirs.decode(
        noise, skip_special_tokens=True
    )
    stream = ours.encode(TEXTS[2], add_special_tokens=False)  # streamed one token at a time
    a, b = IncrementalDetokenizer(ours, []), IncrementalDetokenizer(theirs, [])
    assert [a.add(t) for t in stream] == [b.add(t) for t in stream]
    a, b = IncrementalDetokenizer(ours, noise[:3]), IncrementalDetokenizer(theirs, noise[:3])
    assert [a.add(t) for t in noise[3:]] == [b.add(t) for t in noise[3:]]


@pytest.mark.parametrize(
    "change",
    [
        {"tokenizer_class": "LlamaTokenizerFast"},
        {"clean_up_tokenization_spaces": True},
        {"add_prefix_space": True},
        {"legacy": True},
    ],
)
def test_other_tokenizers_load_through_transformers(change, tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen3_moe")
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(src / f, tmp_path / f)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, **change}))
    assert not plain_tokenizer_json(tmp_path)
    assert not isinstance(engine_tokenizer(tmp_path), TokenizerJson)


def test_no_tokenizer_files(tmp_path):
    assert not plain_tokenizer_json(tmp_path)
    assert engine_tokenizer(tmp_path) is None
