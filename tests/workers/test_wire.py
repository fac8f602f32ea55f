"""The rank wire (`workers/wire`) on real loopback sockets: the handshake, frame MACs, limits and
the schema'd codec, each rule broken once."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pickle
import struct

import pytest
import torch

from tests.attacks import Tap
from workers.engine.engine import Resume
from workers.engine.handoff import KVHandoff, KVSpec
from workers.engine.params import SamplingParams
from workers.messages import (
    Abort,
    Delta,
    DrainRank,
    Fetch,
    Hello,
    KVData,
    KVRef,
    RankLoad,
    RankStatus,
    Release,
    StepReport,
    Submit,
    WireTensor,
)
from workers.wire import ChannelClosed, WireError, WireKey, accept, auth, connect
from workers.wire.codec import MESSAGE_TYPES, decode, encode
from workers.wire.kv import from_payload, to_payload

KEY = WireKey.generate("test-app")
WAIT_S = 20


class _Boom:
    """Unpickling this runs a command (what an attacker would send)."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/moe-wire-pwned",))


def _status() -> RankStatus:
    return RankStatus(
        "decode", "g", 0, 2, "r", 3, 10, 5, 64, 12.5, 100, [[1, 2], [3, 4]], [1, 3], 1.5
    )


MESSAGES = [
    Hello("router-1"),
    Submit(
        "r1",
        [1, 2, 3],
        SamplingParams(max_tokens=9, temperature=0.5, seed=-7, stop=("x", "yz"), logprobs=2),
        resume=Resume([4, 5], 3, [{4: -0.25, 9: -1.5}, {5: -0.5}]),
        kv=KVRef("10.0.0.2", 4242, "r1/0", 1024),
    ),
    Abort("r1"),
    Release("r1/0"),
    DrainRank(2.5),
    Fetch("r1/0"),
    KVData("r1/0", None),
    StepReport(
        RankLoad("r", 5, 3, 64, 2, True, frozenset({7, 11})),
        4,
        [Delta("r1", [5], "a", 2), Delta.ended("r2", "migrate", "its rank was lost")],
        _status(),
    ),
]


def test_every_message_type_round_trips_and_is_covered():
    assert {type(m) for m in MESSAGES} == set(MESSAGE_TYPES)
    for m in MESSAGES:
        assert decode(encode(m)) == m


def test_a_pickle_or_a_body_of_another_shape_is_refused_not_run():
    with pytest.raises(WireError, match="unknown type"):
        decode(pickle.dumps(_Boom()))  # protocol 5 starts with 0x80: no such type byte
    with pytest.raises(WireError, match="Submit frame that does not match its schema"):
        decode(b"\x02" + encode(Abort("x"))[1:])  # an Abort's body sent as a Submit
    with pytest.raises(WireError, match="empty"):
        decode(b"")
    assert not os.path.exists("/tmp/moe-wire-pwned")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_kv_handoff_travels_as_raw_bytes_and_is_checked_against_the_layout(dtype):
    kv = [torch.randn(5, 3, 4).to(dtype) for _ in range(2)]
    h = KVHandoff("r", [1, 2, 3, 4, 5], 9, 1, SamplingParams(max_tokens=4), kv, None)
    layout = KVSpec(2, (3, 4), dtype, max_tokens=64)
    got = from_payload(decode(encode(KVData("k", to_payload(h)))).handoff, layout)
    assert got.prompt_token_ids == h.prompt_token_ids and got.params == h.params
    assert all(torch.equal(a, b) for a, b in zip(got.kv, kv, strict=True))

    payload = to_payload(h)
    wrong = [
        (KVSpec(3, (3, 4), dtype, 64), "2 layers, the model has 3"),
        (KVSpec(2, (3, 5), dtype, 64), r"shape \[5, 3, 4\], this rank expects \[5, 3, 5\]"),
        (KVSpec(2, (3, 4), torch.float16, 64), "this rank holds torch.float16"),
        (KVSpec(2, (3, 4), dtype, 5), "5 prompt tokens"),
    ]
    for layout, why in wrong:
        with pytest.raises(WireError, match=why):
            from_payload(payload, layout)
    short = WireTensor(payload.kv[0].dtype, payload.kv[0].shape, b"\0" * 8)
    with pytest.raises(WireError, match="8 bytes for shape"):
        from_payload(
            dataclasses.replace(payload, kv=[short, short]), KVSpec(2, (3, 4), dtype, 64)
        )


def test_the_key_never_shows():
    assert "secret" in repr(KEY) and KEY._key.hex() not in repr(KEY) + str(KEY)


# --- live connections ------------------------------------------------------------------------


class _Server:
    """A port that accepts wire connections with `key` and records what it received and why
    it closed each connection."""

    def __init__(self, key: WireKey, max_frame_bytes: int = 1 << 20) -> None:
        self.key, self.max_frame_bytes = key, max_frame_bytes
        self.timeout_s = 5.0
        self.received: list[object] = []
        self.errors: list[str] = []
        self.closed = asyncio.Event()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _handle(self, reader, writer):
        try:
            stream = await accept(
                reader,
                writer,
                self.key,
                max_frame_bytes=self.max_frame_bytes,
                timeout_s=self.timeout_s,
            )
            while True:
                msg = await stream.recv()
                self.received.append(msg)
                stream.send(msg)  # echo
        except WireError as e:
            self.errors.append(str(e))
        except ChannelClosed:
            pass
        finally:
            writer.close()
            self.closed.set()


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


