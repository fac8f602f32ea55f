"""Two expert-parallel ranks, each driven by its `Rank` loop in lockstep (the serving shape):
requests sent to one rank only stream the single-engine tokens while the idle peer runs empty
steps. Two ways to end: "hard" (rank 0's stop ends both loops at the same step) and "graceful"
(rank 1 asks to leave first, as a gang being scaled away does, and keeps stepping so rank 0's
requests finish; the group stops once rank 0 leaves too). Idle, the gang sleeps on its doorbell
instead of polling (no agreements while nothing happens), and a request sent to a sleeping gang
still runs at once."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest

from tests.spawn import run_spawned

WORLD = 2
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [40] * 12]
JOIN_TIMEOUT_S = 240
IDLE_WINDOW_S = 1.0  # polling peers met every <= 50 ms: ~20 agreements in such a window


TAIL_S = 0.02  # how much later than rank 0 rank 1 finishes each step


class _RecordingTurn:
    """Stands in for a `CoreTurn`: records when each step's turn is taken and given back
    (CLOCK_MONOTONIC: comparable across the processes)."""

    def __init__(self) -> None:
        self.spans: list[list[float | None]] = []

    def __enter__(self) -> _RecordingTurn:
        import time

        self.spans.append([time.monotonic(), None])
        return self

    def __exit__(self, *exc: object) -> None:
        import time

        self.spans[-1][1] = time.monotonic()

    def close(self) -> None:
        pass


def _child(rank: int, ckpt: str, tmp: str, mode: str) -> None:
    try:
        import queue
        import time

        from workers.engine import SamplingParams
        from workers.engine.build import build_engine
        from workers.ep_rank import ExpertParallelRank
        from workers.messages import Submit
        from workers.rank import GangMember, Rank

        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        member = ExpertParallelRank(
            ckpt, rank=rank, world_size=WORLD, init_method=f"file://{tmp}/store"
        )
        who = GangMember("decode", "gang", rank, WORLD, f"replica-{rank}")
        turn = _RecordingTurn() if rank == 0 else None  # rank 0 takes the node's turn
        step_ends: list[float] = []
        if rank == 1:  # a peer whose part of each step ends later than the holder's
            step = member.engine.step

            def late_step(*args, **kwargs):
                out = step(*args, **kwargs)
                time.sleep(TAIL_S)  # stands for a longer tail of the step, not a wait
                step_ends.append(time.monotonic())
                return out

            member.engine.step = late_step
        r = Rank(member.engine, who, lockstep=member.lockstep, close_group=member.close, turn=turn)
        published: queue.SimpleQueue = queue.SimpleQueue()
        r.publish = lambda by_session, load, admitted: published.put(by_session)
        r.start()
        result: dict = {"rank": rank}
        if rank == 1 and mode == "graceful":
            r.stop(180, graceful=True)  # returns once rank 0 has left too
        elif rank == 0:
            for i, p in enumerate(PROMPTS):
                r.submit("router", Submit(f"q{i}", p, params))
            tokens: dict[str, list[int]] = {f"q{i}": [] for i in range(len(PROMPTS))}
            done: set[str] = set()
            while len(done) < len(PROMPTS):
                for d in published.get(timeout=120).get("router", []):
                    tokens[d.request_id] += d.token_ids
                    if d.finished:
                        done.add(d.request_id)
            result["tokens"] = [tokens[f"q{i}"] for i in range(len(PROMPTS))]
            if mode == "hard":  # the gang is idle now: it sleeps, then wakes for a request
                before = member.lockstep.num_agreements
                time.sleep(IDLE_WINDOW_S)  # a window to count agreements in, not a wait
                result["idle_agreements"] = member.lockstep.num_agreements - before
                start = time.monotonic()
                r.submit("router", Submit("late", PROMPTS[0], params))
                late: list[int] = []
                finished = False
                while not finished:
                    for d in published.get(timeout=120).get("router", []):
                        late += d.token_ids
                        finished = finished or d.finished
                result["late"] = late
                result["late_s"] = time.monotonic() - start
            reference = build_engine(ckpt).generate([(p, params) for p in PROMPTS])
            result["reference"] = [o.token_ids for o in reference]
            r.stop(60, graceful=mode == "graceful")  # hard: stops the whole group
        else:
            assert r.join(180)  # ends when rank 0 stops the group
            r.stop(10)
        result["stopped"] = member.lockstep.stopped
        result["turn_spans"] = turn.spans if turn is not None else None
        result["step_ends"] = step_ends
        result["kv_used"] = member.engine.stats().kv_blocks_used
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    except BaseException:
        Path(tmp, f"{rank}.err").write_text(f"rank {rank}:\n{traceback.format_exc()}")
        raise


@pytest.fixture(scope="module", params=["hard", "graceful"])
def results(request, tiny_checkpoint, tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp(f"loopgroup-{request.param}")
    ckpt = str(tiny_checkpoint("qwen3_moe"))
    run_spawned(_child, (ckpt, str(tmp), request.param), WORLD, tmp, JOIN_TIMEOUT_S)
    return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_requests_on_one_rank_match_a_single_engine(results):
    assert results[0]["tokens"] == results[0]["reference"]


def test_an_idle_gang_sleeps_and_wakes_for_a_request(results):
    hard = results[0]
    if "idle_agreements" not in hard:
        pytest.skip("measured in the hard-stop run")
    assert hard["idle_agreements"] <= 2, (
        f"{hard['idle_agreements']} agreements in {IDLE_WINDOW_S} s of an idle gang: it polls"
    )
    assert hard["late"] == hard["reference"][0]
    assert hard["late_s"] < 30, f"a request to the sleeping gang took {hard['late_s']:.1f} s"


def test_the_group_ends_together_and_frees_everything(results):
    assert all(r["stopped"] for r in results)
    assert all(r["kv_used"] == 0 for r in results)


def test_the_turn_is_held_until_every_rank_has_finished_the_step(results):
    """Rank 0 gives the node's turn back only once rank 1 (later each step) is done too, so the
    next gang's step never shares the cores with the tail of this one."""
    spans, ends = results[0]["turn_spans"], results[1]["step_ends"]
    assert spans and len(spans) == len(ends), (len(spans), len(ends))
    for k, ((_taken, given_back), peer_done) in enumerate(zip(spans, ends, strict=True)):
        assert given_back is not None, f"step {k}: the turn was never given back"
        assert given_back >= peer_done, (
            f"step {k}: turn given back {1e3 * (peer_done - given_back):.1f} ms before rank 1 "
            "finished the step"
        )
