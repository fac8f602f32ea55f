"""Ranks behind their channels, driven by the router's request driver, in one process (real
TCP on loopback, real engines, no Ray): prefill -> KV pulled by the decode rank -> stream;
migration when a rank stops or its connection drops; cancellation and a closed router session
free every KV block and every handoff."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from router.channels import RankDirectory
from router.lifecycle import RequestFailed, RequestState, run_request
from tests.attacks import ATTACKS, attack
from workers.engine import EngineConfig, SamplingParams
from workers.engine.build import build_engine
from workers.rank import GangMember, start_rank
from workers.rank.channel import MAX_HANDSHAKES
from workers.wire import WireKey

WAIT_S = 60
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [40] * 13, [3, 1, 4, 1, 5, 9, 2, 6]]
KEY = WireKey.generate()


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("deepseek_v3")


@pytest.fixture(scope="module")
def offline(ckpt):
    return build_engine(ckpt).generate([(p, GREEDY) for p in PROMPTS])


def _rank(ckpt, stage: str, name: str):
    member = GangMember(stage, f"{stage}-gang-{name}", 0, 1, name)
    engine = build_engine(ckpt, config=EngineConfig(block_size=4))
    return start_rank(None, member, host="127.0.0.1", wire_key=KEY, engine=engine)


@pytest.fixture
def ranks(ckpt):
    made = {
        "p0": _rank(ckpt, "prefill", "p0"),
        "d0": _rank(ckpt, "decode", "d0"),
        "d1": _rank(ckpt, "decode", "d1"),
    }
    yield made
    for r in made.values():
        with contextlib.suppress(Exception):
            r.close(timeout_s=10)


async def _directory(ranks) -> RankDirectory:
    async def listed():
        return [r.address for r in ranks.values() if r.rank.failed is None]

    d = RankDirectory(listed, "router-test", KEY, block_size=4, rank_timeout_s=5)
    await d.refresh()
    return d


async def _run(directory, rid, prompt, params=GREEDY, on_delta=None):
    state = RequestState(rid, prompt, params)
    deltas = []
    async with contextlib.aclosing(run_request(directory, state)) as stream:
        async for d in stream:
            deltas.append(d)
            if on_delta is not None:
                await on_delta(d, deltas)
    return state, deltas


def _idle(ranks) -> bool:
    return all(
        r.rank.snapshot.load.kv_blocks_used == 0 and r.rank.snapshot.load.running_requests == 0
        for r in ranks.values()
    ) and all(len(r.channel.store) == 0 for r in ranks.values())


async def _until(cond, what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not cond():
            await asyncio.sleep(0.02)  # polls another thread's snapshot; bounded by WAIT_S
    assert cond(), what


def test_prefill_handoff_decode_equals_offline(ranks, offline):
    async def main():
        d = await _directory(ranks)
        try:
            return await asyncio.gather(*[_run(d, f"r{i}", p) for i, p in enumerate(PROMPTS)])
        finally:
            d.close()

    results = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    for (state, deltas), ref in zip(results, offline, strict=True):
        assert deltas[0].finish_reason == "handoff" and len(deltas[0].token_ids) == 1
        assert [t for x in deltas for t in x.token_ids] == ref.token_ids
        assert "".join(x.text for x in deltas) == ref.text
        assert deltas[-1].finish_reason == "length" and state.migrations == 0
    # the decode ranks pulled every handoff: the prefill rank holds none
    assert len(ranks["p0"].channel.store) == 0


@pytest.mark.parametrize("how", ["stop", "drop-connection"])
def test_a_lost_decode_rank_migrates_its_streams(ranks, offline, how):
    """The decode rank holding the streams goes away mid-stream: each stream continues on the
    other decode rank with exactly the tokens of a fault-free run."""

    async def main():
        d = await _directory(ranks)
        killed = asyncio.Event()

        async def kill_when_decoding(delta, deltas):
            if len(deltas) == 6 and not killed.is_set():
                killed.set()
                holder = next(ranks[k] for k in ("d0", "d1") if d.channels[k].requests)
                if how == "stop":
                    await asyncio.to_thread(holder.close, 10)
                else:
                    holder.channel.close()

        try:
            return await asyncio.gather(
                *[
                    _run(d, f"m{i}", p, on_delta=kill_when_decoding if i == 0 else None)
                    for i, p in enumerate(PROMPTS)
                ]
            )
        finally:
            d.close()

    results = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    assert any(state.migrations == 1 for state, _ in results)
    for (_, deltas), ref in zip(results, offline, strict=True):
        assert [t for x in deltas for t in x.token_ids] == ref.token_ids
        assert "".join(x.text for x in deltas) == ref.text


def test_a_rank_missing_from_one_listing_keeps_its_channel(ranks, offline):
    """An entry that lapses while its rank serves (a late report, a wiped registry being
    refilled) neither closes the rank's channel nor keeps the router from using it."""

    async def main():
        shown = dict(ranks)

        async def listed():
            return [r.address for r in shown.values()]

        d = RankDirectory(listed, "router-test", KEY, block_size=4, rank_timeout_s=5)
        await d.refresh()
        before = dict(d.channels)
        del shown["d0"], shown["d1"]  # only the prefill rank listed for one poll
        await d.refresh()
        assert d.channels == before and all(ch.alive for ch in d.channels.values())
        shown.update(ranks)
        await d.refresh()
        try:
            return await _run(d, "r0", PROMPTS[0])
        finally:
            d.close()

    state, deltas = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    assert [t for x in deltas for t in x.token_ids] == offline[0].token_ids
    assert state.migrations == 0


