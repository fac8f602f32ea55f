"""Build a model from a local Hugging Face checkpoint directory, reading only this rank's tensors.

    model = load_model("/models/Qwen3-30B-A3B", dtype=torch.bfloat16, owned_experts=[0, 1, 2])

The directory holds `config.json` and `model.safetensors` or shards listed by
`model.safetensors.index.json`. Tensors are read one at a time from memory-mapped files, so a
rank touches only the bytes of the experts it owns and peak memory stays near the model's size.
Routed experts may be stored per expert (`...experts.{e}.gate_proj.weight`) or fused
(`...experts.gate_up_proj` [E, 2I, H], gate rows first; `...experts.down_proj` [E, H, I]).
FP8 weights with a `<name>_scale_inv` companion (DeepSeek-V3 block layout) are dequantized.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from workers.models import model_class
from workers.models.base import CausalLM
from workers.models.config import ModelConfig, read_config
from workers.moe.placement import Placement

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "dequantize_fp8_blocks",
    "load_config",
    "load_model",
]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# a per-expert weight that a fused checkpoint stores inside `{prefix}.gate_up_proj`/`down_proj`
_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")
_FUSED = {  # projection -> (fused tensor, which half of its rows; None: all rows)
    "gate_proj": ("gate_up_proj", 0), "w1": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1), "w3": ("gate_up_proj", 1),
    "down_proj": ("down_proj", None), "w2": ("down_proj", None),
}  # fmt: skip


class CheckpointError(ValueError):
    """The checkpoint directory does not hold what the model needs."""


def load_config(model_dir: str | Path) -> ModelConfig:
    """The config of a local checkpoint directory: the fields transformers' AutoConfig would
    give, read without importing transformers (workers/models/config.py)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: the model path must be a local Hugging Face checkpoint directory "
            "holding config.json and *.safetensors weights (e.g. `hf download <repo> "
            f"--local-dir {Path(model_dir)}`)"
        )
    return read_config(model_dir)


def dequantize_fp8_blocks(
    w: torch.Tensor, scale_inv: torch.Tensor, block: int | tuple[int, int] = 128
) -> torch.Tensor:
    """FP8 block dequantization: w [R, C] (fp8), scale_inv [ceil(R/br), ceil(C/bc)] -> [R, C] fp32.

    Element (r, c) is `w[r, c] * scale_inv[r // br, c // bc]`; edge blocks may be partial."""
    br, bc = (block, block) if isinstance(block, int) else block
    rows, cols = w.shape
    expected = (math.ceil(rows / br), math.ceil(cols / bc))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
            f"{rows}x{cols} weight in {br}x{bc} blocks"
        )
    scale = scale_inv.float().repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return w.float() * scale


@dataclass(frozen=True)
class _Source:
    """Where one wanted tensor lives: `key` in `file`, optionally one expert's rows of it."""

    file: str
    key: str
    expert: int | None = None  # index into a fused [E, ...] tensor
    rows: tuple[int, int] | None = None  # row range [r0, r1) of the (expert's) matrix


