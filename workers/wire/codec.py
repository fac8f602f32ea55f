"""The rank wire's message encoding: one type byte, then the message as msgpack in the schema
of its dataclass (`workers/messages.py`). Decoding builds only the declared types, with every
field's type checked (msgspec): no class named by the sender, no code run, nothing unpickled.

A body whose type byte is not in `MESSAGE_TYPES`, or that does not match its type's schema,
raises `WireError` naming what was wrong; the connection that carried it is closed.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from workers.messages import (
    Abort,
    DrainRank,
    Fetch,
    Hello,
    KVData,
    Release,
    StepReport,
    Submit,
)
from workers.wire.errors import WireError

__all__ = ["MESSAGE_TYPES", "decode", "encode"]

# the type byte of a message is its position here + 1: append new types, never reorder
MESSAGE_TYPES: tuple[type, ...] = (
    Hello,
    Submit,
    Abort,
    Release,
    DrainRank,
    Fetch,
    KVData,
    StepReport,
)
_TYPE_BYTE = {t: i for i, t in enumerate(MESSAGE_TYPES, 1)}


@functools.cache
def _encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


@functools.cache
def _decoder(type_byte: int) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(MESSAGE_TYPES[type_byte - 1])


def encode(message: Any) -> bytes:
    """Type byte + msgpack of `message` (one of MESSAGE_TYPES)."""
    type_byte = _TYPE_BYTE.get(type(message))
    if type_byte is None:
        raise TypeError(f"{type(message).__name__} is not a rank wire message")
    return type_byte.to_bytes(1, "big") + _encoder().encode(message)


def decode(body: bytes | memoryview) -> Any:
    """The message in `body`; WireError when it is not one of ours."""
    if not body:
        raise WireError("an empty frame")
    type_byte = body[0]
    if not 1 <= type_byte <= len(MESSAGE_TYPES):
        raise WireError(f"a frame of unknown type {type_byte}")
    try:
        return _decoder(type_byte).decode(memoryview(body)[1:])
    except msgspec.DecodeError as e:  # ValidationError included
        name = MESSAGE_TYPES[type_byte - 1].__name__
        raise WireError(f"a {name} frame that does not match its schema ({e})") from None
