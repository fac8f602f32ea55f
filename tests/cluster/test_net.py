"""cluster.net.free_port: a port its owner can still bind a moment later."""

from __future__ import annotations

from cluster import net


def test_free_port_is_outside_the_ephemeral_range_and_bindable():
    """Ports the OS hands out to port-0 binds and outgoing connections (Ray's processes make
    many) cannot take a port picked outside that range before its owner binds it."""
    ephemeral = net._ephemeral_ports()
    for _ in range(20):
        port = net.free_port()
        assert port not in ephemeral
        assert net._bindable("127.0.0.1", port)


def test_free_port_falls_back_to_the_os_when_the_quiet_range_is_taken(monkeypatch):
    monkeypatch.setattr(net, "_bindable", lambda host, port: False)
    port = net.free_port()
    assert 0 < port < 65536
