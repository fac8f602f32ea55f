"""`ClusterConfig`: the one schema behind `build_app(args)`, the Serve YAML `args`, the RayService
`serveConfigV2` app args and the `moe-cluster serve` flags.

Every failure is a `ConfigError` listing each problem as `field.path: what is wrong and the fix`,
one per line, because people read it at the CLI, in Serve deploy logs and in KubeRay status.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from router.requests import MAX_STREAM_INTERVAL
from workers.moe.dispatch import Transport

__all__ = ["ClusterConfig", "ConfigError", "json_schema"]

# flat CLI names -> field paths; `with_overrides` and `from_args` also take dotted paths
OVERRIDES = {
    "model": "model.path",
    "dtype": "model.dtype",
    "prefill_gangs": "prefill.num_gangs",
    "prefill_gang_size": "prefill.gang_size",
    "decode_gangs": "decode.num_gangs",
    "decode_gang_size": "decode.gang_size",
    "port": "router.port",
    "http_port": "router.http_port",
    "prefix_caching": "prefix_caching",
    "core_turns": "core_turns",
}
_SECRET_FIELDS = {"auth_tokens"}  # never echoed back in an error
_BOUNDS = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than_equal": "<= {le}"}


class ConfigError(ValueError):
    """A bad cluster config; `problems` holds `(field.path, message)` pairs for callers that
    want to rename paths (the CLI maps them back to its flags)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("invalid cluster config:\n" + "\n".join(f"{p}: {m}" for p, m in problems))

    @classmethod
    def from_validation(cls, err: ValidationError) -> ConfigError:
        return cls([_describe(e) for e in err.errors()])


class _Invalid(ValueError):
    """A cross-field problem raised by a model validator, reported at `field` under the model."""

    def __init__(self, field: str, msg: str) -> None:
        super().__init__(msg)
        self.field = field


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Schema):
    path: str = Field(description="HF checkpoint directory (config.json, *.safetensors, tokenizer)")
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="weights and activations; float32 on CPU, bfloat16 on GPU"
    )
    max_model_len: int | None = Field(
        default=None, gt=0, description="prompt + output tokens; None: the model's max positions"
    )
    served_name: str | None = Field(
        default=None,
        min_length=1,
        description="the model id of the OpenAI API (`model` in requests, GET /v1/models); "
        "None: the checkpoint directory's name",
    )

    @property
    def name(self) -> str:
        """The id clients name the model by."""
        return self.served_name or (Path(self.path).name or self.path)


class _Autoscaling(_Schema):
    min_gangs: int = Field(default=1, ge=1, description="fewest gangs autoscaling keeps")
    max_gangs: int = Field(default=1, ge=1, description="most gangs autoscaling starts")
    upscale_delay_s: float = Field(
        default=5.0, ge=0, description="how long more gangs must be wanted before one starts"
    )
    downscale_delay_s: float = Field(
        default=120.0, ge=0, description="how long fewer gangs must be wanted before one goes"
    )

    @model_validator(mode="after")
    def _ordered(self) -> _Autoscaling:
        if self.min_gangs > self.max_gangs:
            raise _Invalid(
                "max_gangs",
                f"{self.max_gangs} is below min_gangs ({self.min_gangs}); "
                "raise max_gangs or lower min_gangs",
            )
        return self


class PrefillAutoscaling(_Autoscaling):
    target_queued_prompt_tokens: int = Field(
        default=2048, gt=0, description="queued prompt tokens per rank that autoscaling aims at"
    )


class DecodeAutoscaling(_Autoscaling):
    target_kv_usage: float = Field(
        default=0.8, gt=0, le=1, description="KV cache usage per rank (0..1] autoscaling aims at"
    )


