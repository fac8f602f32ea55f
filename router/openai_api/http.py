"""The OpenAI-compatible HTTP API of the Router: `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions` (streaming as server-sent events ending with `data: [DONE]`).

Serve's HTTP proxy (port `router.http_port`) hands each request to the Router replica's FastAPI
app on Serve's event loop (or the Router serves the port itself, `direct.py`); the request then
runs exactly as a gRPC `Generate` call does, through the same `InferenceServicer` on the gRPC
server's loop (`GrpcFrontDoor.relay`): same auth (`Authorization: Bearer`), size checks,
admission, validation, balancing, handoff, migration, cancellation and metrics. A client that
closes the connection stops the request on its rank and frees its KV (Serve cancels the handler;
the Router's own server is watched for the disconnect, `watch_disconnect`).

Errors are OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`) with the HTTP status
of the gRPC one (400 naming the parameter, 401, 404 for an unknown model, 413, 429, 503, 504).
An error after the stream started (the request lost its rank too often) is one
`data: {"error": ...}` event, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from router.lifecycle import RequestFailed
from router.openai_api import convert
from router.openai_api.convert import OpenAIError, Prepared
from router.openai_api.schema import ChatCompletionRequest, CompletionRequest
from router.proto import inference_pb2 as pb

__all__ = ["OpenAIFrontend", "openai_app", "openai_ingress"]

T = TypeVar("T")
Relay = Callable[[Callable[[], AsyncIterator[Any]]], AsyncGenerator[Any]]


class _Headers:
    """The HTTP request's credentials as the servicer reads gRPC metadata."""

    def __init__(self, request: Request) -> None:
        self._auth = request.headers.get("authorization", "")

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", self._auth)] if self._auth else []


