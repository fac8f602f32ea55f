"""The two ways a rank-wire connection ends."""

from __future__ import annotations

__all__ = ["ChannelClosed", "WireError"]


class ChannelClosed(ConnectionError):
    """The peer closed the connection or died (EOF, reset)."""


class WireError(ChannelClosed):
    """The peer broke the wire's rules (failed authentication, a bad MAC, an unknown or
    malformed message, an oversized frame); the connection is closed. The message is one
    sentence naming what was wrong, never the secret or the frame's bytes."""