class CheckpointReader:
    """Reads named tensors, and only those, from a checkpoint directory's safetensors files.

    `tensors_read` and `bytes_read` count what was actually read (scale_inv bytes included)."""

    def __init__(self, model_dir: str | Path, fp8_block: tuple[int, int] = (128, 128)) -> None:
        self.model_dir = Path(model_dir)
        self.fp8_block = fp8_block
        self.weight_map: dict[str, str] = self._index()  # tensor name -> file name
        self.tensors_read = 0
        self.bytes_read = 0
        self._handles: dict[str, Any] = {}  # file name -> open safe_open handle (mmap)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()

    def check(self, wanted: Mapping[str, tuple[int, ...]]) -> None:
        """Raise CheckpointError unless every wanted tensor exists with its shape (headers only)."""
        for name, shape in wanted.items():
            self._locate(name, tuple(shape))

    def read(
        self,
        wanted: Mapping[str, tuple[int, ...]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> dict[str, torch.Tensor]:
        """The wanted tensors ({name: expected shape}), cast to dtype on device. Everything is
        checked before anything is read."""
        sources = {name: self._locate(name, tuple(shape)) for name, shape in wanted.items()}
        out = {}
        for name, src in sources.items():
            out[name] = self._read(src).to(device=device, dtype=dtype)
            self.tensors_read += 1
        return out

    # --- internals -----------------------------------------------------------------------
    def _index(self) -> dict[str, str]:
        index = self.model_dir / INDEX
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (self.model_dir / f).is_file()})
            if missing:
                raise CheckpointError(
                    f"{index} lists shard files missing from {self.model_dir}: "
                    f"{_few(missing)}; the download is incomplete, download those files again"
                )
            return weight_map
        files = (
            [SINGLE]
            if (self.model_dir / SINGLE).is_file()
            else sorted(p.name for p in self.model_dir.glob("*.safetensors"))
        )
        if not files:
            raise CheckpointError(
                f"no {SINGLE} or {INDEX} in {self.model_dir}; the directory must hold the "
                "checkpoint's safetensors weights (.bin/.pt checkpoints are not supported)"
            )
        weight_map = {}
        for file in files:
            with safe_open(str(self.model_dir / file), framework="pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), file))
        return weight_map

    def _open(self, file: str) -> Any:
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.model_dir / file), framework="pt")
        return self._handles[file]

    def _shape(self, file: str, key: str) -> tuple[int, ...]:
        try:
            return tuple(self._open(file).get_slice(key).get_shape())
        except Exception as err:  # SafetensorError is not importable in every version
            raise CheckpointError(
                f"{self.model_dir / file} does not contain tensor {key} although the index maps "
                f"it there ({err}); the shard is corrupt or from another revision, download it "
                "again"
            ) from err

    def _locate(self, name: str, shape: tuple[int, ...]) -> _Source:
        if name in self.weight_map:
            file = self.weight_map[name]
            found = self._shape(file, name)
            if found != shape:
                raise self._shape_error(file, name, found, shape)
            return _Source(file, name)
        match = _EXPERT.match(name)
        if match and match["proj"] in _FUSED and len(shape) == 2:
            fused, half = _FUSED[match["proj"]]
            key, expert = f"{match['prefix']}.{fused}", int(match["e"])
            if key in self.weight_map:
                file = self.weight_map[key]
                found = self._shape(file, key)
                rows, cols = shape
                want = (2 * rows, cols) if half is not None else (rows, cols)
                if len(found) != 3 or found[1:] != want or expert >= found[0]:
                    raise self._shape_error(file, key, found, (f">{expert}", *want), name)
                span = None if half is None else (half * rows, (half + 1) * rows)
                return _Source(file, key, expert, span)
        raise CheckpointError(
            f"tensor {name} is not in any of {_few(sorted(set(self.weight_map.values())))} in "
            f"{self.model_dir}; config.json does not describe these weights (wrong architecture "
            "or sizes) or the checkpoint is incomplete"
        )

    def _shape_error(
        self, file: str, key: str, found: Sequence, expected: Sequence, name: str | None = None
    ) -> CheckpointError:
        what = f"tensor {key}" + (f" (holding {name})" if name else "")
        return CheckpointError(
            f"{self.model_dir / file}: {what} has shape {list(found)} but the model expects "
            f"{list(expected)}; config.json does not match these weights (check hidden_size, "
            "intermediate sizes, head and expert counts)"
        )

    def _read(self, src: _Source) -> torch.Tensor:
        sl = self._open(src.file).get_slice(src.key)
        lead = () if src.expert is None else (src.expert,)
        num_rows = sl.get_shape()[len(lead)]
        r0, r1 = src.rows or (0, num_rows)
        fp8 = sl.get_dtype().startswith("F8")
        br, bc = self.fp8_block
        # fp8: read whole row blocks so each row lines up with its scale row
        a0, a1 = (r0 // br * br, min(-(-r1 // br) * br, num_rows)) if fp8 else (r0, r1)
        w = sl[(*lead, slice(a0, a1))]
        self.bytes_read += w.numel() * w.element_size()
        if not fp8:
            return w
        scale_key = f"{src.key}_scale_inv"
        if scale_key not in self.weight_map:
            raise CheckpointError(
                f"{self.model_dir / src.file}: {src.key} is stored as fp8 but {scale_key} is "
                "missing; fp8 weights need their per-block scales, download the full checkpoint"
            )
        scales = self._open(self.weight_map[scale_key]).get_slice(scale_key)
        s = scales[(*lead, slice(a0 // br, -(-a1 // br)))]
        self.bytes_read += s.numel() * s.element_size()
        try:
            return dequantize_fp8_blocks(w, s, (br, bc))[r0 - a0 : r1 - a0]
        except ValueError as err:
            raise CheckpointError(
                f"{self.model_dir / src.file}: {scale_key} does not fit {src.key}: {err}; check "
                "quantization_config.weight_block_size in config.json"
            ) from err


def _few(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


class _Streamed(Mapping[str, torch.Tensor]):
    """The model's tensors, each read from disk only when `load_checkpoint` asks for it."""

    def __init__(self, wanted: Mapping[str, tuple[int, ...]], fetch: Callable) -> None:
        self.wanted, self.fetch = wanted, fetch

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.wanted:
            raise KeyError(name)
        return self.fetch(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.wanted)

    def __len__(self) -> int:
        return len(self.wanted)


def load_model(
    model_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    owned_experts: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    shard: tuple[Placement, int] | None = None,
) -> CausalLM:
    """Construct the checkpoint's model family holding `owned_experts` (None: all), fill it from
    the checkpoint and return it in eval mode on `device`. `shard` (placement, rank) instead
    holds that rank's physical expert slots, redundant copies included. Raises
    UnsupportedArchitectureError or CheckpointError (before reading any weight) when the
    checkpoint cannot be served."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    config = load_config(model_dir)
    cls = model_class(config)
    with torch.device(device), _default_dtype(dtype):
        model: CausalLM = cls(config, owned_experts)
        if shard is not None:
            model.set_placement(*shard)
    model.to(dtype)
    wanted = model.checkpoint_tensors()
    show = sys.stderr.isatty() if progress is None else progress
    label = f"Loading {Path(model_dir).name}"
    bar = tqdm(total=len(wanted), desc=label, unit="tensor", disable=not show)
    with CheckpointReader(model_dir, _fp8_block(config)) as reader, bar:
        reader.check(wanted)
        seen: set[str] = set()  # tied embeddings are asked for twice

        def fetch(name: str) -> torch.Tensor:
            bar.update(name not in seen)
            seen.add(name)
            return reader.read({name: wanted[name]}, dtype, device)[name]

        model.load_checkpoint(_Streamed(wanted, fetch))
    return model.eval()


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Parameters are created in the target dtype so a bf16 model never exists in fp32 (2x peak
    # memory). Process-wide while it lasts: nothing else should create tensors during a load.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _fp8_block(config) -> tuple[int, int]:
    quant = getattr(config, "quantization_config", None) or {}
    block = quant.get("weight_block_size") if isinstance(quant, dict) else None
    block = block or getattr(quant, "weight_block_size", None) or (128, 128)
    return int(block[0]), int(block[1])