class _Stage(_Schema):
    gang_size: int = Field(default=2, ge=1, description="ranks per gang = expert-parallel size")
    num_gangs: int = Field(default=1, ge=1, description="gangs to run (initial with autoscaling)")
    placement_strategy: Literal["PACK", "SPREAD"] = Field(
        default="PACK", description="PACK a gang onto few nodes or SPREAD it across nodes"
    )
    num_cpus_per_rank: float = Field(default=0.1, ge=0, description="CPUs Ray reserves per rank")
    num_gpus_per_rank: float = Field(default=0.0, ge=0, description="1 on GPU nodes, 0 on CPU")
    kv_cache_bytes: int = Field(
        default=512 << 20, gt=0, description="KV memory per rank (decode: unless kv_blocks is set)"
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="intra-op threads per rank; None: int(num_cpus_per_rank), >= 1",
    )
    dispatch_transport: Transport = Field(
        default="auto",
        description="how a CPU gang's ranks move MoE rows: 'auto'/'shm' through shared memory "
        "when they share a host (x86-64 Linux; gloo otherwise), 'collective' always through "
        "gloo; GPU gangs use NCCL whatever this says",
    )
    collective_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a gang collective (the per-step work flag, each MoE layer's all-to-all) "
        "that waits longer than this fails the gang (a stuck peer; a dead one fails it at once): "
        "its requests migrate and Serve replaces the gang. Must exceed one layer's compute on "
        "the busiest rank",
    )
    niceness: int = Field(
        default=15,
        ge=0,
        le=19,
        description="nice value of each rank's process, all its threads (Linux): above the "
        "serving plane's 0 (RAY_worker_niceness), so a waking Router gets the cores it shares "
        "with computing ranks at once; 15 is where Ray starts every worker. Below 15 needs "
        "Ray's workers started at nice 0 (as RAY_ENV does) or CAP_SYS_NICE",
    )
    autoscaling: _Autoscaling | None = Field(default=None, description="None: fixed num_gangs")

    @property
    def num_replicas(self) -> int:
        """Serve replicas (= ranks): Serve scales in whole gangs, so a multiple of gang_size."""
        return self.gang_size * self.num_gangs

    @model_validator(mode="after")
    def _rank_needs_a_resource(self) -> _Stage:
        if self.num_cpus_per_rank == 0 and self.num_gpus_per_rank == 0:
            raise _Invalid(
                "num_cpus_per_rank",
                "0 together with num_gpus_per_rank 0 leaves a gang's placement group empty, "
                "which Ray cannot schedule; set a small fraction such as 0.01",
            )
        return self

    @model_validator(mode="after")
    def _gangs_within_autoscaling(self) -> _Stage:
        a = self.autoscaling
        if a is not None and not a.min_gangs <= self.num_gangs <= a.max_gangs:
            raise _Invalid(
                "num_gangs",
                f"{self.num_gangs} is outside autoscaling [{a.min_gangs}, {a.max_gangs}]; "
                "pick a value in that range or change autoscaling.min_gangs/max_gangs",
            )
        return self


class PrefillConfig(_Stage):
    step_token_budget: int = Field(
        default=2048, gt=0, description="tokens one engine step computes (max_num_batched_tokens)"
    )
    max_prefill_chunk: int = Field(
        default=512,
        gt=0,
        description="most tokens of one prompt computed in a step while other prompts wait, so "
        "a long prompt never holds back the first tokens of the short ones behind it",
    )
    autoscaling: PrefillAutoscaling | None = Field(
        default=None, description="scale gangs on queued prompt tokens; None: fixed num_gangs"
    )


class DecodeConfig(_Stage):
    max_running_requests: int = Field(default=256, gt=0, description="requests decoding per rank")
    kv_blocks: int | None = Field(
        default=None, gt=0, description="KV blocks per rank; None: what fits in kv_cache_bytes"
    )
    block_size: int = Field(default=16, gt=0, description="tokens per KV block")
    autoscaling: DecodeAutoscaling | None = Field(
        default=None, description="scale gangs on KV usage; None: fixed num_gangs"
    )


