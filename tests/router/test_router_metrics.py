"""The router's per-request metric bookkeeping (`servicer._Clock`) over a recording stand-in for
Ray's metrics: every token counted (in batches), TTFT once, ITL sampled one gap in ITL_SAMPLE."""

from __future__ import annotations

from router.metrics import ITL_SAMPLE
from router.servicer import TOKENS_BATCH, _Clock
from workers.messages import Delta


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def __getattr__(self, name: str):
        recorder = self

        class _Metric:
            def observe(self, value: float) -> None:
                recorder.calls.append((name, value))

            def inc(self, value: float, tags=None) -> None:
                recorder.calls.append((name, value))

        return _Metric()


def test_every_token_is_counted_and_the_itl_is_sampled():
    m = Recorder()
    clock = _Clock(m)
    n = 3 * TOKENS_BATCH + 5
    for i in range(n):
        last = i == n - 1
        clock.tokens(Delta("r", [7], "x", i + 1, finish_reason="length" if last else None))
    clock.finish(True)
    names = [name for name, _ in m.calls]
    assert names.count("ttft") == 1
    assert names.count("itl") == -(-(n - 1) // ITL_SAMPLE)  # gaps 0, ITL_SAMPLE, 2 x ...
    assert sum(v for name, v in m.calls if name == "tokens") == n
    assert names.count("tokens") == 4  # three full batches and the rest at the end
    assert m.calls[-1] == ("requests", 1)
