"""What an attacker who reaches a rank port sends, with real sockets (blocking: run them from a
thread when an event loop shares this one). Each attack returns the `host:port` it came from,
which the rank's one log line for it names."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from workers.messages import Abort, Fetch, Hello
from workers.wire import WireKey, auth, connect
from workers.wire.codec import encode

__all__ = ["ATTACKS", "Tap", "attack", "record_kv_pull"]

TIMEOUT_S = 15.0


class Boom:
    """Unpickling this creates `path`: what the issue's crafted pickle did."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _send(host: str, port: int, data: bytes, answer: Callable[[bytes], bytes] | None = None) -> str:
    """Connect, send `data` (then `answer(what the server said)`, when given), half-close and
    read until the server closes the connection; -> this end's address."""
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as s:
        host_, port_ = s.getsockname()[:2]
        me = f"{host_}:{port_}"
        s.sendall(data)
        if answer is not None:
            got = b""
            while len(got) < auth.CHALLENGE_BYTES and (chunk := s.recv(4096)):
                got += chunk
            s.sendall(answer(got))
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):
            pass
    return me


def _frame(key: bytes, number: int, message: object) -> bytes:
    body = encode(message)
    mac = auth.frame_mac(key, number, body)
    return struct.pack(">I", len(mac) + len(body)) + mac + body


def _without_the_key(host: str, port: int) -> str:
    """Our handshake, spoken correctly by a peer that lacks the key: a guessed proof, then a
    frame MAC'd under keys of its own."""
    wrong = WireKey.generate("guess")
    nonce = auth.new_nonce()

    def prove(challenge: bytes) -> bytes:
        server_nonce = challenge[auth.GREETING_BYTES - auth.NONCE_BYTES : auth.GREETING_BYTES]
        keys = auth.frame_keys(wrong, nonce, server_nonce, client=True)
        proof = auth.client_proof(wrong, nonce, server_nonce)
        return proof + _frame(keys.send, 0, Hello("intruder")) + _frame(keys.send, 1, Abort("x"))

    return _send(host, port, auth.greeting(nonce), prove)


class Tap:
    """A TCP relay on loopback to `host:port` that records what the dialing side sends: the
    view of an attacker on the path."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.sent = bytearray()

    async def __aenter__(self) -> Tap:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _relay(self, c_reader, c_writer) -> None:
        s_reader, s_writer = await asyncio.open_connection(*self.target)

        async def pipe(reader, writer, record: bool) -> None:
            while data := await reader.read(1 << 16):
                if record:
                    self.sent += data
                writer.write(data)
            writer.close()

        await asyncio.gather(pipe(c_reader, s_writer, True), pipe(s_reader, c_writer, False))


def record_kv_pull(host: str, port: int, key: WireKey) -> bytes:
    """Everything a real KV pull sends a rank (handshake, Hello, Fetch), as a tap records it."""

    async def main() -> bytes:
        async with Tap(host, port) as tap:
            stream = await connect("127.0.0.1", tap.port, key)
            stream.send(Hello("kv:recorded"))
            stream.send(Fetch("no-such-kv"))
            await stream.recv()  # the answer: the rank has nothing under that key
            stream.close()
            return bytes(tap.sent)

    return asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))


# name -> (attack(host, port, key, marker file) -> attacker address, the reason the rank logs)
ATTACKS: dict[str, tuple[Callable[[str, int, WireKey, Path], str], str]] = {
    "pickle": (
        lambda h, p, k, f: _send(h, p, struct.pack(">I", 64) + pickle.dumps(Boom(f))),
        "bad greeting",
    ),
    "garbage": (lambda h, p, k, f: _send(h, p, os.urandom(256)), "bad greeting"),
    "huge-length": (lambda h, p, k, f: _send(h, p, b"\xff\xff\xff\xff"), "not a handshake"),
    "without-the-key": (lambda h, p, k, f: _without_the_key(h, p), "failed authentication"),
    "replayed-kv-pull": (
        lambda h, p, k, f: _send(h, p, record_kv_pull(h, p, k)),
        "failed authentication",
    ),
}


def attack(name: str, host: str, port: int, key: WireKey, marker: Path) -> tuple[str, str]:
    """Run attack `name` on `host:port`; -> (the attacker's address, the expected reason)."""
    run, why = ATTACKS[name]
    return run(host, port, key, marker), why
