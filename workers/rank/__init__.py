"""One rank of a prefill or decode gang: `Rank` (engine + gang membership + the only stepping
loop), its `ChannelServer` (one channel per router) and the `KVTransport` of the handoff."""

from workers.rank.build import ServingRank, start_rank
from workers.rank.channel import ChannelServer
from workers.rank.rank import GangMember, Rank, RankSnapshot
from workers.rank.transport import KVStore, KVTransport, PeerKVTransport

__all__ = [
    "ChannelServer",
    "GangMember",
    "KVStore",
    "KVTransport",
    "PeerKVTransport",
    "Rank",
    "RankSnapshot",
    "ServingRank",
    "start_rank",
]