def _error(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class OpenAIFrontend:
    """The three endpoints over one `InferenceServicer`; `relay` runs its Generate stream on the
    gRPC server's loop (the servicer's rank channels live there)."""

    def __init__(
        self,
        servicer: Any,
        relay: Relay,
        *,
        served_name: str,
        created: int,
        watch_disconnect: bool = False,
        max_body_bytes: int = 17 << 20,
    ) -> None:
        self.servicer = servicer
        self.relay = relay
        self.watch_disconnect = watch_disconnect  # the server does not cancel on disconnect
        self.served_name = served_name
        self.created = created
        self._texts: dict[int, str] = {}  # token id -> its text, for logprobs
        self.max_body_bytes = max_body_bytes  # as large as a gRPC message may be

    # --- endpoints -----------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        try:
            self._authenticate(request)
        except OpenAIError as e:
            return _error(e)
        card = {
            "id": self.served_name,
            "object": "model",
            "created": self.created,
            "owned_by": "moe-cluster",
            "root": self.servicer.model.model_path,
            "max_model_len": self.servicer.model.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, request: Request) -> Response:
        try:
            self._authenticate(request)
            req = convert.parse_body(await self._body(request), CompletionRequest)
            rid = f"cmpl-{uuid.uuid4().hex}"
            prepared = convert.completion_request(req, self.served_name, rid)
        except OpenAIError as e:
            return _error(e)
        return await self._run(prepared, request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        try:
            self._authenticate(request)
            req = convert.parse_body(await self._body(request), ChatCompletionRequest)
            messages = convert.chat_messages(req.messages)
            limit = self.servicer.settings.max_prompt_bytes
            if (size := convert.message_bytes(messages)) > limit:
                raise OpenAIError(
                    400,
                    f"messages: {size} bytes of content, at most {limit} are accepted "
                    "(router.max_prompt_bytes); send a shorter conversation",
                    "messages",
                )
            ids = await asyncio.to_thread(
                convert.render_chat, self.servicer.tokenizer, messages, req.add_generation_prompt
            )
            prepared = convert.chat_request(
                req,
                ids,
                self.served_name,
                f"chatcmpl-{uuid.uuid4().hex}",
                self.servicer.limits.max_model_len,
            )
        except OpenAIError as e:
            return _error(e)
        return await self._run(prepared, request, chat=True)

    # --- one request ---------------------------------------------------------------------
    async def _body(self, request: Request) -> bytes:
        """The body, refused (413) past the gRPC message limit before it is all in memory."""
        limit = self.max_body_bytes
        too_large = OpenAIError(
            413,
            f"the request body is over {limit} bytes (the gRPC message limit, set by "
            "router.max_prompt_bytes); send a shorter prompt",
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _authenticate(self, request: Request) -> None:
        try:
            self.servicer.authenticate(_Headers(request))
        except RequestFailed as e:
            raise convert.failure(e, {}) from None

    async def _run(self, p: Prepared, request: Request, *, chat: bool) -> Response:
        ctx = _Headers(request)
        stream = self.relay(lambda: self.servicer.Generate(p.request, ctx))
        try:  # everything that fails before the first token is an HTTP status
            first = await self._unless_gone(request, anext(stream))
        except RequestFailed as e:
            return _error(convert.failure(e, p.renames))
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it
        except BaseException:
            await stream.aclose()  # cancelled (client gone): stop the request on its rank
            raise
        shape = _Shape(self, p, chat)
        if p.stream:  # a closed connection cancels the response's iteration (Starlette)
            return StreamingResponse(
                self._events(first, stream, shape),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            msgs = await self._unless_gone(request, _rest(first, stream))
        except RequestFailed as e:
            return _error(convert.failure(e, p.renames))
        except _ClientGone:
            return Response(status_code=499)
        finally:
            await stream.aclose()
        return JSONResponse(shape.whole(msgs))

    async def _unless_gone(self, request: Request, step: Awaitable[T]) -> T:
        """`step`, unless the client disconnects first (then _ClientGone, `step` cancelled).
        Behind Serve's proxy a disconnect cancels the handler itself; uvicorn does not cancel
        a handler that is not streaming yet, so there the connection is watched."""
        if not self.watch_disconnect:
            return await step
        task = asyncio.ensure_future(step)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if task.cancelled():
            raise _ClientGone
        return task.result()

    async def _events(
        self, first: pb.GenerateResponse, stream: AsyncGenerator[Any], shape: _Shape
    ) -> AsyncIterator[bytes]:
        try:
            yield _sse(shape.chunk(first, opening=True))
            async for msg in stream:
                yield _sse(shape.chunk(msg))
            if shape.p.include_usage:
                yield _sse(shape.usage_chunk())
        except RequestFailed as e:
            yield _sse(convert.failure(e, shape.p.renames).body())
        finally:
            await stream.aclose()
        yield _sse("[DONE]")

    def token_text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            tok = self.servicer.tokenizer
            text = tok.decode([token_id]) if tok is not None else f"token_id:{token_id}"
            if len(self._texts) < 1 << 16:
                self._texts[token_id] = text
        return text


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


async def _disconnected(request: Request) -> None:
    """Returns when the client has disconnected (the body is read: the next ASGI message is
    `http.disconnect`)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _rest(first: pb.GenerateResponse, stream: AsyncIterator[Any]) -> list[Any]:
    return [first, *[msg async for msg in stream]]


class _Shape:
    """One request's responses in OpenAI's form (completion or chat; chunk or whole)."""

    def __init__(self, api: OpenAIFrontend, p: Prepared, chat: bool) -> None:
        self.api, self.p, self.chat = api, p, chat
        self.head = {
            "id": p.request.request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": api.served_name,
        }
        self.offset = 0  # characters streamed so far (completions' text_offset)
        self.usage: dict[str, int] | None = None

    def _logprobs(self, entries: Any) -> dict[str, Any] | None:
        top = self.p.top_logprobs
        if top is None:
            return None
        if self.chat:
            return convert.chat_logprobs(entries, self.api.token_text, top)
        return convert.completion_logprobs(entries, self.api.token_text, top, self.offset)

    def _finish(self, msg: pb.GenerateResponse) -> str | None:
        if not msg.finish_reason:
            return None
        self.usage = convert.usage(msg.usage.prompt_tokens, msg.usage.completion_tokens)
        return msg.finish_reason

    def chunk(self, msg: pb.GenerateResponse, opening: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if opening else {}
            choice["delta"] = {**delta, "content": msg.text}
        else:
            choice["text"] = msg.text
        choice["logprobs"] = self._logprobs(msg.logprobs)
        choice["finish_reason"] = self._finish(msg)
        self.offset += len(msg.text)
        out: dict[str, Any] = {**self.head, "choices": [choice]}
        if self.p.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self) -> dict[str, Any]:
        return {**self.head, "choices": [], "usage": self.usage}

    def whole(self, msgs: list[pb.GenerateResponse]) -> dict[str, Any]:
        text = "".join(m.text for m in msgs)
        entries = [e for m in msgs for e in m.logprobs]
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs(entries)
        choice["finish_reason"] = self._finish(msgs[-1])
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.head, "object": kind, "choices": [choice], "usage": self.usage}


def openai_app(frontend: Callable[[], OpenAIFrontend]) -> FastAPI:
    """The three routes, each calling `frontend()` (the replica's OpenAIFrontend). Plain
    closures, not methods: Serve ships the app to the replica by value, and a class-based
    view's rewritten `self` would not survive the trip."""
    app = FastAPI(title="moe-cluster OpenAI-compatible API", docs_url=None, redoc_url=None)

    async def list_models(request: Request) -> Response:
        return await frontend().models(request)

    async def completions(request: Request) -> Response:
        return await frontend().completions(request)

    async def chat_completions(request: Request) -> Response:
        return await frontend().chat_completions(request)

    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


def _replica_frontend() -> OpenAIFrontend:
    """The OpenAIFrontend of the Router replica serving this request."""
    from ray import serve

    replica: Any = serve.get_replica_context().servable_object
    return replica.openai


def openai_ingress(cls: type) -> type:
    """`cls` (the Router replica class; it sets `self.openai`, an OpenAIFrontend) as Serve's
    HTTP ingress of the application, with the OpenAI routes."""
    from ray import serve

    return serve.ingress(openai_app(_replica_frontend))(cls)
