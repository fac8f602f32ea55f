"""The OpenAI API served by the Router replica itself (`router.http_server: router`): uvicorn on
the gRPC server's event loop, on `router.http_port`, with no Serve proxy hop.

Why: behind Serve's HTTP proxy every streamed event is one item of a Ray actor stream from the
Router replica to the proxy, re-sent from there; at 32 streams that costs ~1.8 ms of CPU per
token over the two processes against ~0.4 ms for gRPC (README, "The OpenAI API over HTTP").
Here an event is one socket write from the process that holds the rank channels, as for gRPC:
the request runs on the same loop as the servicer. Router replicas of
a node share the port (SO_REUSEPORT); Serve's own HTTP proxy must not bind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from typing import Any

from fastapi import FastAPI

__all__ = ["HttpFrontDoor"]


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # every Router replica of a node
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(
            f"the OpenAI API cannot bind {host}:{port} ({e.strerror}); is Serve's HTTP proxy on "
            "it? Give Serve's http_options another port, or use router.http_server: serve"
        ) from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class HttpFrontDoor:
    """uvicorn serving `app` on `host:port`, as a task of `loop` (the gRPC server's)."""

    def __init__(self, app: FastAPI, *, host: str, port: int) -> None:
        import uvicorn

        self.address = f"{host}:{port}"
        self._sock = _listen(host, port)
        config = uvicorn.Config(
            app, lifespan="off", log_level="warning", access_log=False, server_header=False
        )
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[Any] | None = None

    async def start(self, timeout_s: float = 30.0) -> HttpFrontDoor:
        """Start serving on the running loop; returns once uvicorn accepts connections."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        async with asyncio.timeout(timeout_s):
            while not self._server.started:
                if self._task.done():
                    self._task.result()  # raises what stopped it
                    raise RuntimeError(f"the OpenAI API stopped while starting on {self.address}")
                await asyncio.sleep(0.01)  # uvicorn exposes no start event; bounded above
        return self

    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, grace_s: float) -> None:
        """No new connections; streams in progress get `grace_s`, then are cut."""
        if self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = math.ceil(grace_s)
        self._server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self._task, grace_s + 5)
        self._sock.close()
