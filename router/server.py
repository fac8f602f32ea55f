"""The Router's own gRPC server: `moe.v1.Inference` on `router.port`, served from the Router
replica's process on an event loop of its own (a thread), so a streamed token costs one gRPC
message and nothing else.

Why not Serve's gRPC proxy (Ray 2.60): every streamed message crossed a Ray actor stream from the
replica to the proxy and was re-sent from there; `bench/ingress.py` measured ~1.7 ms of CPU per
message over both processes at 32 streams, against ~0.15 ms here (README, "The client hop").
Serve still owns the Router's life: it starts and restarts replicas, health-checks them (`alive`)
and scales them; every Router replica on a node binds the same port (SO_REUSEPORT: the kernel
spreads connections over them).

Failures leave as a status with one sentence: `RequestFailed` from the servicer becomes
`context.abort(code, message)`; a cancelled or broken call cancels the handler, which closes the
request's stream (abort on its rank, handoff released).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_reflection.v1alpha import reflection

from router.lifecycle import RequestFailed
from router.proto import inference_pb2 as pb
from router.proto import inference_pb2_grpc as pbg

__all__ = ["GrpcFrontDoor"]

log = logging.getLogger("moe_cluster.router")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
T = TypeVar("T")


class _Adapter(pbg.InferenceServicer):
    """moe.v1.Inference as grpc.aio calls it, over a servicer that raises RequestFailed."""

    def __init__(self, servicer: Any) -> None:
        self.s = servicer

    async def Generate(  # noqa: N802
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            async for msg in self.s.Generate(request, context):
                yield msg
        except RequestFailed as e:
            await context.abort(grpc.StatusCode[e.status], str(e))

    async def Tokenize(self, request, context):  # noqa: N802
        return await _unary(self.s.Tokenize, request, context)

    async def GetModelInfo(self, request, context):  # noqa: N802
        return await _unary(self.s.GetModelInfo, request, context)

    async def GetClusterStatus(self, request, context):  # noqa: N802
        return await _unary(self.s.GetClusterStatus, request, context)

    async def Drain(self, request, context):  # noqa: N802
        return await _unary(self.s.Drain, request, context)


async def _unary(method: Callable[..., Any], request: Any, context: Any) -> Any:
    try:
        return await method(request, context)
    except RequestFailed as e:
        await context.abort(grpc.StatusCode[e.status], str(e))


class GrpcFrontDoor:
    """A grpc.aio server for `servicer` on `host:port`, on its own thread and event loop.

    `start()` returns once the port is bound (raises with the reason otherwise); everything the
    servicer does (its rank channels included) runs on that loop. `stop(grace_s)` lets calls in
    progress finish for up to `grace_s`, then cancels them."""

    def __init__(
        self,
        servicer: Any,
        *,
        port: int,
        host: str = "0.0.0.0",
        max_message_bytes: int = 4 << 20,
        on_loop_start: Callable[[], object] | None = None,
    ) -> None:
        self.servicer = servicer
        self.address = f"{host}:{port}"
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 1),  # every Router replica of a node serves the same port
        ]
        self._on_loop_start = on_loop_start
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self, timeout_s: float = 60.0) -> GrpcFrontDoor:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve(ready))
                loop.run_forever()  # until stop()
            except BaseException as e:  # reported by start() / alive()
                failure.append(e)
                ready.set()
            finally:
                self._stopped.set()

        self._thread = threading.Thread(target=run, name="grpc-front-door", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TimeoutError(f"the gRPC server did not start on {self.address} in {timeout_s} s")
        if failure:
            raise RuntimeError(f"the gRPC server cannot serve {self.address}: {failure[0]}")
        return self

    async def _serve(self, ready: threading.Event) -> None:
        if self._on_loop_start is not None:
            self._on_loop_start()
        server = grpc.aio.server(options=self._options)
        pbg.add_InferenceServicer_to_server(_Adapter(self.servicer), server)
        reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
        if server.add_insecure_port(self.address) == 0:
            raise OSError(f"port {self.address} cannot be bound")
        await server.start()
        self._server = server
        ready.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._server is not None

    def run(self, coro: Any, timeout_s: float) -> Any:
        """Run a coroutine on the server's loop from another thread and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def relay(self, make: Callable[[], AsyncIterator[T]]) -> AsyncGenerator[T]:
        """Iterate `make()` on this server's loop (where the servicer and its rank channels
        live) from another running loop (the HTTP API's, Serve's replica loop): each item, the
        end or the exception crosses over as it comes. Closing this iterator, or cancelling its
        consumer (the HTTP client went away), cancels the iteration over there, which closes the
        request's stream: the request is aborted on its rank and its KV freed."""
        assert self._loop is not None, "start() the server first"
        here = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()

        def send(item: tuple[bool, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the consumer's loop is closed: nobody waits
                here.call_soon_threadsafe(items.put_nowait, item)

        async def pump() -> None:
            try:
                async with contextlib.aclosing(make()) as it:  # type: ignore[type-var]
                    async for item in it:
                        send((True, item))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # RequestFailed and the unexpected alike: the consumer decides
                send((False, e))
            else:
                send((False, None))

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                ok, item = await items.get()
                if ok:
                    yield item
                elif item is None:
                    return
                else:
                    raise item
        finally:
            future.cancel()

    def stop(self, grace_s: float) -> None:
        """Refuse new calls, let those in progress finish for up to `grace_s`, stop the loop."""
        loop, server = self._loop, self._server
        if loop is None or server is None or self._stopped.is_set():
            return
        try:
            self.run(server.stop(grace_s), timeout_s=grace_s + 10)
        except Exception as e:  # the loop is gone already
            log.warning("gRPC server stop: %r", e)
        loop.call_soon_threadsafe(loop.stop)
        self._stopped.wait(10)
