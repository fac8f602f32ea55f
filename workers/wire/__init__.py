"""The rank wire: how routers and ranks (and ranks pulling KV from each other) talk over TCP.

Every connection proves both ends hold the cluster's `WireKey` before a message is read
(`auth.py`), every frame carries a MAC (`stream.py`), and messages are schema'd msgpack of the
dataclasses in `workers/messages.py` (`codec.py`), with tensors as raw bytes checked against
the model's shapes (`kv.py`). Nothing read from a socket is unpickled.
"""

from workers.wire.auth import WireKey
from workers.wire.errors import ChannelClosed, WireError
from workers.wire.stream import (
    HANDSHAKE_TIMEOUT_S,
    MAX_CONTROL_FRAME_BYTES,
    MAX_FRAME_BYTES,
    WireStream,
    accept,
    connect,
    peer_name,
)

__all__ = [
    "HANDSHAKE_TIMEOUT_S",
    "MAX_CONTROL_FRAME_BYTES",
    "MAX_FRAME_BYTES",
    "ChannelClosed",
    "WireError",
    "WireKey",
    "WireStream",
    "accept",
    "connect",
    "peer_name",
]
