"""Expert-parallel load balancer (EPLB): choose which experts to copy and where to put copies.

The algorithm is DeepSeek's (deepseek-ai/EPLB), written here from its description:
replicate the hottest experts (by load per copy), then pack the copies onto GPUs so every GPU
has the same number of slots and loads as even as greedy packing makes them. The hierarchical
variant first packs expert groups onto nodes (group-limited routing then keeps a token's
traffic inside few nodes), replicates within each node, and packs each node's copies onto its
GPUs.

Legend: L layers, E logical experts, P physical slots (num_replicas), M most copies of one
expert, G expert groups, n items to pack. Loads are any non-negative numbers (token counts).
Slots of GPU g are g*P/num_gpus .. (g+1)*P/num_gpus - 1, as in `workers.moe.placement`.
"""

from __future__ import annotations

import torch

from workers.moe.placement import Placement

__all__ = ["balanced_packing", "placements_from_eplb", "rebalance_experts", "replicate_experts"]


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [L, n] -> pack_index [L, n], rank_in_pack [L, n] (int64).

    Puts n / num_packs items in each pack: items go heaviest first (ties: lower index first) to
    the currently lightest pack that is not yet full (ties: lower pack). Each layer is packed on
    its own; the loop runs over items, vectorized over layers.
    """
    num_layers, n = weight.shape
    if num_packs < 1 or n % num_packs:
        raise ValueError(f"{n} items cannot fill {num_packs} packs equally; need n % packs == 0")
    per_pack = n // num_packs
    w = weight.detach().to("cpu", torch.float64)
    rows = torch.arange(num_layers)
    order = torch.argsort(w, dim=-1, descending=True, stable=True)  # [L, n]
    pack_load = torch.zeros(num_layers, num_packs, dtype=torch.float64)  # [L, packs]
    pack_size = torch.zeros(num_layers, num_packs, dtype=torch.int64)  # [L, packs]
    pack_index = torch.empty(num_layers, n, dtype=torch.int64)
    rank_in_pack = torch.empty(num_layers, n, dtype=torch.int64)
    for i in range(n):
        item = order[:, i]  # [L]
        open_load = pack_load.masked_fill(pack_size >= per_pack, float("inf"))
        pack = open_load.argmin(dim=-1)  # [L]; argmin returns the first of equal minima
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = pack_size[rows, pack]
        pack_load[rows, pack] += w[rows, item]
        pack_size[rows, pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(
    weight: torch.Tensor, num_phy: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [L, E] -> phy2log [L, num_phy], rank [L, num_phy], logcnt [L, E] (int64).

    Physical expert i < E is logical expert i; each further one copies the expert with the
    largest load per copy (ties: lower id). `rank` is the copy's index among its expert's copies
    (0 for the original), `logcnt` the number of copies of each expert.
    """
    num_layers, num_log = weight.shape
    if num_phy < num_log:
        raise ValueError(f"num_phy={num_phy} < {num_log} experts: every expert needs a slot")
    w = weight.detach().to("cpu", torch.float64)
    rows = torch.arange(num_layers)
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(num_layers, 1)  # [L, num_phy]
    rank = torch.zeros(num_layers, num_phy, dtype=torch.int64)
    logcnt = torch.ones(num_layers, num_log, dtype=torch.int64)  # [L, E]
    for i in range(num_log, num_phy):
        hot = (w / logcnt).argmax(dim=-1)  # [L]
        phy2log[:, i] = hot
        rank[:, i] = logcnt[rows, hot]
        logcnt[rows, hot] += 1
    return phy2log, rank, logcnt


def _invert(perm: torch.Tensor) -> torch.Tensor:
    """perm [L, n], a permutation per row -> its inverse [L, n]."""
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm))
    return inv


