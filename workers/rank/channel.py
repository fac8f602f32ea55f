"""`ChannelServer`: a rank's end of its channels, on an asyncio loop in a thread of its own.

Each router replica keeps one TCP connection to each rank (a session). Frames in: `Hello`,
then `Submit` / `Abort` / `Release`. Frames out: after each engine step that touched one of the
session's requests, one `StepReport` with all of their deltas; a heartbeat `StepReport` every
HEARTBEAT_S (with the full `RankStatus` when it changed), so a router notices a silent rank.
A closed session (its router died or went away) aborts every request it submitted and drops
the KV handoffs made for it. A decode `Submit` that names a `KVRef` pulls the KV from its owner
first (here, off the engine thread); if the owner is gone the rank recomputes the prompt.
KV pulls from decode ranks arrive on the same port (`Hello("kv:...")`, then `Fetch`).

Every connection authenticates first (`workers/wire`): a peer that cannot prove it holds the
cluster's wire key, or that later sends a frame that is oversized, forged, replayed or not one of
ours, is disconnected with one warning naming its address; nothing else changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import socket
import threading

from workers.engine.handoff import KVHandoff, KVSpec
from workers.messages import (
    PROTOCOL,
    Abort,
    Delta,
    DrainRank,
    Fetch,
    Hello,
    KVData,
    RankLoad,
    Release,
    StepReport,
    Submit,
)
from workers.rank.rank import Rank
from workers.rank.transport import PeerKVTransport
from workers.wire import (
    HANDSHAKE_TIMEOUT_S,
    ChannelClosed,
    WireError,
    WireKey,
    WireStream,
    accept,
    peer_name,
)
from workers.wire.kv import to_payload

__all__ = ["HEARTBEAT_S", "MAX_HANDSHAKES", "ChannelServer", "listen_socket"]

log = logging.getLogger("moe_cluster.rank")
HEARTBEAT_S = 0.25
MAX_HANDSHAKES = 64  # connections proving themselves at once; more are closed unanswered


def listen_socket(host: str, port: int = 0) -> socket.socket:
    """A listening TCP socket on `host` (port 0: any free one)."""
    sock = socket.create_server((host, port), reuse_port=False)
    sock.setblocking(False)
    return sock


class ChannelServer:
    def __init__(
        self, rank: Rank, transport: PeerKVTransport, sock: socket.socket, key: WireKey
    ) -> None:
        """`sock`: bound by `listen_socket` (the port is known before the rank starts, so the
        KV transport can name it in the refs it hands out). `key`: the cluster's wire key."""
        self.rank, self.transport, self.store = rank, transport, transport.store
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self._key = key
        self._loop = asyncio.new_event_loop()
        self._sessions: dict[str, WireStream] = {}
        self._handshakes = 0
        self._admitted: dict[str, int] = {}
        self._status_sent: dict[str, float] = {}
        self._pending_kv: dict[str, bool] = {}  # request id -> cancelled while its KV is pulled
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="rank-channel", daemon=True)
        rank.publish = self._publish_threadsafe

    def start(self, timeout_s: float = 30.0) -> ChannelServer:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"rank channel did not start listening within {timeout_s} s")
        return self

    def close(self) -> None:
        """Close every session (routers see EOF and take their requests elsewhere)."""
        if self._loop.is_closed():
            return
        done = threading.Event()

        def shut() -> None:
            for w in self._sessions.values():
                w.close()
            self._sessions.clear()
            self._loop.stop()
            done.set()

        self._loop.call_soon_threadsafe(shut)
        done.wait(10)

    # --- the channel thread ----------------------------------------------------------------
    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, sock=self._sock)
        )
        self._loop.create_task(self._heartbeat())
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            tasks = asyncio.all_tasks(self._loop)
            for t in tasks:
                t.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.close()

    def _publish_threadsafe(
        self, by_session: dict[str, list[Delta]], load: RankLoad, admitted: dict[str, int]
    ) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody to tell
            self._loop.call_soon_threadsafe(self._publish, by_session, load, admitted)

    def _publish(
        self, by_session: dict[str, list[Delta]], load: RankLoad, admitted: dict[str, int]
    ) -> None:
        for session, stream in list(self._sessions.items()):
            deltas = by_session.get(session, [])
            n = admitted.get(session, 0)
            if deltas or n != self._admitted.get(session):
                self._admitted[session] = n
                self._send(session, stream, StepReport(load, n, deltas))

    def _send(self, session: str, stream: WireStream, report: StepReport) -> None:
        try:
            stream.send(report)
        except (ConnectionError, RuntimeError):
            self._sessions.pop(session, None)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            snap = self.rank.snapshot
            for session, stream in list(self._sessions.items()):
                status = None
                if snap.status is not None and self._status_sent.get(session) != snap.status.time_s:
                    status = snap.status
                    self._status_sent[session] = snap.status.time_s
                n = self._admitted.get(session, 0)
                self._send(session, stream, StepReport(snap.load, n, [], status))

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # a top-level handler: cancelled only when the server shuts down, and asyncio's stream
        # server reports a cancelled handler as an error, so it ends quietly instead
        with contextlib.suppress(asyncio.CancelledError):
            await self._session(reader, writer)

    def _refuse(self, peer: str, why: object) -> None:
        log.warning("rank port %s closed the connection from %s: %s", self.port, peer, why)

    async def _authenticate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[WireStream, Hello] | None:
        """The connection's stream and Hello once its peer proved it holds the key; None
        (connection closed, one line logged for a peer that is not ours) otherwise."""
        peer = peer_name(writer)
        if self._handshakes >= MAX_HANDSHAKES:
            self._refuse(peer, f"{MAX_HANDSHAKES} connections already authenticating")
            writer.close()
            return None
        self._handshakes += 1
        try:
            stream = await accept(reader, writer, self._key)
            hello = await asyncio.wait_for(stream.recv(), HANDSHAKE_TIMEOUT_S)
        except WireError as e:
            self._refuse(peer, e)
            writer.close()
            return None
        except (ChannelClosed, TimeoutError):
            writer.close()
            return None
        finally:
            self._handshakes -= 1
        if not isinstance(hello, Hello) or hello.protocol != PROTOCOL:
            self._refuse(peer, f"its first message was not Hello with protocol {PROTOCOL}")
            writer.close()
            return None
        return stream, hello

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened = await self._authenticate(reader, writer)
        if opened is None:
            return
        stream, hello = opened
        if hello.peer_id.startswith("kv:"):
            await self._kv_peer(stream)
            return
        session = f"{hello.peer_id}#{next(self._ids)}"
        self._sessions[session] = stream
        self._admitted[session] = 0
        try:
            while True:
                msg = await stream.recv()
                if isinstance(msg, Submit):
                    if msg.kv is not None:
                        self._pending_kv[msg.request_id] = False
                        self._loop.create_task(self._pull_then_submit(session, msg))
                    else:
                        self.rank.submit(session, msg)
                elif isinstance(msg, Abort):
                    if msg.request_id in self._pending_kv:
                        self._pending_kv[msg.request_id] = True
                    self.rank.abort(msg.request_id)
                elif isinstance(msg, Release):
                    self.store.release(msg.key)
                elif isinstance(msg, DrainRank):
                    self.rank.drain(msg.grace_s)
        except WireError as e:
            self._refuse(stream.peer, e)
        except ChannelClosed:
            pass
        finally:
            self._sessions.pop(session, None)
            self._admitted.pop(session, None)
            self._status_sent.pop(session, None)
            self.rank.end_session(session)
            stream.close()

    @functools.cached_property
    def kv_spec(self) -> KVSpec:
        """What a handoff this rank imports must look like."""
        return KVSpec.of(self.rank.engine)

    async def _pull_then_submit(self, session: str, msg: Submit) -> None:
        assert msg.kv is not None
        handoff = await self.transport.get(msg.kv, self.kv_spec)
        cancelled = self._pending_kv.pop(msg.request_id, False)
        if cancelled or session not in self._sessions:
            return
        kv = None
        if isinstance(handoff, KVHandoff) and handoff.prompt_token_ids == msg.prompt_token_ids:
            kv = handoff.kv
        self.rank.submit(session, msg, kv)

    async def _kv_peer(self, stream: WireStream) -> None:
        try:
            while True:
                msg = await stream.recv()
                if isinstance(msg, Fetch):
                    handoff = self.store.take(msg.key)
                    payload = None if handoff is None else to_payload(handoff)
                    stream.send(KVData(msg.key, payload))
                    await stream.drain()
        except WireError as e:
            self._refuse(stream.peer, e)
        except (ChannelClosed, ConnectionError):
            pass
        finally:
            stream.close()
