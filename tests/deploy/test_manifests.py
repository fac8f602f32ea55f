"""The KubeRay deployment in deploy/, checked without a cluster: the manifests validate against the
vendored KubeRay CRDs (plus a strict unknown-key walk, since CRDs accept unknown keys silently),
every serveConfigV2 is a Ray Serve config whose app args are a ClusterConfig, images carry the
Ray version, the GPU shape adds up, the Services reach the head's gRPC port, kustomizations
resolve, and the Grafana dashboard queries only metrics the code exports."""

from __future__ import annotations

import ast
import copy
import functools
import json
import posixpath
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.serve.schema import (
    HTTPOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
    gRPCOptionsSchema,
)

from cluster.config import ClusterConfig
from cluster.embedded import RAY_ENV

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CPU_SHAPE = K8S / "ray-service.cpu.yaml"
GPU_SHAPE = K8S / "gpu" / "ray-service.gpu.yaml"
CRDS = Path(__file__).parent / "kuberay"
KUBERAY_KINDS = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
GPU = "nvidia.com/gpu"
# labels KubeRay itself puts on the pods it creates (a Service may select on them)
KUBERAY_HEAD_LABELS = {"ray.io/node-type": "head"}
HEAD_PORTS = {
    "gcs-server": 6379,
    "dashboard": 8265,
    "client": 10001,
    "serve": 8000,
    "metrics": 8080,
}
WORKER_PORTS = {"serve": 8000, "metrics": 8080}

# What the dashboard may query: the `moe_*` metrics of cluster/metrics.py and router/metrics.py as
# Ray exports them (prefix `ray_`); histograms only through their Prometheus series.
HISTOGRAMS = {"ray_moe_ttft_seconds", "ray_moe_itl_seconds"}
SERIES = {
    "ray_moe_requests_total",
    "ray_moe_generated_tokens_total",
    "ray_moe_queued_prompt_tokens",
    "ray_moe_kv_usage",
    "ray_moe_running_requests",
    "ray_moe_expert_load_imbalance",
    "ray_moe_dispatch_bytes_total",
    "ray_moe_prefix_cache_hit_tokens_total",
    "ray_moe_prefix_cache_query_tokens_total",
    "ray_moe_kv_blocks_cached",
}
DASHBOARD_METRICS = SERIES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d]


@functools.cache
def _documents() -> tuple[tuple[Path, dict[str, Any]], ...]:
    files = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
    return tuple((p, d) for p in files for d in _load_all(p))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@functools.cache
def _crd_schema(kind: str, api_version: str) -> dict[str, Any]:
    (crd,) = _load_all(CRDS / KUBERAY_KINDS[kind])
    group = crd["spec"]["group"]
    for version in crd["spec"]["versions"]:
        if f"{group}/{version['name']}" == api_version:
            assert version["served"], f"{api_version} {kind} is no longer served"
            return version["schema"]["openAPIV3Schema"]
    raise AssertionError(f"the vendored CRD has no {api_version} {kind}")


def _ray_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in _documents() if d.get("kind") in KUBERAY_KINDS]


def _ray_service(path: Path) -> dict[str, Any]:
    (doc,) = [d for p, d in _documents() if p == path and d["kind"] == "RayService"]
    return doc