def _rebalance_hierarchical(
    weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [L, E] float64 -> phy2log [L, P], phyrank [L, P], logcnt [L, E].

    "Node-major" ids (nm) renumber logical experts so node k's experts are nm k*E/nodes ..
    (k+1)*E/nodes - 1; steps 2 and 3 then work on one row per (layer, node).
    """
    num_layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_log // num_nodes
    phy_per_node = num_phy // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_gpu = num_phy // num_gpus

    # 1. whole groups onto nodes, balancing group loads
    group_load = weight.view(num_layers, num_groups, group_size).sum(-1)  # [L, G]
    node, pos = balanced_packing(group_load, num_nodes)  # [L, G] each
    first_nm = (node * groups_per_node + pos) * group_size  # [L, G] first nm id of each group
    log2nm = (first_nm[:, :, None] + torch.arange(group_size)).view(num_layers, num_log)
    nm2log = _invert(log2nm)  # [L, E]

    # 2. replicate within each node: rows are (layer, node)
    nm_load = weight.gather(1, nm2log).view(-1, log_per_node)  # [L*nodes, E/nodes]
    phy2nm, phyrank, nmcnt = replicate_experts(nm_load, phy_per_node)  # [L*nodes, P/nodes] ...

    # 3. each node's copies onto its GPUs, a copy carrying an even share of its expert's load
    phy_load = (nm_load / nmcnt).gather(1, phy2nm)  # [L*nodes, P/nodes]
    gpu, slot = balanced_packing(phy_load, gpus_per_node)
    phy2slot = gpu * phy_per_gpu + slot  # [L*nodes, P/nodes] node-local slot of each copy
    slot2phy = _invert(phy2slot)
    slot2nm = phy2nm.gather(1, slot2phy)  # still node-local nm ids
    node_base = torch.arange(num_nodes).repeat(num_layers)[:, None] * log_per_node
    slot2nm = (slot2nm + node_base).view(num_layers, num_phy)  # [L, P] global nm ids
    phy2log = nm2log.gather(1, slot2nm)  # [L, P]
    phyrank = phyrank.gather(1, slot2phy).view(num_layers, num_phy)
    logcnt = nmcnt.view(num_layers, num_log).gather(1, log2nm)  # [L, E]
    return phy2log, phyrank, logcnt


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [L, E] load per logical expert -> phy2log [L, P], log2phy [L, E, P - E + 1],
    logcnt [L, E] (int64, on CPU).

    phy2log[l, s] is the logical expert in slot s (GPU s // (P / num_gpus)); log2phy[l, e, j]
    the slot of copy j of e, -1 past its logcnt[l, e] copies. log2phy's last dim is the most
    copies any expert could get (P - E + 1), fixed for given sizes so a routing buffer can be
    updated in place across rebalances.
    Hierarchical when num_groups % num_nodes == 0 (each group's copies stay on one node), else
    global (one node, one group). Deterministic for a given input.
    """
    num_layers, num_log = weight.shape
    if num_gpus < 1 or num_nodes < 1 or num_gpus % num_nodes:
        raise ValueError(
            f"num_gpus={num_gpus} must be a positive multiple of num_nodes={num_nodes}"
        )
    if num_replicas < num_log or num_replicas % num_gpus:
        raise ValueError(
            f"num_replicas={num_replicas} must be >= {num_log} experts and a multiple of "
            f"num_gpus={num_gpus}; e.g. {num_log + (-num_log % num_gpus)}"
        )
    if num_groups < 1 or num_log % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the {num_log} experts")
    w = weight.detach().to("cpu", torch.float64)
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = _rebalance_hierarchical(
            w, num_replicas, num_groups, num_nodes, num_gpus
        )
    else:
        phy2log, phyrank, logcnt = _rebalance_hierarchical(w, num_replicas, 1, 1, num_gpus)
    width = num_replicas - num_log + 1
    log2phy = torch.full((num_layers, num_log * width), -1, dtype=torch.int64)
    log2phy.scatter_(1, phy2log * width + phyrank, torch.arange(num_replicas).expand_as(phy2log))
    return phy2log, log2phy.view(num_layers, num_log, width), logcnt


def placements_from_eplb(
    phy2log: torch.Tensor, num_ranks: int, num_logical: int | None = None
) -> list[Placement]:
    """phy2log [L, P] -> one Placement per layer. `num_logical` defaults to max id + 1; pass it
    when the highest experts might be missing so the error names them."""
    if phy2log.dim() != 2:
        raise ValueError(f"phy2log must be [layers, slots], got shape {list(phy2log.shape)}")
    e = int(phy2log.max()) + 1 if num_logical is None else num_logical
    return [Placement(e, num_ranks, tuple(row)) for row in phy2log.tolist()]
