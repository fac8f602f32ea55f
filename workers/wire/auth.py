"""Who may speak on a rank port: both ends prove they hold the cluster's wire key before a
single message is read, and every frame after that carries a MAC under keys of that connection
alone. Pure functions over bytes; `stream.py` runs them on a socket.

    client -> server   b"MOEW" | version (u16) | client nonce cn (32 bytes)
    server -> client   b"MOEW" | version (u16) | server nonce sn (32) | HMAC(K, "server" cn sn)
    client -> server   HMAC(K, "client" cn sn)
    frame keys         client->server HMAC(K, "c2s" cn sn), server->client HMAC(K, "s2c" cn sn)
    frame MAC          BLAKE2b-128 keyed by the direction's key over (frame number u64 | body)

Hazards it closes: nothing of K crosses the network; both nonces are fresh per connection, so
no proof or frame recorded on one connection verifies on another (replay), a frame cannot be
sent back to its sender (one key per direction: reflection), and each direction numbers its
frames without sending the number, so a replayed, dropped or reordered frame fails its MAC.
Comparisons are constant-time (`hmac.compare_digest`). Not encryption: a sniffer of the pod
network reads prompts and tokens (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

__all__ = [
    "CHALLENGE_BYTES",
    "GREETING_BYTES",
    "MAC_BYTES",
    "NONCE_BYTES",
    "PROOF_BYTES",
    "WIRE_VERSION",
    "FrameKeys",
    "WireKey",
    "client_proof",
    "frame_keys",
    "frame_mac",
    "greeting",
    "new_nonce",
    "parse_greeting",
    "server_proof",
    "verify",
]

MAGIC = b"MOEW"
WIRE_VERSION = 1  # bumped when the handshake or the framing changes
NONCE_BYTES = 32
PROOF_BYTES = 32
MAC_BYTES = 16
GREETING_BYTES = len(MAGIC) + 2 + NONCE_BYTES  # what each side sends first
CHALLENGE_BYTES = GREETING_BYTES + PROOF_BYTES  # the server's answer: its greeting + proof


class WireKey:
    """The cluster's wire secret, as a 32-byte HMAC key derived from the material it is given
    (Ray's token, or a generated secret) and the application it serves, so two applications on
    one Ray cluster never accept each other's frames. Its repr never shows the secret."""

    __slots__ = ("_key",)

    def __init__(self, material: bytes, context: str = "") -> None:
        if len(material) < 16:
            raise ValueError("a wire key needs at least 16 bytes of secret material")
        self._key = hmac.digest(material, b"moe-cluster wire v1|" + context.encode(), "sha256")

    @classmethod
    def generate(cls, context: str = "") -> WireKey:
        """A fresh random key (a deployment without Ray's token, a test)."""
        return cls(secrets.token_bytes(32), context)

    def mac(self, *parts: bytes) -> bytes:
        return hmac.digest(self._key, b"|".join(parts), "sha256")

    def __repr__(self) -> str:
        return "WireKey(<secret>)"


@dataclass(frozen=True)
class FrameKeys:
    """One connection's frame MAC keys, as seen by one end."""

    send: bytes
    recv: bytes


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def greeting(nonce: bytes) -> bytes:
    return MAGIC + WIRE_VERSION.to_bytes(2, "big") + nonce


def parse_greeting(data: bytes) -> bytes:
    """The nonce of a greeting; ValueError with the reason when it is not ours."""
    if len(data) != GREETING_BYTES or data[: len(MAGIC)] != MAGIC:
        raise ValueError("not a moe-cluster wire peer (bad greeting)")
    version = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 2], "big")
    if version != WIRE_VERSION:
        raise ValueError(f"wire version {version}, this end speaks {WIRE_VERSION}")
    return data[len(MAGIC) + 2 :]


def server_proof(key: WireKey, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return key.mac(b"server", client_nonce, server_nonce)


def client_proof(key: WireKey, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return key.mac(b"client", client_nonce, server_nonce)


def verify(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)


def frame_keys(
    key: WireKey, client_nonce: bytes, server_nonce: bytes, *, client: bool
) -> FrameKeys:
    c2s = key.mac(b"c2s", client_nonce, server_nonce)
    s2c = key.mac(b"s2c", client_nonce, server_nonce)
    return FrameKeys(send=c2s, recv=s2c) if client else FrameKeys(send=s2c, recv=c2s)


def frame_mac(key: bytes, number: int, body: bytes | memoryview) -> bytes:
    """The MAC of the `number`-th frame of one direction (numbers start at 0)."""
    h = hashlib.blake2b(number.to_bytes(8, "big"), key=key, digest_size=MAC_BYTES)
    h.update(body)
    return h.digest()
