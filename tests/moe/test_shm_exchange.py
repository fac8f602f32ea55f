"""The shared-memory all-to-all of the CPU dispatch (workers/moe/shm_exchange.py) on spawned
gloo ranks: every message size arrives intact (empty, one byte, around a slot, more than a whole
ring, several parts of several dtypes); a rank that opts out makes every rank fall back; a peer
that exits, closes or stays away fails the waiting rank within bounded time, naming the rank.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.spawn import gloo_rank, run_spawned
from workers.engine.lockstep import max_over_ranks_shm
from workers.moe.shm_exchange import RING, PeerLost, ShmExchange, shm_supported

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not shm_supported(), reason="shared-memory exchange: x86-64 Linux only"),
]

CHUNK = 4096
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * RING * CHUNK + 3]  # bytes of the uint8 part


def message(src: int, dst: int, round_: int) -> list[torch.Tensor]:
    """What src sends dst in a round: a uint8 part of SIZES[...] bytes and an fp32 part."""
    n = SIZES[(src + 2 * dst + round_) % len(SIZES)]
    g = torch.Generator().manual_seed(1000 * src + 10 * dst + round_)
    return [
        torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8),
        torch.randn(3, 5, generator=g),
    ]


def wire(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.contiguous().view(torch.uint8).reshape(-1) for p in parts])


def _sizes_child(rank: int, world: int, tmp: str) -> None:
    with gloo_rank(rank, world, tmp):
        ex = ShmExchange.create(chunk=CHUNK)
        assert ex is not None, "no shared-memory exchange on one host"
        got: dict = {}
        for round_ in range(2 * len(SIZES)):
            mode = torch.inference_mode(round_ % 2 == 0)  # as the forward and the lockstep do
            with mode:
                out = ex.exchange([message(rank, d, round_) for d in range(world)])
            got[round_] = [None if m is None else m.clone() for m in out]
        got["file_left"] = os.path.exists(ex.path)  # rank 0 unlinks it before its first round
        # the lockstep's agreement over the exchange: an element-wise max over the ranks
        got["any"] = [
            max_over_ranks_shm([int(rank == 1), 0, int(rank != 2), -rank], ex),
            max_over_ranks_shm([0, 0, 0, 7], ex),
        ]
        ex.close()
        if rank == 1:  # one rank opts out: every rank falls back to the collectives
            os.environ["MOE_SHM_DISPATCH"] = "0"
        got["fallback"] = ShmExchange.create() is None
        torch.save(got, f"{tmp}/rank{rank}.pt")


def test_every_message_size_arrives_intact(tmp_path) -> None:
    world = 3
    run_spawned(_sizes_child, (world, str(tmp_path)), world, tmp_path, 120)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["fallback"], f"rank {rank} kept shared memory though rank 1 opted out"
        for round_ in range(2 * len(SIZES)):
            for src in range(world):
                if src == rank:
                    assert got[round_][src] is None
                else:
                    assert torch.equal(got[round_][src], wire(message(src, rank, round_)))
        assert not got["file_left"], "the shared file outlived the setup"
        assert got["any"] == [[1, 0, 1, 0], [0, 0, 0, 7]]


def _fault_child(rank: int, world: int, tmp: str, fault: str) -> None:
    """Rank 0 waits in an exchange; rank 1 is killed, closes its end, or never comes."""
    with gloo_rank(rank, world, tmp):
        ex = ShmExchange.create(timeout_s=0.5 if fault == "absent" else 60)
        assert ex is not None
        ex.exchange([[torch.ones(8)]] * world)  # a first round everyone takes part in
        if rank == 1:
            if fault == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "closed":
                ex.close()
            deadline = time.monotonic() + 60  # stay alive (absent) until rank 0 has failed
            while not Path(tmp, "rank0.done").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            return
        start = time.monotonic()
        try:
            ex.exchange([[torch.ones(CHUNK * RING * 3)]] * world)  # more than a ring: blocks
            outcome = "no error"
        except PeerLost as e:
            outcome = str(e)
        Path(tmp, "rank0.txt").write_text(f"{time.monotonic() - start:.3f}\n{outcome}")
        Path(tmp, "rank0.done").write_text("")


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("killed", "process of expert-parallel rank 1 exited"),
        ("closed", "expert-parallel rank 1 left the group"),
        ("absent", "rank(s) 1 did not take part in an all-to-all within 0.5 s"),
    ],
)
def test_a_lost_peer_fails_the_waiting_rank(tmp_path, fault: str, words: str) -> None:
    ctx = mp.start_processes(
        _fault_child, args=(2, str(tmp_path), fault), nprocs=2, join=False, start_method="spawn"
    )
    rank0 = ctx.processes[0]
    rank0.join(90)
    try:
        assert not rank0.is_alive(), "rank 0 still waits on a lost peer after 90 s"
        errs = sorted(tmp_path.glob("*.err"))
        assert not errs, "\n".join(f.read_text() for f in errs)
        seconds, outcome = (tmp_path / "rank0.txt").read_text().split("\n", 1)
        assert words in outcome
        assert float(seconds) < 10, f"the loss was noticed after {seconds} s"
    finally:
        for p in ctx.processes:
            p.kill()
            p.join(10)
