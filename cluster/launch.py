"""Deploy the application on a running Ray (embedded or joined) and take it down again: what
`moe-cluster serve`, the tests and `bench/serve.py` share.

Every wait is bounded: an infeasible gang placement (not enough CPUs/GPUs for gang_size ranks)
would otherwise wait forever without a word, so `deploy` raises after `timeout_s` with what each
deployment reports.
"""

from __future__ import annotations

import time

import ray
from ray import serve

from cluster.app import APP_NAME, HEAD_NODE_RESOURCE, build_app
from cluster.config import ClusterConfig
from cluster.registry import drop_registry

__all__ = ["DeployError", "deploy", "head_node_ip", "undeploy", "wait_running"]


class DeployError(RuntimeError):
    """The application failed to deploy or did not become ready in time."""


def deploy(
    cfg: ClusterConfig,
    *,
    http_host: str = "127.0.0.1",
    timeout_s: float = 600.0,
) -> None:
    """Start Serve on the connected Ray (with `router.http_server: serve` its HTTP proxy on
    `http_host:router.http_port`, loopback unless asked, carrying the OpenAI API; else no proxy:
    the Router serves the HTTP port itself, or there is none; no gRPC proxy: the Router serves
    `router.port` itself), deploy the application and return once it serves requests. Serve
    keeps the proxy options of its first start."""
    if cfg.router.starts_serve_proxy:
        serve.start(http_options={"host": http_host, "port": cfg.router.http_port})
    else:  # the Router serves the HTTP port itself (auto, router), or there is none
        serve.start(proxy_location="Disabled")
    serve.run_many(
        [serve.RunTarget(build_app(cfg), name=APP_NAME, route_prefix="/")],
        wait_for_applications_running=False,
    )
    wait_running(timeout_s)


def head_node_ip() -> str:
    """Where the Router replicas run (and serve `router.port`): the Ray head node."""
    for node in ray.nodes():
        if node["Alive"] and HEAD_NODE_RESOURCE in node["Resources"]:
            return str(node["NodeManagerAddress"])
    raise DeployError("no live Ray head node found")


def wait_running(timeout_s: float, app: str = APP_NAME) -> None:
    """Poll Serve's status until `app` runs; DeployError when it failed or time ran out."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = serve.status().applications.get(app)
        if st is not None and st.status == "RUNNING":
            return
        details = "; ".join(
            f"{name}: {d.status} {d.message}".strip()
            for name, d in (st.deployments.items() if st is not None else [])
        )
        if st is not None and st.status == "DEPLOY_FAILED":
            raise DeployError(f"application {app!r} failed to deploy: {st.message} ({details})")
        if time.monotonic() > deadline:
            raise DeployError(
                f"application {app!r} not running after {timeout_s:g} s ({details or 'no status'})."
                " If replicas are pending, the gangs may not fit: each needs gang_size x "
                "num_cpus_per_rank/num_gpus_per_rank; check `ray status`"
            )
        time.sleep(0.5)  # polling Serve's controller; bounded by the deadline above


def undeploy(*, shutdown_serve: bool = True) -> None:
    """Delete the application (ranks leave their gangs) and its registry; stop Serve."""
    if shutdown_serve:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)
    if ray.is_initialized():
        drop_registry(APP_NAME)