def test_both_ends_prove_the_key_then_frames_flow_both_ways():
    async def main():
        async with _Server(KEY) as srv:
            stream = await connect("127.0.0.1", srv.port, KEY)
            for m in MESSAGES:
                stream.send(m)
            echoed = [await stream.recv() for _ in MESSAGES]
            stream.close()
            return srv.received, echoed

    received, echoed = _run(main())
    assert received == MESSAGES and echoed == MESSAGES


def test_a_peer_without_the_key_is_refused_and_cannot_fool_the_dialer():
    async def main():
        async with _Server(KEY) as srv:
            with pytest.raises(WireError, match="failed authentication"):
                await connect("127.0.0.1", srv.port, WireKey.generate("test-app"))
            await srv.closed.wait()
            return srv.errors, srv.received

    errors, received = _run(main())
    # the dialer gives up first (the server's proof is wrong for its key); the server logs
    # that the peer left without proving itself
    assert received == [] and len(errors) == 1 and "proving" in errors[0]


async def _raw(port: int, data: bytes, half_close: bool = True) -> bytes:
    """Send `data` (then nothing more), read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if half_close:
        writer.write_eof()
    await writer.drain()
    got = await reader.read()
    writer.close()
    return got


@pytest.mark.parametrize(
    "attack, why",
    [
        (lambda: struct.pack(">I", 100) + pickle.dumps(_Boom()), "bad greeting"),
        (lambda: os.urandom(200), "bad greeting"),
        (lambda: b"\xff\xff\xff\xff", "bytes that are not a handshake"),
        (lambda: b"MOEW\x00\x07" + os.urandom(32), "wire version 7"),
    ],
    ids=["pickle", "garbage", "huge-length", "other-version"],
)
def test_bytes_that_are_not_a_handshake_are_refused_unread(attack, why):
    async def main():
        async with _Server(KEY) as srv:
            await _raw(srv.port, attack())
            await srv.closed.wait()
            return srv.errors, srv.received

    errors, received = _run(main())
    assert received == [] and len(errors) == 1 and why in errors[0]
    assert not os.path.exists("/tmp/moe-wire-pwned")


def test_a_peer_that_stalls_in_the_handshake_is_dropped():
    async def main():
        async with _Server(KEY) as srv:
            srv.timeout_s = 0.2
            await _raw(srv.port, b"MOEW", half_close=False)  # and then nothing
            await srv.closed.wait()
            return srv.errors

    assert _run(main()) == ["no handshake within 0.2 s"]


def test_a_recorded_session_replayed_is_refused():
    """Everything a real client sent (handshake and frames), replayed byte for byte on a new
    connection: the server's fresh nonce makes the recorded proof worthless."""

    async def main():
        async with _Server(KEY) as srv, Tap("127.0.0.1", srv.port) as tap:
            stream = await connect("127.0.0.1", tap.port, KEY)
            stream.send(Fetch("secret-kv"))
            assert await stream.recv() == Fetch("secret-kv")
            stream.close()
            await srv.closed.wait()
            srv.closed.clear()
            await _raw(srv.port, bytes(tap.sent))
            await srv.closed.wait()
            return srv.errors, srv.received

    errors, received = _run(main())
    assert received == [Fetch("secret-kv")]  # the real one only
    assert len(errors) == 1 and "failed authentication" in errors[0]


def _frame(stream, body: bytes, number: int, flip: bool = False) -> bytes:
    """A frame as `stream` would send it as its `number`-th, optionally with a bit flipped."""
    mac = auth.frame_mac(stream._keys.send, number, body)
    if flip:
        body = body[:-1] + bytes([body[-1] ^ 1])
    return struct.pack(">I", len(mac) + len(body)) + mac + body


@pytest.mark.parametrize("tamper", ["replay", "flip", "reorder"])
def test_a_frame_replayed_altered_or_reordered_inside_a_session_closes_it(tamper):
    async def main():
        async with _Server(KEY) as srv, Tap("127.0.0.1", srv.port) as tap:
            stream = await connect("127.0.0.1", tap.port, KEY)
            stream.send(Abort("a"))
            assert await stream.recv() == Abort("a")  # the tap has seen all of it now
            recorded = bytes(tap.sent[auth.GREETING_BYTES + auth.PROOF_BYTES :])
            body = encode(Abort("b"))
            bad = {
                "replay": recorded,  # frame 0's bytes again as frame 1
                "flip": _frame(stream, body, 1, flip=True),
                "reorder": _frame(stream, body, 2),  # frame 2 where 1 is due
            }[tamper]
            stream.writer.write(bad)
            await srv.closed.wait()
            return srv.errors, srv.received

    errors, received = _run(main())
    assert received == [Abort("a")] and len(errors) == 1 and "bad MAC" in errors[0]


def test_an_oversized_frame_is_refused_before_it_is_read():
    async def main():
        async with _Server(KEY, max_frame_bytes=1024) as srv:
            stream = await connect("127.0.0.1", srv.port, KEY)
            stream.send(Submit("big", list(range(2000)), SamplingParams()))
            await srv.closed.wait()
            with pytest.raises(ChannelClosed):
                await stream.recv()
            return srv.errors, srv.received

    errors, received = _run(main())
    assert received == [] and len(errors) == 1 and "takes 1..1024" in errors[0]


def test_an_authenticated_peer_sending_an_unknown_type_is_disconnected():
    async def main():
        async with _Server(KEY) as srv:
            stream = await connect("127.0.0.1", srv.port, KEY)
            # a well-MAC'd frame whose body is a pickle: only an insider could send it
            stream.writer.write(_frame(stream, pickle.dumps(_Boom()), 0))
            await srv.closed.wait()
            return srv.errors

    errors = _run(main())
    assert len(errors) == 1 and "unknown type 128" in errors[0]
    assert not os.path.exists("/tmp/moe-wire-pwned")