class RouterConfig(_Schema):
    port: int = Field(default=9000, ge=1, le=65535, description="gRPC port the Router serves")
    http_port: int | None = Field(
        default=8000,
        ge=1,
        le=65535,
        description="port of the OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models), served by the Router replicas or by Serve's HTTP "
        "proxy (see http_server); null: no HTTP API",
    )
    http_server: Literal["auto", "serve", "router"] = Field(
        default="auto",
        description="who serves router.http_port: `router`, the Router replicas themselves, "
        "like gRPC (no proxy hop: ~6x less CPU per streamed token; Serve's HTTP proxy must "
        "use another port or none); `serve`, Serve's HTTP proxy, handing each request to a "
        "Router replica (its http_options.port must be router.http_port; KubeRay's serve "
        "Service); `auto`: the Router's own server unless Serve's HTTP proxy listens on "
        "router.http_port (`serve run`, a RayService), then the proxy",
    )
    auth_tokens: list[str] = Field(
        default_factory=list,
        repr=False,  # secrets stay out of logs
        description="accepted `authorization: Bearer <token>` values; empty: auth off",
    )
    max_queued_requests: int = Field(default=1024, gt=0, description="queue bound, then rejects")
    max_prompt_tokens: int | None = Field(
        default=None, gt=0, description="longest prompt accepted; None: the model's context"
    )
    max_prompt_bytes: int = Field(
        default=1 << 20,
        gt=0,
        description="UTF-8 bytes of a text prompt, checked before tokenizing (INVALID_ARGUMENT "
        "beyond); the gRPC message limit is set above it",
    )
    max_migrations: int = Field(
        default=3,
        ge=0,
        description="times one request may be moved to another rank after losing its rank; "
        "then UNAVAILABLE",
    )
    rank_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a rank whose channel is silent this long (it heartbeats every 0.25 s) is "
        "treated as dead and its requests migrate",
    )
    drain_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="on SIGTERM, scale-down or Drain: seconds in-flight requests may take to "
        "finish before they are migrated to other ranks or ended with UNAVAILABLE",
    )
    stream_interval: int = Field(
        default=1,
        ge=1,
        le=MAX_STREAM_INTERVAL,
        description="tokens per streamed message when a request does not set "
        "sampling.stream_interval (the first token and the last message are always sent at once)",
    )
    prefill_policy: Literal["cache_aware", "least_loaded"] = Field(
        default="cache_aware",
        description="cache_aware: the prefill rank with the least work before the prompt's "
        "first token, its cached prefix of the prompt taken off (queued + prompt - cached "
        "tokens); least_loaded: the fewest queued prompt tokens, caches ignored",
    )
    max_stop_strings: int = Field(default=16, ge=0, description="stop strings per request")
    max_stop_string_chars: int = Field(default=256, gt=0, description="characters per stop string")
    request_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="seconds before a Generate call is stopped; a rank being scaled away waits "
        "this long (+30 s) for its in-flight requests",
    )

    @property
    def http_via_serve(self) -> bool:
        """The Router may be Serve's HTTP ingress (the proxy may carry the OpenAI API to it)."""
        return self.http_port is not None and self.http_server != "router"

    @property
    def starts_serve_proxy(self) -> bool:
        """`moe-cluster serve` starts Serve's HTTP proxy on router.http_port (else none)."""
        return self.http_port is not None and self.http_server == "serve"

    def serves_http_itself(self, serve_proxy_port: int | None) -> bool:
        """Whether the Router replicas serve router.http_port themselves, Serve's HTTP proxy
        listening on `serve_proxy_port` (None: no proxy)."""
        if self.http_port is None or self.http_server == "serve":
            return False
        return self.http_server == "router" or serve_proxy_port != self.http_port

    def http_port_clash(self, serve_proxy_port: int | None) -> str | None:
        """The sentence to fail with when the Router would serve router.http_port itself on the
        port Serve's HTTP proxy listens on (`serve_proxy_port`, None: no proxy): both set
        SO_REUSEPORT, so the kernel would silently split the connections between them."""
        if self.http_server != "router" or serve_proxy_port != self.http_port:
            return None
        return (
            f"router.http_port {self.http_port} is also the port of Serve's HTTP proxy: with "
            "router.http_server: router give the proxy another port (http_options.port) or "
            "none (proxy_location: Disabled), or set router.http_server: serve"
        )

    @property
    def max_message_bytes(self) -> int:
        """Bytes one gRPC message may have: far above max_prompt_bytes (a big prompt gets the
        router's INVALID_ARGUMENT naming `prompt`), far below gRPC's 2 GiB."""
        return 16 * self.max_prompt_bytes + (1 << 20)

    @field_validator("auth_tokens")
    @classmethod
    def _no_empty_tokens(cls, tokens: list[str]) -> list[str]:
        if bad := [i for i, t in enumerate(tokens) if not t.strip()]:
            raise ValueError(f"entries {bad} are empty; remove them or set non-empty secrets")
        return tokens


