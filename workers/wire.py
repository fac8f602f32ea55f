"""Framing of rank-channel messages (`workers/messages.py`) on an asyncio stream: a 4-byte
big-endian length, then a pickle (protocol 5) of one message.

Pickle is for peers inside the cluster network only, like Ray's own ports: the channel port of a
rank must not be reachable from outside the cluster (README "Ports").
"""

from __future__ import annotations

import asyncio
import pickle
import struct

__all__ = ["MAX_FRAME_BYTES", "ChannelClosed", "read_frame", "write_frame", "encode"]

MAX_FRAME_BYTES = 1 << 31  # a KV pull of a long prompt is the largest frame
_HEADER = struct.Struct(">I")


class ChannelClosed(ConnectionError):
    """The peer closed the connection or died (EOF, reset)."""


def encode(message: object) -> bytes:
    body = pickle.dumps(message, protocol=5)
    if len(body) >= MAX_FRAME_BYTES:
        raise ValueError(f"a {type(message).__name__} of {len(body)} bytes exceeds one frame")
    return _HEADER.pack(len(body)) + body


def write_frame(writer: asyncio.StreamWriter, message: object) -> None:
    """Queue one message (the caller drains when it wants back-pressure)."""
    writer.write(encode(message))


async def read_frame(reader: asyncio.StreamReader) -> object:
    try:
        header = await reader.readexactly(_HEADER.size)
        (n,) = _HEADER.unpack(header)
        return pickle.loads(await reader.readexactly(n))
    except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
        raise ChannelClosed(str(e) or type(e).__name__) from None
