"""The rank -> router hop alone: CPU per streamed token of one rank channel, both ends summed.

A `ChannelServer` (the rank's end: encoding, framing with a MAC, one `StepReport` per step per
router) publishes steps of S streams, one token each, to a `RankChannel` (the router's end:
reading, checking the MAC, decoding, fanning each delta out to its request's queue, a consumer
per request) over real TCP on loopback, in one process, so `time.process_time()` sums both ends.
The rank's engine is left out on purpose (this measures the hop, not the model): the channel
server is given a stand-in with the attributes it reads.

    .venv/bin/python -m bench.channel                 # --streams 1,8,32,128 --steps 2000
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from types import SimpleNamespace

from router.channels import RankChannel
from workers.engine import SamplingParams
from workers.messages import Delta, RankAddress, RankLoad, Submit
from workers.rank.channel import ChannelServer, listen_socket
from workers.rank.transport import KVStore, PeerKVTransport
from workers.wire import WireKey


class _RankStandIn(SimpleNamespace):
    """What ChannelServer reads of a Rank; submits are recorded, nothing is computed."""

    def submit(self, session, msg, kv=None):
        self.sessions.add(session)

    def abort(self, request_id):
        pass

    def end_session(self, session):
        pass

    def drain(self, grace_s):
        pass


async def _run(streams: int, steps: int) -> tuple[float, float, int]:
    host = "127.0.0.1"
    sock: socket.socket = listen_socket(host)
    port = sock.getsockname()[1]
    load = RankLoad("bench", running_requests=streams)
    rank = _RankStandIn(
        member=SimpleNamespace(replica_id="bench"),
        snapshot=SimpleNamespace(load=load, status=None),
        sessions=set(),
    )
    key = WireKey.generate()
    transport = PeerKVTransport(KVStore(), host, port, "bench", key)
    server = ChannelServer(rank, transport, sock, key).start()
    address = RankAddress("bench", "decode", "g", 0, 1, host, port)
    channel = RankChannel(address, "router-bench", rank_timeout_s=30, key=key)
    await channel.connect()
    queues = [asyncio.Queue() for _ in range(streams)]
    params = SamplingParams(max_tokens=steps + 1)
    for i, q in enumerate(queues):
        channel.submit(Submit(f"r{i}", [1, 2, 3], params), q, kv_blocks=1)
    while not rank.sessions:
        await asyncio.sleep(0.001)
    (session,) = rank.sessions
    received = 0

    async def consume(q: asyncio.Queue) -> None:
        nonlocal received
        while True:
            d = await q.get()
            received += len(d.token_ids)
            if d.finished:
                return

    consumers = [asyncio.create_task(consume(q)) for q in queues]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for step in range(steps):
        last = step == steps - 1
        deltas = [
            Delta(f"r{i}", [100 + step % 50], " tok", step + 1, "length" if last else None)
            for i in range(streams)
        ]
        server._publish_threadsafe({session: deltas}, load, {session: streams})
        if step % 16 == 15:
            await asyncio.sleep(0)  # let the router end read, as a real step interval would
    await asyncio.wait_for(asyncio.gather(*consumers), 120)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    channel.close()
    server.close()
    return cpu, wall, received


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="1,8,32,128")
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    print("| streams | tokens | CPU s | CPU µs per token (both ends) | tokens/s of one core |")
    print("|---:|---:|---:|---:|---:|")
    for s in (int(x) for x in args.streams.split(",")):
        cpu, wall, n = asyncio.run(_run(s, args.steps))
        print(f"| {s} | {n} | {cpu:.2f} | {cpu / n * 1e6:.1f} | {n / cpu:,.0f} |")


if __name__ == "__main__":
    main()
