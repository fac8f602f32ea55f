"""One authenticated rank-wire connection on asyncio streams: `connect` (the side that dials: a
router, or a decode rank pulling KV) and `accept` (a rank's port) run the handshake of
`auth.py`; the `WireStream` they return sends and receives messages, one frame each:

    length (u32, big-endian, of what follows) | MAC (16 bytes) | type byte | msgpack body

A frame is checked in this order, and the connection closed at the first failure: its length
against the stream's limit (before anything is buffered), its MAC (before anything is decoded),
then its type and schema (`codec.py`).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from workers.wire import auth
from workers.wire.auth import FrameKeys, WireKey
from workers.wire.codec import decode, encode
from workers.wire.errors import ChannelClosed, WireError

__all__ = [
    "HANDSHAKE_TIMEOUT_S",
    "MAX_CONTROL_FRAME_BYTES",
    "MAX_FRAME_BYTES",
    "WireStream",
    "accept",
    "connect",
    "peer_name",
]

HANDSHAKE_TIMEOUT_S = 5.0  # a peer that has not proven itself by then is dropped
MAX_FRAME_BYTES = (1 << 31) - 1  # a KV pull of a long prompt is the largest frame
# what a router <-> rank session and a KV request may carry: a Submit of a 128k-token prompt is
# under 1 MiB, a StepReport with DeepSeek-V3's expert load ~80 KB
MAX_CONTROL_FRAME_BYTES = 16 << 20
_LENGTH = struct.Struct(">I")
_SPLIT_WRITE_BYTES = 1 << 16  # larger bodies are written after the header, not copied onto it


def peer_name(writer: asyncio.StreamWriter) -> str:
    """`host:port` of the other end, for log lines."""
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "unknown"


class WireStream:
    """Frames out (`send`, buffered; `drain` for back-pressure) and in (`recv`). One task reads
    and one thread writes at a time: the frame numbers are per direction."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        keys: FrameKeys,
        peer: str,
        max_frame_bytes: int,
    ) -> None:
        self.reader, self.writer, self.peer = reader, writer, peer
        self.max_frame_bytes = max_frame_bytes
        self._keys = keys
        self._num_sent = 0
        self._num_received = 0

    def send(self, message: Any) -> None:
        body = encode(message)
        if len(body) > MAX_FRAME_BYTES - auth.MAC_BYTES:
            raise ValueError(f"a {type(message).__name__} of {len(body)} bytes exceeds one frame")
        mac = auth.frame_mac(self._keys.send, self._num_sent, body)
        self._num_sent += 1
        header = _LENGTH.pack(auth.MAC_BYTES + len(body)) + mac
        if len(body) > _SPLIT_WRITE_BYTES:
            self.writer.write(header)
            self.writer.write(body)
        else:
            self.writer.write(header + body)

    async def drain(self) -> None:
        await self.writer.drain()

    async def recv(self) -> Any:
        """The next message. ChannelClosed at EOF or reset; WireError (closing the
        connection) when the frame is oversized, forged, replayed or not one of ours."""
        (n,) = _LENGTH.unpack(await self._read(_LENGTH.size))
        size = n - auth.MAC_BYTES
        if not 0 < size <= self.max_frame_bytes:
            self.close()
            raise WireError(
                f"a frame of {size} bytes (this connection takes 1..{self.max_frame_bytes})"
            )
        frame = await self._read(n)
        mac, body = frame[: auth.MAC_BYTES], memoryview(frame)[auth.MAC_BYTES :]
        if not auth.verify(auth.frame_mac(self._keys.recv, self._num_received, body), mac):
            self.close()
            raise WireError("a frame with a bad MAC (forged, replayed or out of order)")
        self._num_received += 1
        try:
            return decode(body)
        except WireError:
            self.close()
            raise

    async def _read(self, n: int) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            raise ChannelClosed(str(e) or type(e).__name__) from None

    def close(self) -> None:
        self.writer.close()


async def connect(
    host: str,
    port: int,
    key: WireKey,
    *,
    max_frame_bytes: int = MAX_CONTROL_FRAME_BYTES,
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
) -> WireStream:
    """Dial a rank port and prove both ends hold `key`. Raises OSError (refused, reset),
    TimeoutError, or WireError when the other end cannot prove it holds the key."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            client_nonce = auth.new_nonce()
            writer.write(auth.greeting(client_nonce))
            try:
                answer = await reader.readexactly(auth.CHALLENGE_BYTES)
            except asyncio.IncompleteReadError:
                raise ChannelClosed(f"{host}:{port} left in the handshake") from None
            try:
                server_nonce = auth.parse_greeting(answer[: auth.GREETING_BYTES])
            except ValueError as e:
                raise WireError(f"{host}:{port}: {e}") from None
            expected = auth.server_proof(key, client_nonce, server_nonce)
            if not auth.verify(expected, answer[auth.GREETING_BYTES :]):
                raise WireError(f"{host}:{port} failed authentication (not this cluster's key)")
            writer.write(auth.client_proof(key, client_nonce, server_nonce))
        except BaseException:
            writer.close()
            raise
    keys = auth.frame_keys(key, client_nonce, server_nonce, client=True)
    return WireStream(reader, writer, keys, f"{host}:{port}", max_frame_bytes)


async def accept(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    key: WireKey,
    *,
    max_frame_bytes: int = MAX_CONTROL_FRAME_BYTES,
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
) -> WireStream:
    """The server side of the handshake on a fresh connection. Raises WireError (with the
    reason, for the one log line) when the peer is not ours, and ChannelClosed when it left
    before saying anything. Reads nothing but the fixed-size handshake before the proof."""
    peer = peer_name(writer)
    try:
        async with asyncio.timeout(timeout_s):
            try:
                first = await reader.readexactly(auth.GREETING_BYTES)
            except asyncio.IncompleteReadError as e:
                if not e.partial:
                    raise ChannelClosed(f"{peer} left before the handshake") from None
                raise WireError(f"{len(e.partial)} bytes that are not a handshake") from None
            try:
                client_nonce = auth.parse_greeting(first)
            except ValueError as e:
                raise WireError(str(e)) from None
            server_nonce = auth.new_nonce()
            proof = auth.server_proof(key, client_nonce, server_nonce)
            writer.write(auth.greeting(server_nonce) + proof)
            try:
                got = await reader.readexactly(auth.PROOF_BYTES)
            except asyncio.IncompleteReadError:
                raise WireError("a peer that left without proving it holds the key") from None
    except TimeoutError:
        raise WireError(f"no handshake within {timeout_s:g} s") from None
    except (ConnectionError, OSError) as e:
        if isinstance(e, ChannelClosed):
            raise
        raise ChannelClosed(str(e) or type(e).__name__) from None
    if not auth.verify(auth.client_proof(key, client_nonce, server_nonce), got):
        raise WireError("failed authentication (not this cluster's key)")
    keys = auth.frame_keys(key, client_nonce, server_nonce, client=False)
    return WireStream(reader, writer, keys, peer, max_frame_bytes)
