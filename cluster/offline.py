"""`moe-cluster offline`: run prompts through one engine with continuous batching.

Input: repeated --prompt / --prompt-ids flags and/or a JSONL file whose lines hold exactly one of
`prompt` or `prompt_token_ids` plus optional sampling overrides. Every prompt is validated before
any runs, so a bad line fails the call without partial work.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.engine import InvalidRequestError, RequestOutput, SamplingParams

__all__ = ["OfflinePrompt", "parse_prompt_ids", "read_jsonl", "result_json", "run_offline"]


class OfflinePrompt(BaseModel):
    """One line of an --input JSONL file."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(None, description="prompt text (needs tokenizer files)")
    prompt_token_ids: list[int] | None = Field(None, description="prompt as token ids")
    max_tokens: int | None = Field(None, description="overrides --max-tokens for this line")
    temperature: float | None = Field(None, description="overrides --temperature")
    top_p: float | None = Field(None, description="overrides --top-p")
    top_k: int | None = Field(None, description="overrides --top-k")
    seed: int | None = Field(None, description="overrides --seed")
    stop: list[str] | None = Field(None, description="stop strings")
    ignore_eos: bool | None = Field(None, description="overrides --ignore-eos")


@dataclass(frozen=True)
class PromptSpec:
    source: str  # where it came from, for error messages ("--prompt #2", "input.jsonl:3")
    prompt: str | Sequence[int]
    params: SamplingParams


def parse_prompt_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InvalidRequestError(
            "prompt_token_ids", f"{text!r} is not a comma-separated list of integers, e.g. 1,2,3"
        ) from None


def read_jsonl(path: Path, base: SamplingParams) -> list[PromptSpec]:
    if not path.exists():
        raise InvalidRequestError("input", f"{path} does not exist")
    specs = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            item = OfflinePrompt.model_validate_json(line)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or "line"
            raise InvalidRequestError(f"{where}: {loc}", err["msg"]) from None
        if (item.prompt is None) == (item.prompt_token_ids is None):
            raise InvalidRequestError(where, "give exactly one of prompt or prompt_token_ids")
        overrides = {
            k: v
            for k, v in item.model_dump(exclude={"prompt", "prompt_token_ids"}).items()
            if v is not None
        }
        if "stop" in overrides:
            overrides["stop"] = tuple(overrides["stop"])
        prompt = item.prompt if item.prompt is not None else item.prompt_token_ids
        specs.append(PromptSpec(where, prompt or "", replace(base, **overrides)))
    return specs


def run_offline(engine, specs: Sequence[PromptSpec]) -> list[RequestOutput]:
    """Validate every prompt, then run them all together."""
    for spec in specs:
        try:
            if isinstance(spec.prompt, str):
                engine.encode(spec.prompt, None)
            else:
                engine.encode(None, spec.prompt)
            spec.params.validate(engine.vocab_size)
        except InvalidRequestError as e:
            raise InvalidRequestError(e.field, f"{spec.source}: {e}") from None
    return engine.generate([(s.prompt, s.params) for s in specs])


def result_json(out: RequestOutput) -> str:
    return json.dumps(
        {
            "prompt_token_ids": out.prompt_token_ids,
            "token_ids": out.token_ids,
            "text": out.text,
            "finish_reason": out.finish_reason,
        },
        ensure_ascii=False,
    )