def test_cancel_and_a_closed_session_free_everything(ranks):
    async def main():
        d = await _directory(ranks)
        long = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)

        async def cancel_after(n):
            async def hook(delta, deltas):
                if len(deltas) >= n:
                    raise asyncio.CancelledError

            return hook

        tasks = [
            asyncio.create_task(_run(d, f"c{i}", [7] * (5 + i), long, await cancel_after(i + 1)))
            for i in range(4)
        ]
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await _until(lambda: _idle(ranks), "KV back to 0 after cancels")
        # a router that goes away with requests in flight: its sessions close, ranks abort
        for i in range(3):
            asyncio.create_task(_run(d, f"o{i}", [9] * 6, long))
        await _until(lambda: sum(len(c.requests) for c in d.channels.values()) == 3, "running")
        d.close()
        await _until(lambda: _idle(ranks), "KV back to 0 after the router left")

    asyncio.run(asyncio.wait_for(main(), WAIT_S))


def test_bad_input_at_the_rank_is_a_request_error(ranks):
    async def main():
        d = await _directory(ranks)
        try:
            with pytest.raises(RequestFailed) as err:
                await _run(d, "bad", [10**7])
            return err.value
        finally:
            d.close()

    err = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    assert err.status == "INVALID_ARGUMENT" and "vocabulary" in str(err)


def test_beyond_max_migrations_the_request_is_unavailable(ranks):
    """router.max_migrations = 0: the first lost rank ends the request with UNAVAILABLE and a
    sentence naming the limit; the rank it would have moved to holds nothing."""

    async def main():
        d = await _directory(ranks)
        state = RequestState("limited", PROMPTS[0], GREEDY, max_migrations=0)
        try:
            with pytest.raises(RequestFailed) as err:
                async with contextlib.aclosing(run_request(d, state)) as stream:
                    async for _ in stream:
                        if len(state.delivered) == 3:  # decoding now: its rank goes away
                            holder = next(ranks[k] for k in ("d0", "d1") if d.channels[k].requests)
                            holder.channel.close()
            return err.value
        finally:
            d.close()

    err = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    assert err.status == "UNAVAILABLE" and "router.max_migrations (0)" in str(err)


LONG = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)


