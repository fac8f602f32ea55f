"""ClusterConfig: defaults, round trips (args, JSON, YAML), overrides, errors people read."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from pydantic import BaseModel

from cluster.config import ClusterConfig, ConfigError, json_schema

MODEL = {"path": "/models/tiny"}


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """Overrides tests/cluster/conftest.py: these tests are pure and must not start Ray."""
    yield


def _error(args: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        ClusterConfig.from_args(args)
    return info.value


def test_defaults_are_the_embedded_cpu_shape():
    cfg = ClusterConfig.from_args({"model": MODEL})
    assert (cfg.prefill.gang_size, cfg.prefill.num_gangs, cfg.prefill.num_replicas) == (2, 1, 2)
    assert (cfg.decode.gang_size, cfg.decode.num_gangs, cfg.decode.num_replicas) == (2, 1, 2)
    assert cfg.model.dtype == "float32" and cfg.model.max_model_len is None
    assert cfg.prefill.num_gpus_per_rank == 0 and 0 < cfg.prefill.num_cpus_per_rank < 1
    assert cfg.prefill.autoscaling is None and cfg.decode.kv_blocks is None
    assert cfg.decode.block_size == 16
    assert cfg.router.port == 9000 and cfg.router.auth_tokens == []
    assert (cfg.router.max_stop_strings, cfg.router.max_stop_string_chars) == (16, 256)
    assert cfg.prefix_caching and cfg.router.prefill_policy == "cache_aware"


def test_the_routers_own_http_server_refuses_serves_proxy_port():
    direct = ClusterConfig.from_args({"model": MODEL, "router": {"http_server": "router"}})
    assert direct.router.http_port == 8000
    why = direct.router.http_port_clash(8000)
    assert why is not None and "router.http_port 8000" in why and "http_options.port" in why
    assert direct.router.http_port_clash(8001) is None  # the proxy elsewhere
    assert direct.router.http_port_clash(None) is None  # no proxy
    behind_serve = ClusterConfig.from_args({"model": MODEL})
    assert behind_serve.router.http_port_clash(8000) is None  # Serve's proxy is the way in


def test_auto_http_serves_itself_unless_serves_proxy_holds_the_port():
    def router(**fields):
        return ClusterConfig.from_args({"model": MODEL, "router": fields}).router

    auto = router()
    assert auto.http_server == "auto" and not auto.starts_serve_proxy  # `moe-cluster serve`
    assert auto.serves_http_itself(None)  # no proxy: the Router's own server
    assert auto.serves_http_itself(8001)  # the proxy elsewhere
    assert not auto.serves_http_itself(8000)  # `serve run`, a RayService: the proxy carries it
    assert router(http_server="router").serves_http_itself(8001)
    via_serve = router(http_server="serve")
    assert via_serve.starts_serve_proxy and not via_serve.serves_http_itself(None)
    off = router(http_port=None)
    assert (
        not off.serves_http_itself(None) and not off.starts_serve_proxy and not off.http_via_serve
    )


def test_core_turns_default_to_cpu_ranks_only():
    cpu = ClusterConfig.from_args({"model": MODEL})
    gpu = ClusterConfig.from_args({"model": MODEL, "decode": {"num_gpus_per_rank": 1}})
    assert cpu.takes_core_turns("prefill") and cpu.takes_core_turns("decode")
    assert gpu.takes_core_turns("prefill") and not gpu.takes_core_turns("decode")
    off = cpu.with_overrides(core_turns=False)
    assert not off.takes_core_turns("prefill") and not off.takes_core_turns("decode")
    assert gpu.with_overrides(core_turns=True).takes_core_turns("decode")


def test_prefix_caching_off_reaches_every_rank_engine():
    from cluster.app import engine_config

    on = ClusterConfig.from_args({"model": MODEL})
    off = on.with_overrides(prefix_caching=False)
    for stage in ("prefill", "decode"):
        assert engine_config(on, stage).prefix_caching
        assert not engine_config(off, stage).prefix_caching
    with pytest.raises(ConfigError) as info:
        ClusterConfig.from_args({"model": MODEL, "router": {"prefill_policy": "random"}})
    assert [p for p, _ in info.value.problems] == ["router.prefill_policy"]


def _custom() -> ClusterConfig:
    return ClusterConfig.from_args(
        {
            "model": {"path": "/m", "dtype": "bfloat16", "max_model_len": 4096},
            "prefill": {
                "gang_size": 4,
                "num_gangs": 2,
                "placement_strategy": "SPREAD",
                "step_token_budget": 8192,
                "num_gpus_per_rank": 1,
                "autoscaling": {"min_gangs": 1, "max_gangs": 3, "target_queued_prompt_tokens": 99},
            },
            "decode": {
                "gang_size": 8,
                "kv_blocks": 1000,
                "autoscaling": {"min_gangs": 1, "max_gangs": 4, "target_kv_usage": 0.5},
            },
            "router": {"port": 9100, "auth_tokens": ["s3cret"], "request_timeout_s": 5},
        }
    )


def test_to_args_round_trips_through_json_and_from_args():
    cfg = _custom()
    args = json.loads(json.dumps(cfg.to_args()))  # JSON-able, as Serve and KubeRay carry it
    assert ClusterConfig.from_args(args) == cfg
    assert args["prefill"]["autoscaling"]["max_gangs"] == 3 and args["decode"]["gang_size"] == 8
    assert ClusterConfig.from_args(cfg) is cfg


def test_yaml_round_trip(tmp_path):
    cfg = _custom()
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg.to_args()))
    assert ClusterConfig.from_yaml(path) == cfg


def test_yaml_without_model_takes_it_from_a_flag(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("decode:\n  num_gangs: 2\n")
    cfg = ClusterConfig.from_yaml(path, model="/m", port=None)
    assert cfg.model.path == "/m" and cfg.decode.num_replicas == 4 and cfg.router.port == 9000


@pytest.mark.parametrize(
    "text, fix",
    [(None, "cannot read"), ("a: [1", "not valid YAML"), ("- 1\n- 2\n", "must hold a mapping")],
)
def test_bad_yaml_files_say_why(tmp_path, text, fix):
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=fix) as info:
        ClusterConfig.from_yaml(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "section, values, path, fix",
    [
        ("prefill", {"gang_size": -2}, "prefill.gang_size", "must be >= 1 (got -2)"),
        ("decode", {"num_gangs": 0}, "decode.num_gangs", "must be >= 1 (got 0)"),
        ("prefill", {"gang_sise": 2}, "prefill.gang_sise", "did you mean 'gang_size'?"),
        ("decode", {"placement_strategy": "spread"}, "decode.placement_strategy", "'SPREAD'"),
        ("router", {"port": 70000}, "router.port", "must be <= 65535 (got 70000)"),
        ("router", {"http_port": 0}, "router.http_port", "must be >= 1 (got 0)"),
        ("router", {"http_server": "proxy"}, "router.http_server", "'serve' or 'router'"),
        ("model", {"served_name": ""}, "model.served_name", "at least 1 character"),
        ("router", {"auth_tokens": ["ok", ""]}, "router.auth_tokens", "remove them"),
        (
            "prefill",
            {"autoscaling": {"min_gangs": 3, "max_gangs": 2}},
            "prefill.autoscaling.max_gangs",
            "below min_gangs (3)",
        ),
        (
            "decode",
            {"autoscaling": {"target_kv_usage": 1.5}},
            "decode.autoscaling.target_kv_usage",
            "must be <= 1",
        ),
        (
            "decode",
            {"num_gangs": 5, "autoscaling": {"min_gangs": 1, "max_gangs": 4}},
            "decode.num_gangs",
            "outside autoscaling [1, 4]",
        ),
        ("model", {"dtype": "fp8"}, "model.dtype", "must be 'float32' or 'bfloat16' (got 'fp8')"),
        ("decode", {"niceness": 20}, "decode.niceness", "must be <= 19 (got 20)"),
        ("prefill", {"niceness": -5}, "prefill.niceness", "must be >= 0 (got -5)"),
        (
            "decode",
            {"dispatch_transport": "nccl"},
            "decode.dispatch_transport",
            "must be 'auto', 'shm' or 'collective' (got 'nccl')",
        ),
    ],
)
def test_bad_input_names_the_field_and_the_fix(section, values, path, fix):
    args = {"model": dict(MODEL)}
    args[section] = {**args.get(section, {}), **values}
    err = _error(args)
    assert [p for p, _ in err.problems] == [path]
    line = str(err).splitlines()[1]
    assert line.startswith(f"{path}: ") and fix in line, line


def test_every_problem_is_listed_on_its_own_line_without_a_pydantic_dump():
    err = _error(
        {
            "prefill": {"gang_size": 0, "num_gangs": "two"},
            "router": {"port": 0},
            "extra": 1,
        }
    )
    lines = str(err).splitlines()
    assert lines[0] == "invalid cluster config:"
    assert {line.split(":")[0] for line in lines[1:]} == {
        "model",
        "prefill.gang_size",
        "prefill.num_gangs",
        "router.port",
        "extra",
    }
    assert "model: is required" in str(err) and "unknown key" in str(err)
    for dump in ("validation error", "errors.pydantic.dev", "type=", "Input should"):
        assert dump not in str(err)


def test_secrets_stay_out_of_errors_and_repr():
    err = _error({"model": MODEL, "router": {"auth_tokens": "hunter2"}})
    assert "router.auth_tokens" in str(err) and "hunter2" not in str(err)
    cfg = ClusterConfig.from_args({"model": MODEL, "router": {"auth_tokens": ["hunter2"]}})
    assert "hunter2" not in repr(cfg) and cfg.to_args()["router"]["auth_tokens"] == ["hunter2"]


def test_missing_or_non_mapping_args():
    assert [p for p, _ in _error({}).problems] == ["model"]
    with pytest.raises(ConfigError, match="model: is required"):
        ClusterConfig.from_args(None)
    with pytest.raises(ConfigError, match="args: expected a mapping, got list"):
        ClusterConfig.from_args([1, 2])  # type: ignore[arg-type]


def test_with_overrides_applies_cli_flags_and_validates():
    cfg = ClusterConfig.from_args({"model": MODEL})
    new = cfg.with_overrides(prefill_gangs=2, prefill_gang_size=3, decode_gang_size=4, port=9001)
    assert (new.prefill.num_gangs, new.prefill.gang_size, new.prefill.num_replicas) == (2, 3, 6)
    assert (new.decode.gang_size, new.decode.num_replicas, new.router.port) == (4, 4, 9001)
    assert cfg.prefill.num_gangs == 1  # the original is untouched (configs are frozen)
    assert cfg.with_overrides(decode_gangs=None) == cfg  # unset CLI flags change nothing
    with pytest.raises(ConfigError) as info:
        cfg.with_overrides(decode_gangs=0, port=70000)
    assert [p for p, _ in info.value.problems] == ["decode.num_gangs", "router.port"]
    with pytest.raises(ConfigError, match="prefill_gnags: unknown override; use one of"):
        cfg.with_overrides(prefill_gnags=2)


def test_the_http_api_port_and_model_name():
    cfg = ClusterConfig.from_args({"model": {"path": "/models/tiny-qwen/"}})
    assert cfg.router.http_port == 8000 and cfg.model.name == "tiny-qwen"
    assert cfg.with_overrides(http_port=8123).router.http_port == 8123
    off = ClusterConfig.from_args({"model": MODEL, "router": {"http_port": None}})
    assert off.router.http_port is None
    named = ClusterConfig.from_args({"model": {**MODEL, "served_name": "deepseek-r1"}})
    assert named.model.name == "deepseek-r1"


def test_build_app_makes_the_router_the_http_ingress_only_with_an_http_port():
    from ray.serve._private.http_util import ASGIAppReplicaWrapper

    from cluster.app import RouterServer, build_app

    def router_class(args: dict) -> type:
        return build_app(args)._bound_deployment.func_or_class  # the Router deployment's class

    ingress = router_class({"model": MODEL})
    assert issubclass(ingress, RouterServer) and issubclass(ingress, ASGIAppReplicaWrapper)
    assert router_class({"model": MODEL, "router": {"http_port": None}}) is RouterServer
    # the Router serves the port itself: no Serve ingress (and `deploy` starts no proxy)
    assert router_class({"model": MODEL, "router": {"http_server": "router"}}) is RouterServer


def test_dotted_keys_as_serve_run_passes_them_without_mutating_the_args():
    args = {"model": dict(MODEL), "model.dtype": "bfloat16", "decode.num_gangs": "3"}
    before = copy.deepcopy(args)
    cfg = ClusterConfig.from_args(args)
    assert cfg.model.dtype == "bfloat16" and cfg.decode.num_gangs == 3
    assert args == before


@pytest.mark.parametrize("gang_size, num_gangs", [(1, 1), (2, 3), (4, 2), (8, 5)])
def test_num_replicas_is_a_whole_number_of_gangs(gang_size, num_gangs):
    cfg = ClusterConfig.from_args(
        {"model": MODEL, "decode": {"gang_size": gang_size, "num_gangs": num_gangs}}
    )
    assert cfg.decode.num_replicas == gang_size * num_gangs
    assert cfg.decode.num_replicas % cfg.decode.gang_size == 0


def _models(model: type[BaseModel]):
    yield model
    for field in model.model_fields.values():
        for sub in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                yield from _models(sub)


def test_every_field_is_described_and_in_the_json_schema():
    for model in _models(ClusterConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
    schema = json_schema()
    assert schema["required"] == ["model"]
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["RouterConfig"]["properties"]["port"]["maximum"] == 65535
