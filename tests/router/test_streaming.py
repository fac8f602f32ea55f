"""router/streaming.py: deltas -> client messages under stream_interval (pure, no server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from router.streaming import messages
from workers.messages import Delta


def _deltas(texts: list[str], *, handoff_first: bool = True, reason: str = "length"):
    """One token per delta (id 100 + i, the given text), the first a handoff, the last finished."""
    out = []
    for i, text in enumerate(texts):
        finish = None
        if i == 0 and handoff_first:
            finish = "handoff"
        if i == len(texts) - 1:
            finish = reason
        out.append(Delta("r", [100 + i], text, i + 1, finish, [{100 + i: -0.5 - i}]))
    return out


async def _collect(deltas: list[Delta], interval: int) -> list[Delta]:
    async def source() -> AsyncIterator[Delta]:
        for d in deltas:
            yield d

    return [m async for m in messages(source(), interval)]


def _run(deltas: list[Delta], interval: int) -> list[Delta]:
    return asyncio.run(_collect(deltas, interval))


TEXTS = ["a", "b", "", "日", "c", "d", "e", "f", "g", "h"]  # "" + "日": a character split in two


@pytest.mark.parametrize("interval", [1, 2, 3, 4, 16])
def test_messages_keep_every_token_in_order_and_end_with_the_finish(interval):
    deltas = _deltas(TEXTS)
    msgs = _run(deltas, interval)
    assert [t for m in msgs for t in m.token_ids] == [d.token_ids[0] for d in deltas]
    assert "".join(m.text for m in msgs) == "".join(TEXTS)
    assert [lp for m in msgs for lp in m.logprobs] == [d.logprobs[0] for d in deltas]
    # the first token leaves at once, then `interval` tokens per message, the rest at the end
    sizes = [len(m.token_ids) for m in msgs]
    rest = len(TEXTS) - 1
    assert sizes == [1] + [interval] * (rest // interval) + (
        [rest % interval] if rest % interval else []
    )
    assert all(m.finish_reason in (None, "handoff") for m in msgs[:-1])  # handoff: not an end
    last = msgs[-1]
    assert last.finish_reason == "length" and last.num_completion_tokens == len(TEXTS)


def test_a_finish_without_new_tokens_is_still_sent():
    deltas = _deltas(["a", "b", "c"], handoff_first=False, reason=None)
    deltas.append(Delta("r", [], "", 3, "stop"))  # e.g. a stop string held back then cut
    msgs = _run(deltas, 4)
    assert [m.token_ids for m in msgs] == [[100], [101, 102]]
    assert msgs[-1].finish_reason == "stop"


def test_a_handoff_alone_is_the_first_message_not_the_end():
    msgs = _run(_deltas(["x", "y"]), 8)
    assert [m.token_ids for m in msgs] == [[100], [101]]
    assert msgs[0].finish_reason == "handoff" and msgs[1].finish_reason == "length"