class ClusterConfig(_Schema):
    """The whole cluster; the default is the embedded CPU shape (2 + 2 ranks, one gang each)."""

    model: ModelConfig = Field(description="the checkpoint to serve; needs at least `path`")
    prefill: PrefillConfig = Field(default_factory=PrefillConfig, description="prefill ranks")
    decode: DecodeConfig = Field(default_factory=DecodeConfig, description="decode ranks")
    router: RouterConfig = Field(default_factory=RouterConfig, description="the gRPC front door")
    prefix_caching: bool = Field(
        default=True,
        description="every rank keeps the KV of full prompt blocks it computed and reuses it for "
        "later prompts with the same prefix (and the router prefers prefill ranks that hold a "
        "prompt's prefix); false: every prompt is computed in full",
    )
    core_turns: bool | None = Field(
        default=None,
        description="the gangs on one node take turns at its cores, one engine step at a time, "
        "instead of stepping at once and oversubscribing them (for CPU nodes where prefill and "
        "decode ranks share the cores); null: on for CPU ranks (num_gpus_per_rank 0), off for "
        "GPU ranks, which own their devices",
    )

    def takes_core_turns(self, stage: str) -> bool:
        """Whether the ranks of `stage` step under their node's turn (`core_turns`)."""
        if self.core_turns is not None:
            return self.core_turns
        stage_cfg: _Stage = getattr(self, stage)
        return stage_cfg.num_gpus_per_rank == 0

    @classmethod
    def from_args(
        cls, args: dict[str, Any] | ClusterConfig | None = None, **flat: Any
    ) -> ClusterConfig:
        """Validate Serve app args (nested dict; dotted keys like `prefill.num_gangs` also work,
        as `serve run cluster.app:build_app model.path=DIR` passes them), then `flat` overrides
        (CLI names from OVERRIDES or dotted paths; None values are skipped)."""
        if isinstance(args, ClusterConfig):
            if not flat:
                return args
            args = args.to_args()
        if args is not None and not isinstance(args, dict):
            raise ConfigError([("args", f"expected a mapping, got {type(args).__name__}")])
        raw: dict[str, Any] = {}
        for key, value in (args or {}).items():
            _set(raw, str(key), value)
        for key, value in flat.items():
            if value is not None:
                _set(raw, _override_path(key), value)
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise ConfigError.from_validation(e) from None

    @classmethod
    def from_yaml(cls, path: str | Path, **flat: Any) -> ClusterConfig:
        """Load a YAML file holding the same dict as the Serve `args`; `flat` as in from_args."""
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError([(str(path), f"cannot read it ({e.strerror})")]) from None
        except yaml.YAMLError as e:
            raise ConfigError([(str(path), f"not valid YAML: {e}")]) from None
        if not isinstance(data, dict | None):
            kind = type(data).__name__
            raise ConfigError([(str(path), f"must hold a mapping of config keys, not a {kind}")])
        return cls.from_args(data, **flat)

    def to_args(self) -> dict[str, Any]:
        """JSON-able nested dict; `from_args(cfg.to_args()) == cfg`."""
        return self.model_dump(mode="json")

    def with_overrides(self, **flat: Any) -> ClusterConfig:
        """A copy with CLI-style overrides (e.g. prefill_gangs=2, port=9001), validated again."""
        return ClusterConfig.from_args(self.to_args(), **flat)


def json_schema() -> dict[str, Any]:
    """The JSON schema of ClusterConfig, for docs and for validating manifests' app args."""
    return ClusterConfig.model_json_schema()


def _override_path(key: str) -> str:
    if key in OVERRIDES or "." in key:
        return OVERRIDES.get(key, key)
    known = ", ".join(OVERRIDES)
    raise ConfigError([(key, f"unknown override; use one of {known} or a dotted field path")])


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted path in `raw`, copying dicts on the way so the caller's args stay as given."""
    *parents, leaf = dotted.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.get(part, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ConfigError([(where, f"is {child!r}, so {dotted} cannot be set inside it")])
        node[part] = dict(child)
        node = node[part]
    node[leaf] = value


def _fields_at(loc: tuple[int | str, ...]) -> dict[str, Any]:
    """The pydantic fields of the model at `loc` (empty when loc is not a model)."""
    model: Any = ClusterConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return {}
        args = [a for a in get_args(field.annotation) if a is not type(None)]
        model = args[0] if args else field.annotation  # unwrap `X | None`
    return dict(getattr(model, "model_fields", {}))


def _describe(e: ErrorDetails) -> tuple[str, str]:
    loc = tuple(e["loc"])
    kind, ctx = e["type"], e.get("ctx") or {}
    error = ctx.get("error")
    if isinstance(error, _Invalid):
        loc += (error.field,)
    path = ".".join(str(p) for p in loc)
    name = str(loc[-1]) if loc else ""
    if kind == "missing":
        desc = _fields_at(loc[:-1]).get(name)
        return path, "is required; add it" + (f" ({desc.description})" if desc else "")
    if kind == "extra_forbidden":
        allowed = list(_fields_at(loc[:-1]))
        near = difflib.get_close_matches(name, allowed, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        return path, f"unknown key; {hint}allowed here: {', '.join(allowed)}"
    if kind == "value_error":
        return path or "args", str(error)
    msg = "must be " + _BOUNDS[kind].format(**ctx) if kind in _BOUNDS else e["msg"]
    msg = msg.replace("Input should be", "must be", 1)
    if not _SECRET_FIELDS.intersection(map(str, loc)):
        got = repr(e["input"])
        msg += f" (got {got[:60] + '...' if len(got) > 60 else got})"
    return path or "args", msg
