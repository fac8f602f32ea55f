"""`start_rank`: join the gang, load this rank's experts, start the loop and the channel port.
What a Serve replica (or a test) calls; `ServingRank` is what it gets back."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from workers.cores import set_niceness
from workers.engine import Engine, EngineConfig
from workers.engine.build import build_engine
from workers.ep_rank import ExpertParallelRank
from workers.messages import RankAddress
from workers.rank.channel import ChannelServer, listen_socket
from workers.rank.core_turn import CoreTurn
from workers.rank.openmp import release_thread_pool
from workers.rank.rank import GangMember, Rank
from workers.rank.transport import KVStore, PeerKVTransport
from workers.wire import WireKey

__all__ = ["ServingRank", "start_rank", "turn_pinning"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingRank:
    rank: Rank
    channel: ChannelServer
    address: RankAddress

    def close(self, timeout_s: float = 30.0, graceful: bool = False) -> None:
        """Stop the loop (every request still held goes back to its router as MIGRATE), then
        close the channels."""
        try:
            self.rank.stop(timeout_s, graceful=graceful)
        finally:
            self.channel.close()


def turn_pinning(core_turn: str | None, device: str) -> bool:
    """Whether a gang's ranks take cores of their own: CPU ranks stepping under core turns."""
    return core_turn is not None and device == "cpu"


def start_rank(
    model_dir: str | Path | None,
    member: GangMember,
    *,
    host: str,
    wire_key: WireKey,
    init_method: str | None = None,
    dtype: str = "float32",
    engine_config: EngineConfig | None = None,
    threads: int = 1,
    device: str = "cpu",
    collective_timeout_s: float = 30.0,
    dispatch_transport: str = "auto",
    kv_ttl_s: float = 120.0,
    engine: Engine | None = None,
    core_turn: str | None = None,
    niceness: int | None = None,
) -> ServingRank:
    """A gang member (`init_method` given: joins the torch.distributed group, loads only its
    experts, steps in lockstep) or a lone rank over `engine` / a full `build_engine`.
    `core_turn`: the name of the turn at the node's cores its gang steps under (`CoreTurn`).
    `niceness`: this process's threads run at it (`set_niceness`; None: left as they are).
    `wire_key`: the cluster's rank-wire key; every connection to the rank's port proves it."""
    if niceness is not None:  # first: the threads started below inherit it
        set_niceness(niceness)
    sock = listen_socket(host)
    port = sock.getsockname()[1]
    transport = PeerKVTransport(KVStore(kv_ttl_s), host, port, member.replica_id, wire_key)
    store = transport.store
    # the gang's rank 0 takes the node's turn; its peers wait for it at the first collective,
    # so it never waits for the turn near their collective timeout (a frozen holder)
    turn = None
    if core_turn is not None and member.rank == 0:
        try:
            turn = CoreTurn(core_turn, wait_s=collective_timeout_s / 4)
        except OSError as e:  # no writable /dev/shm or /tmp: step as without turns
            log.warning("core turns off for this rank: %r", e)
    if init_method is not None:
        assert model_dir is not None
        ep = ExpertParallelRank(
            model_dir,
            rank=member.rank,
            world_size=member.world_size,
            init_method=init_method,
            dtype=dtype,
            engine_config=engine_config,
            threads=threads,
            timeout_s=max(120.0, collective_timeout_s),
            collective_timeout_s=collective_timeout_s,
            dispatch_transport=dispatch_transport,
            device=device,
            # under core turns one gang of the node steps at a time: rank r on its own cores
            # (workers/cores.py); its loop, gloo and channel threads start after and inherit them
            pin_cores=turn_pinning(core_turn, device),
        )
        rank = Rank(
            ep.engine,
            member,
            lockstep=ep.lockstep,
            put_kv=transport.put,
            end_session_kv=store.release_session,
            expert_load=lambda: ep.expert_load().tolist(),
            dispatch_bytes=ep.dispatch_bytes,
            close_group=ep.close,
            turn=turn,
        )
    else:
        if engine is None:
            assert model_dir is not None
            engine = build_engine(
                model_dir, dtype=dtype, config=engine_config, device=device, progress=False
            )
        rank = Rank(
            engine, member, put_kv=transport.put, end_session_kv=store.release_session, turn=turn
        )
    channel = ChannelServer(rank, transport, sock, wire_key).start()
    release_thread_pool()  # the loop thread's OpenMP pool the only one left (see openmp.py)
    rank.start()
    address = RankAddress(
        member.replica_id,
        member.stage,
        member.gang_id,
        member.rank,
        member.world_size,
        host,
        port,
        block_size=rank.engine.blocks.block_size,
        cache_salt=rank.engine.blocks.salt if rank.engine.blocks.prefix_caching else b"",
    )
    return ServingRank(rank, channel, address)
