"""What Serve's gRPC proxy imports (`router.proto.SERVICER_FUNCTION`): registers
`moe.v1.Inference` on the proxy's server, and mends two behaviours of Ray 2.60's proxy that the
request lifecycle cannot live with. Both are installed in the proxy process when Serve calls
this function, touch nothing else, and are skipped if a Ray version lacks what they wrap
(registration still works).

1. A dead Router replica: the proxy maps any `RayActorError` of the replica it forwarded to
   (the Router died mid-stream) to INTERNAL with the actor's id, pid, node and class in the
   details. A client can do nothing with that and must not see it: UNAVAILABLE, one sentence.
2. Lost cancellations: the proxy forwards a client's cancel to the replica only when the
   cancel lands while it awaits the replica's next message; when it lands while the proxy is
   writing a message to the client (often, at streaming rates), the proxy's handler task ends
   with its generators suspended and the replica is never told, so the request kept decoding
   until its timeout (measured: ~20% of 50 cancelled streams). Here the proxy's response
   generator cancels the replica's stream when the RPC's task ends with it unfinished.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref
from typing import Any

from router.proto import inference_pb2_grpc

__all__ = ["ROUTER_LOST", "add_servicer"]

log = logging.getLogger("moe_cluster.router")
ROUTER_LOST = (
    "the router serving this request stopped before it finished; retry (requests already "
    "running on ranks are aborted there)"
)


def add_servicer(servicer: Any, server: Any) -> None:
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    _map_replica_death_to_unavailable()
    _cancel_dropped_streams()


def _cancel_dropped_streams() -> None:
    try:
        from ray.serve._private import proxy
    except ImportError:
        return
    base = getattr(proxy, "ProxyResponseGenerator", None)
    if base is None or getattr(base, "_moe_cancels_when_dropped", False):
        return

    class CancelWhenDropped(base):  # type: ignore[misc, valid-type]
        """Cancels the replica's stream when the proxy's task serving the RPC ends (client
        cancel, disconnect, deadline) or the generator is dropped, whichever comes first."""

        _moe_cancels_when_dropped = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            task = asyncio.current_task()  # the proxy's task serving this one RPC
            if task is not None:
                me = weakref.ref(self)

                def on_done(_task: asyncio.Task) -> None:
                    if (generator := me()) is not None:
                        generator._cancel()

                task.add_done_callback(on_done)

        def _cancel(self) -> None:
            response = getattr(self, "_response", None)
            if response is None or getattr(self, "_done", True):
                return
            try:
                if not response.cancelled():
                    response.cancel()  # the replica's user task gets CancelledError
            except Exception:  # the loop is closing; nothing left to cancel
                pass

        def __del__(self) -> None:
            self._cancel()

    proxy.ProxyResponseGenerator = CancelWhenDropped  # type: ignore[misc]


def _map_replica_death_to_unavailable() -> None:
    try:
        import grpc
        from ray.exceptions import RayActorError
        from ray.serve._private import proxy
    except ImportError:  # not in a Serve proxy of a known shape: leave it alone
        return
    original = getattr(proxy, "get_grpc_response_status", None)
    if original is None or getattr(original, "_moe_wrapped", False):
        return

    def status(exc: BaseException, request_timeout_s: Any, request_id: str):
        response = original(exc, request_timeout_s, request_id)
        if isinstance(exc, RayActorError) and response.code == grpc.StatusCode.INTERNAL:
            return dataclasses.replace(
                response, code=grpc.StatusCode.UNAVAILABLE, message=ROUTER_LOST
            )
        return response

    status._moe_wrapped = True  # type: ignore[attr-defined]
    proxy.get_grpc_response_status = status