def _serve_config(service: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def _cluster_config(service: dict[str, Any]) -> ClusterConfig:
    (app,) = _serve_config(service)["applications"]
    return ClusterConfig.from_args(app["args"])


def _groups(service: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, group spec) for the head and each worker group."""
    cluster = service["spec"]["rayClusterConfig"]
    workers = cluster.get("workerGroupSpecs", [])
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in workers]


def _containers(group: dict[str, Any], init: bool = True) -> list[dict[str, Any]]:
    spec = group["template"]["spec"]
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def _volume_at(
    pod: dict[str, Any], container: dict[str, Any], mount_path: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volumeMount, volume) of the one volume `container` mounts at `mount_path`."""
    (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == mount_path]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def _quantity(value: Any) -> int:
    return int(str(value))


def unknown_keys(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys of `value` that `schema` does not name, where it names its keys (`properties`) and
    does not let others through (`additionalProperties`, `x-kubernetes-preserve-unknown-fields`).
    The API server prunes such keys without a word, so a typo like `rayStartParam` would vanish."""
    found: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is not None:
            open_ = bool(extra) or schema.get("x-kubernetes-preserve-unknown-fields", False)
            for key, child in value.items():
                if key in props:
                    found += unknown_keys(child, props[key], f"{path}.{key}")
                elif isinstance(extra, dict):
                    found += unknown_keys(child, extra, f"{path}.{key}")
                elif not open_:
                    found.append(f"{path}.{key}")
        elif isinstance(extra, dict):
            for key, child in value.items():
                found += unknown_keys(child, extra, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, child in enumerate(value):
            found += unknown_keys(child, schema["items"], f"{path}[{i}]")
    return found


def crd_problems(doc: dict[str, Any]) -> list[str]:
    """Everything wrong with a RayService/RayCluster document against its CRD: schema errors
    (types, enums, required, patterns) and unknown keys."""
    schema = _crd_schema(doc["kind"], doc["apiVersion"])
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
    return errors + [f"{k}: unknown key" for k in unknown_keys(doc, schema, "$")]


# ---- the manifests against the KubeRay CRDs ----


def test_both_shapes_are_present() -> None:
    kinds = {(_rel(p), d["kind"]) for p, d in _ray_documents()}
    assert (_rel(CPU_SHAPE), "RayService") in kinds
    assert (_rel(GPU_SHAPE), "RayService") in kinds


@pytest.mark.parametrize(
    "path, doc", _ray_documents(), ids=[f"{_rel(p)}:{d['kind']}" for p, d in _ray_documents()]
)
def test_ray_manifests_validate_against_the_crds(path: Path, doc: dict[str, Any]) -> None:
    assert crd_problems(doc) == []
    if doc["kind"] == "RayService":  # the embedded cluster is a RayCluster spec: check it there too
        as_cluster = {
            "apiVersion": doc["apiVersion"],
            "kind": "RayCluster",
            "metadata": doc["metadata"],
            "spec": doc["spec"]["rayClusterConfig"],
        }
        assert crd_problems(as_cluster) == []


def test_a_typo_in_a_manifest_is_caught() -> None:
    doc = copy.deepcopy(_ray_service(CPU_SHAPE))
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "2"
    problems = crd_problems(doc)
    assert "$.spec.rayClusterConfig.headGroupSpec.rayStartParam: unknown key" in problems
    assert any(
        p.startswith("$.spec.rayClusterConfig.workerGroupSpecs[0].replicas:") for p in problems
    )
    assert len(problems) == 2, problems


# ---- serveConfigV2: a Ray Serve config running build_app on a valid ClusterConfig ----


def _module_names(path: Path) -> dict[str, ast.AST]:
    tree = ast.parse(path.read_text())
    names: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node.value
    return names


@pytest.mark.parametrize("path", [CPU_SHAPE, GPU_SHAPE], ids=lambda p: p.name)
def test_serve_config_is_valid_and_runs_build_app(path: Path) -> None:
    raw = _serve_config(_ray_service(path))
    parsed = ServeDeploySchema.model_validate(raw)

    # Serve ignores unknown keys; catch the typos it would swallow
    def unknown(d: dict[str, Any], model: Any) -> set[str]:
        return set(d) - set(model.model_fields)

    assert unknown(raw, ServeDeploySchema) == set()
    assert unknown(raw.get("grpc_options", {}), gRPCOptionsSchema) == set()
    assert unknown(raw.get("http_options", {}), HTTPOptionsSchema) == set()

    # cluster/app.py read, not imported (that pulls torch): APP_NAME and build_app
    app_module = _module_names(ROOT / "cluster" / "app.py")
    assert isinstance(app_module["build_app"], ast.FunctionDef)
    app_name = ast.literal_eval(app_module["APP_NAME"])

    (app,) = raw["applications"]
    assert unknown(app, ServeApplicationSchema) == set()
    assert app["name"] == app_name
    assert app["import_path"] == "cluster.app:build_app"
    assert app["route_prefix"] == "/"
    ClusterConfig.from_args(app["args"])  # raises naming the field if not a ClusterConfig
    # the Router serves router.port itself: Serve's gRPC proxy must not serve anything
    assert not parsed.grpc_options.grpc_servicer_functions
    assert parsed.http_options.host == "0.0.0.0"
    # the OpenAI API is served behind Serve's HTTP proxy: one port, defined twice, kept equal
    assert parsed.http_options.port == ClusterConfig.from_args(app["args"]).router.http_port


# ---- images carry the Ray version ----


def _image_tag(image: str) -> str:
    name = image.rsplit("/", 1)[-1]
    assert ":" in name, f"{image}: pin a tag"
    return name.split(":", 1)[1]


@pytest.mark.parametrize("path", [CPU_SHAPE, GPU_SHAPE], ids=lambda p: p.name)
def test_images_carry_the_installed_ray_version(path: Path) -> None:
    cluster = _ray_service(path)["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    for name, group in _groups(_ray_service(path)):
        for c in _containers(group):
            assert ray.__version__ in _image_tag(c["image"]), f"{name}/{c['name']}: {c['image']}"


def test_dockerfile_builds_on_the_installed_ray_and_the_pinned_torch() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    (ray_image,) = re.findall(r"^ARG RAY_IMAGE=(\S+)$", dockerfile, re.M)
    assert ray.__version__ in _image_tag(ray_image)
    (torch_pin,) = re.findall(r"^TORCH_CPU := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert torch_pin in dockerfile
    copied = " ".join(re.findall(r"^COPY (.+)$", dockerfile, re.M))
    for needed in ("pyproject.toml", "README.md", "cluster/", "workers/", "router/"):
        assert needed in copied


# ---- resources, ports, volumes ----


@pytest.mark.parametrize("path", [CPU_SHAPE, GPU_SHAPE], ids=lambda p: p.name)
def test_every_container_requests_what_it_limits(path: Path) -> None:
    for name, group in _groups(_ray_service(path)):
        for c in _containers(group):
            res = c.get("resources", {})
            assert res.get("requests") and res.get("requests") == res.get("limits"), (
                f"{name}/{c['name']}: requests must equal limits (Guaranteed QoS)"
            )


@pytest.mark.parametrize("path", [CPU_SHAPE, GPU_SHAPE], ids=lambda p: p.name)
def test_named_ports_and_metrics_export_port(path: Path) -> None:
    service = _ray_service(path)
    grpc_port = _cluster_config(service).router.port
    for name, group in _groups(service):
        ray_container = group["template"]["spec"]["containers"][0]  # KubeRay: the first is Ray
        ports = {p["name"]: p["containerPort"] for p in ray_container["ports"]}
        # the Router replicas (and so router.port) live on the head node only
        expected = {**HEAD_PORTS, "grpc": grpc_port} if name == "head" else WORKER_PORTS
        assert ports == expected, name
        assert group["rayStartParams"]["metrics-export-port"] == str(ports["metrics"]), name
    assert _groups(service)[0][1]["rayStartParams"]["dashboard-host"] == "0.0.0.0"


@pytest.mark.parametrize("path", [CPU_SHAPE, GPU_SHAPE], ids=lambda p: p.name)
def test_every_node_runs_ray_with_the_embedded_settings(path: Path) -> None:
    """Serve's controller lives on the head, Routers and ranks anywhere: every group gets
    cluster/embedded.py's RAY_ENV, as the embedded Ray of `moe-cluster serve` does (one
    definition, two places)."""
    for name, group in _groups(_ray_service(path)):
        ray_container = group["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in ray_container.get("env", [])}
        assert {k: env.get(k) for k in RAY_ENV} == RAY_ENV, name


def test_cpu_shape_builds_the_tiny_model_on_every_pod() -> None:
    service = _ray_service(CPU_SHAPE)
    model_path = _cluster_config(service).model.path
    head_params = _groups(service)[0][1]["rayStartParams"]
    assert float(head_params["num-cpus"]) >= 1  # Serve controller, proxies, Router, ranks
    for name, group in _groups(service):
        (init,) = group["template"]["spec"]["initContainers"]
        ray_container = group["template"]["spec"]["containers"][0]
        command = init["command"]
        assert command[:2] == ["moe-cluster", "make-tiny"], name
        assert command[command.index("--out") + 1] == model_path, name
        assert "--seed" in command, f"{name}: every pod must write byte-identical weights"
        assert init["image"] == ray_container["image"], name
        for c in (init, ray_container):
            _, volume = _volume_at(group["template"]["spec"], c, posixpath.dirname(model_path))
            assert "emptyDir" in volume, f"{name}/{c['name']}"


# ---- the GPU shape ----


def test_gpu_shape_adds_up() -> None:
    service = _ray_service(GPU_SHAPE)
    cfg = _cluster_config(service)
    (_, head), *workers = _groups(service)
    assert head["rayStartParams"]["num-gpus"] == "0"
    for c in _containers(head):
        for kind in ("requests", "limits"):
            assert GPU not in c["resources"].get(kind, {}), f"head/{c['name']} {kind}"

    assert cfg.model.dtype == "bfloat16"
    stages = (cfg.prefill, cfg.decode)
    for stage in stages:
        assert stage.num_gpus_per_rank == 1
        assert stage.placement_strategy in ("PACK", "SPREAD")
    ranks = sum(s.gang_size * s.num_gangs for s in stages)
    assert (cfg.prefill.gang_size, cfg.prefill.num_gangs, cfg.decode.num_gangs) == (16, 1, 2)

    total_gpus = 0
    for name, group in workers:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        ray_container = group["template"]["spec"]["containers"][0]
        res = ray_container["resources"]
        gpus = _quantity(res["limits"][GPU])
        assert gpus == _quantity(res["requests"][GPU]) == 8, name
        cpus = float(group["rayStartParams"].get("num-cpus", res["limits"]["cpu"]))
        per_rank_cpus = max(s.num_cpus_per_rank for s in stages)
        assert gpus * per_rank_cpus <= cpus, f"{name}: {gpus} ranks x {per_rank_cpus} CPUs"
        tolerations = group["template"]["spec"]["tolerations"]
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in tolerations, name
        _, shm = _volume_at(group["template"]["spec"], ray_container, "/dev/shm")
        assert shm["emptyDir"]["medium"] == "Memory", name
        total_gpus += group["replicas"] * gpus
        # every gang is wider than a node: its ranks spread over nodes
        assert all(stage.gang_size > gpus for stage in stages), name
    assert total_gpus >= ranks


def test_gpu_shape_reads_the_weights_volume_the_job_fills() -> None:
    service = _ray_service(GPU_SHAPE)
    model_path = _cluster_config(service).model.path
    others = {
        (d["kind"], d["metadata"]["name"]): d for p, d in _documents() if p.parent == K8S / "gpu"
    }
    pvc = others[("PersistentVolumeClaim", "moe-weights")]
    # the Job writes it while Ray pods on other nodes may already mount it
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for name, group in _groups(service):
        pod = group["template"]["spec"]
        mount, volume = _volume_at(pod, pod["containers"][0], posixpath.dirname(model_path))
        assert mount.get("readOnly") is True, name
        assert volume["persistentVolumeClaim"]["claimName"] == "moe-weights", name

    job = others[("Job", "moe-weights-download")]["spec"]["template"]["spec"]
    (download,) = job["containers"]
    script = " ".join(download.get("command", []) + download.get("args", []))
    assert f"--local-dir {model_path}" in script
    _, volume = _volume_at(job, download, posixpath.dirname(model_path))
    assert volume["persistentVolumeClaim"]["claimName"] == "moe-weights"


# ---- Services ----


def _service(name: str) -> dict[str, Any]:
    (doc,) = [
        d for _, d in _documents() if d["kind"] == "Service" and d["metadata"]["name"] == name
    ]
    return doc


@pytest.mark.parametrize("path", [CPU_SHAPE, GPU_SHAPE], ids=lambda p: p.name)
def test_grpc_service_reaches_the_head(path: Path) -> None:
    svc = _service("moe-cluster-grpc")["spec"]
    (port,) = [p for p in svc["ports"] if p["name"] == "grpc"]
    assert port["port"] == 9000 and port["appProtocol"] == "grpc"
    head = _groups(_ray_service(path))[0][1]
    (target,) = [
        p
        for p in head["template"]["spec"]["containers"][0]["ports"]
        if port["targetPort"] in (p["name"], p["containerPort"])
    ]
    assert target["containerPort"] == _cluster_config(_ray_service(path)).router.port
    (http,) = [p for p in svc["ports"] if p["name"] == "http"]  # the OpenAI API next to gRPC
    (http_target,) = [
        p
        for p in head["template"]["spec"]["containers"][0]["ports"]
        if http["targetPort"] in (p["name"], p["containerPort"])
    ]
    assert http_target["containerPort"] == _cluster_config(_ray_service(path)).router.http_port
    head_labels = {**head["template"]["metadata"]["labels"], **KUBERAY_HEAD_LABELS}
    assert svc["selector"].items() <= head_labels.items()
    assert svc["selector"].keys() - KUBERAY_HEAD_LABELS.keys(), "select this app's heads only"


@pytest.mark.parametrize("path", [CPU_SHAPE, GPU_SHAPE], ids=lambda p: p.name)
def test_metrics_service_selects_every_ray_pod(path: Path) -> None:
    svc = _service("moe-cluster-metrics")["spec"]
    assert [(p["name"], p["targetPort"]) for p in svc["ports"]] == [("metrics", "metrics")]
    for name, group in _groups(_ray_service(path)):
        assert svc["selector"].items() <= group["template"]["metadata"]["labels"].items(), name


# ---- who may reach what (docs/security.md) ----

RAY_TOKEN_SECRET = "moe-cluster-ray-token"
CLIENT_PORTS = {"grpc", "serve"}  # behind router.auth_tokens


@pytest.mark.parametrize("path", [CPU_SHAPE, GPU_SHAPE], ids=lambda p: p.name)
def test_ray_token_auth_is_on_with_a_secret_the_header_says_how_to_make(path: Path) -> None:
    service = _ray_service(path)
    auth = service["spec"]["rayClusterConfig"]["authOptions"]
    assert auth == {"mode": "token", "secretName": RAY_TOKEN_SECRET}
    # the Secret is the operator's (never a token committed here): the header makes it
    assert f"kubectl create secret generic {RAY_TOKEN_SECRET} --from-literal=auth_token=" in (
        path.read_text()
    )
    assert not [d for _, d in _documents() if d["kind"] == "Secret"], "no committed secrets"


def _policy() -> dict[str, Any]:
    (doc,) = [d for _, d in _documents() if d["kind"] == "NetworkPolicy"]
    return doc["spec"]


@pytest.mark.parametrize("path", [CPU_SHAPE, GPU_SHAPE], ids=lambda p: p.name)
def test_network_policy_fences_everything_but_the_apis(path: Path) -> None:
    """Every Ray pod is selected; its own pods reach every port (Ray, torch.distributed, the
    rank wire); anyone else reaches only named ports: clients the APIs, Prometheus the metrics,
    the KubeRay operator the dashboard, each a port the head or worker containers name."""
    policy = _policy()
    assert policy["policyTypes"] == ["Ingress"]
    selector = policy["podSelector"]["matchLabels"]
    groups = _groups(_ray_service(path))
    for name, group in groups:
        assert selector.items() <= group["template"]["metadata"]["labels"].items(), name
    named = {p["name"] for _, g in groups for p in g["template"]["spec"]["containers"][0]["ports"]}
    own = [
        r for r in policy["ingress"] if r.get("from") == [{"podSelector": policy["podSelector"]}]
    ]
    assert len(own) == 1 and "ports" not in own[0], "the cluster's own pods: every port"
    others = [r for r in policy["ingress"] if r not in own]
    for rule in others:
        ports = {p["port"] for p in rule["ports"]}
        assert ports <= named, f"a port no container names: {ports - named}"
        if "from" not in rule:  # anyone: the APIs only
            assert ports == CLIENT_PORTS
        else:
            assert not ports & CLIENT_PORTS or ports <= CLIENT_PORTS
            assert all("podSelector" in f or "namespaceSelector" in f for f in rule["from"])
    reached = {p["port"] for r in others for p in r["ports"]}
    assert reached == CLIENT_PORTS | {"metrics", "dashboard"}
    assert "gcs-server" not in reached and "client" not in reached


# ---- kustomizations ----


def _resources(kdir: Path) -> set[Path]:
    """The manifest files a kustomization folder applies, following bases; fails where
    `kustomize build` would (a missing path, a plain file outside the folder, a folder without
    a kustomization)."""
    kustomization = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    files: set[Path] = set()
    for entry in kustomization["resources"]:
        target = (kdir / entry).resolve()
        assert target.exists(), f"{_rel(kdir)}: {entry} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").exists(), f"{_rel(kdir)}: {entry} is no base"
            files |= _resources(target)
        else:
            assert target.is_relative_to(kdir.resolve()), (
                f"{_rel(kdir)}: {entry} is a file outside the kustomization's folder, which "
                "kustomize's default load restrictor refuses; make its folder a base"
            )
            files.add(target)
    return files


def test_kustomizations_resolve_to_the_two_shapes() -> None:
    cpu, gpu = _resources(K8S), _resources(K8S / "gpu")
    shared = {K8S / "service" / "service.yaml", K8S / "service" / "network-policy.yaml"}
    assert cpu == {CPU_SHAPE, *shared}
    assert gpu == {GPU_SHAPE, K8S / "gpu" / "weights.yaml", *shared}
    orphans = {p for p, _ in _documents()} - cpu - gpu
    assert not orphans, f"manifests no kustomization applies: {sorted(map(_rel, orphans))}"


# ---- the Grafana dashboard ----


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_grafana_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "moe-cluster.json").read_text())
    assert dashboard["schemaVersion"] == 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    queried = {m for s in _strings(dashboard) for m in re.findall(r"\bray_moe_\w+", s)}
    assert queried <= DASHBOARD_METRICS, queried - DASHBOARD_METRICS
    bases = {re.sub(r"_(bucket|sum|count)$", "", m) for m in queried}
    assert bases >= SERIES | HISTOGRAMS, "a panel for every metric"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for histogram in HISTOGRAMS:
        assert any(
            f"histogram_quantile(0.99, sum by (le) (rate({histogram}_bucket" in e for e in exprs
        )
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_dashboard_metrics_are_defined_in_the_code() -> None:
    # Ray exports a metric named `moe_x` as `ray_moe_x`; the names are string literals in the code
    defined = {
        "ray_" + name
        for package in ("cluster", "router", "workers")
        for path in (ROOT / package).rglob("*.py")
        if "gen" not in path.parts
        for name in re.findall(r"""["'](moe_\w+)["']""", path.read_text())
    }
    assert defined >= SERIES | HISTOGRAMS, (SERIES | HISTOGRAMS) - defined


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed"
)
@pytest.mark.parametrize(
    ("folder", "want"),
    [
        (
            "",
            {
                "Service/moe-cluster-grpc",
                "Service/moe-cluster-metrics",
                "NetworkPolicy/moe-cluster",
                "RayService/moe-cluster",
            },
        ),
        (
            "gpu",
            {
                "Service/moe-cluster-grpc",
                "Service/moe-cluster-metrics",
                "NetworkPolicy/moe-cluster",
                "RayService/moe-cluster",
                "PersistentVolumeClaim/moe-weights",
                "Job/moe-weights-download",
            },
        ),
    ],
)
def test_kustomize_builds(folder: str, want: set[str]) -> None:
    """`kubectl apply -k` input: kustomize (built into kubectl) renders exactly these objects."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {f"{d['kind']}/{d['metadata']['name']}" for d in docs} == want