def test_attacks_on_live_rank_ports_change_nothing(ranks, ckpt, caplog, tmp_path):
    """While streams run, every attack of tests/attacks.py on every rank's port (router
    sessions and KV pulls share it): each connection is closed with one warning naming its
    address; nothing runs, no rank fails, every stream is exact and no handoff is lost."""
    reference = build_engine(ckpt).generate([(p, LONG) for p in PROMPTS])
    marker = tmp_path / "pwned"
    attempts: list[tuple[str, str]] = []  # (the start of the rank's line, the reason)

    def attack_every_port() -> None:
        for r in ranks.values():
            port = r.address.port
            for name in ATTACKS:
                address, why = attack(name, "127.0.0.1", port, KEY, marker)
                attempts.append((f"rank port {port} closed the connection from {address}:", why))

    async def main():
        d = await _directory(ranks)
        started = asyncio.Event()

        async def on_delta(delta, deltas):
            started.set()

        try:
            streams = [
                asyncio.create_task(_run(d, f"a{i}", p, LONG, on_delta))
                for i, p in enumerate(PROMPTS)
            ]
            await started.wait()
            await asyncio.to_thread(attack_every_port)
            assert not any(t.done() for t in streams), "the attacks ran while streams ran"
            return await asyncio.gather(*streams)
        finally:
            d.close()

    with caplog.at_level("WARNING", logger="moe_cluster.rank"):
        results = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    assert not marker.exists()
    assert all(r.rank.failed is None for r in ranks.values())
    for (state, deltas), ref in zip(results, reference, strict=True):
        assert [t for x in deltas for t in x.token_ids] == ref.token_ids
        assert state.migrations == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "moe_cluster.rank"]
    assert len(attempts) == len(ranks) * len(ATTACKS)
    for start, why in attempts:
        mine = [line for line in lines if line.startswith(start)]
        assert len(mine) == 1 and why in mine[0], (start, why, mine)
    assert len(lines) == len(attempts)  # nothing else complained
    asyncio.run(_until(lambda: _idle(ranks), "KV and handoffs back to 0"))


def test_a_router_without_the_key_gets_no_channel_and_says_so_once(ranks, caplog):
    async def main():
        async def listed():
            return [ranks["d0"].address]

        d = RankDirectory(listed, "router-elsewhere", WireKey.generate(), rank_timeout_s=5)
        await d.refresh()
        await d.refresh()
        return dict(d.channels)

    def lines(logger: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == logger]

    with caplog.at_level("WARNING"):
        channels = asyncio.run(asyncio.wait_for(main(), WAIT_S))
        # the rank notices each refused dialer leave on its own thread
        asyncio.run(_until(lambda: len(lines("moe_cluster.rank")) >= 2, "two lines"))
    assert channels == {}
    router = lines("moe_cluster.router")
    assert len(router) == 1 and "cannot authenticate with decode rank d0" in router[0]
    rank = lines("moe_cluster.rank")
    assert len(rank) == 2 and all("without proving it holds the key" in x for x in rank)


def test_a_flood_of_silent_connections_is_capped_and_the_rank_serves_on(ranks, offline, caplog):
    """MAX_HANDSHAKES connections that never say a word hold the rank's handshake slots; one
    more is closed at once with one line; once they leave, routers connect and stream as ever."""
    d0 = ranks["d0"]
    host, port = "127.0.0.1", d0.address.port
    silent = [socket.create_connection((host, port), timeout=WAIT_S) for _ in range(MAX_HANDSHAKES)]
    try:
        asyncio.run(_until(lambda: d0.channel._handshakes == MAX_HANDSHAKES, "slots taken"))
        with (
            caplog.at_level("WARNING", logger="moe_cluster.rank"),
            socket.create_connection((host, port), timeout=WAIT_S) as extra,
        ):
            me = "{}:{}".format(*extra.getsockname()[:2])
            assert extra.recv(1) == b""  # closed unanswered
    finally:
        for s in silent:
            s.close()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "moe_cluster.rank"]
    assert f"from {me}: {MAX_HANDSHAKES} connections already authenticating" in line
    asyncio.run(_until(lambda: d0.channel._handshakes == 0, "slots free again"))

    async def main():
        d = await _directory(ranks)
        try:
            return await _run(d, "after", PROMPTS[0])
        finally:
            d.close()

    _, deltas = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    assert [t for x in deltas for t in x.token_ids] == offline[0].token_ids
