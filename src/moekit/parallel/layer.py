"""Expert-parallel MoE layers: build one from a config, or convert the MoE layers of a model.

Routing, balance losses and shared experts are the ones of :class:`moekit.MoE` (same router,
same code); only the routed experts are replaced by :class:`ExpertParallelExperts`, which
dispatches tokens to the ranks holding their experts by all-to-all.
"""

from __future__ import annotations

from torch import nn

from moekit.experts import ExpertsConfig
from moekit.layer import MoE, MoEConfig
from moekit.parallel.comm import resolve_group
from moekit.parallel.copy_engine import CopyEngineExchange
from moekit.parallel.experts import ExpertParallelExperts

__all__ = ["ExpertParallelMoE", "parallelize"]


def _experts_config(cfg: MoEConfig) -> ExpertsConfig:
    return ExpertsConfig(cfg.dim, cfg.ffn_dim, cfg.num_experts, cfg.activation, cfg.backend)


class ExpertParallelMoE(MoE):
    """A :class:`moekit.MoE` whose routed experts are sharded over an expert-parallel group.

    cfg: the layer config (``cfg.num_experts`` logical experts). group: the EP process group,
    or a ``DeviceMesh`` with ``mesh_dim`` naming its EP dimension (default: WORLD). phy2log:
    ``[R]`` logical expert of each physical slot (a row of :attr:`moekit.placement.Plan.phy2log`;
    ``None`` = one slot per expert). dp_group: the data-parallel group (every rank that sees
    other tokens; default WORLD), over which global-batch balance counts are summed.
    expert_dp_group: ranks holding the same slots in other EP groups (a 2-D mesh: its other
    dimension), or ``None``. dedup: send each token once per destination rank (see
    :class:`ExpertParallelExperts`). max_tokens_per_rank: the most tokens (batch x sequence) any
    rank passes in one call; set, the dispatch has fixed sizes and no host sync (see
    :class:`ExpertParallelExperts`). overlap: compute this rank's own tokens' local choices
    beside the exchange of the others (side CUDA stream; see :class:`ExpertParallelExperts`).
    sm_carveout, remote_first: SMs the expert GEMMs leave to communication, the exchanged rows'
    path ahead of the own tokens' (see :class:`ExpertParallelExperts`). transport: how the
    fixed-size dispatch moves rows, ``"all_to_all"`` or ``"copy_engine"`` (see
    :class:`ExpertParallelExperts`). join_weight_grads: the overlap's two expert calls make one
    weight gradient (see :class:`ExpertParallelExperts`). own_first: the fixed-size overlap
    launches the own tokens' experts before the exchange (see :class:`ExpertParallelExperts`). seed: expert ``e`` is
    initialised from a generator seeded with ``(seed, e)``, so replicas agree without communication. Dense parameters (router, shared
    experts) come from the global RNG: seed it equally on every rank or call
    :func:`moekit.parallel.broadcast_dense_parameters`.

    Only the local slots are ever allocated, so layers whose experts do not fit on one device
    can be built. The forward is collective over the EP group.
    """

    def __init__(self, cfg: MoEConfig, group=None, phy2log=None, *, mesh_dim: str | int | None = None,
                 dp_group=None, expert_dp_group=None, seed: int = 0, dedup: bool = True,
                 max_tokens_per_rank: int | None = None, overlap: bool = False, sm_carveout: int | None = None,
                 remote_first: bool = False, transport: str | CopyEngineExchange = "all_to_all",
                 join_weight_grads: bool = True, own_first: bool = False):
        experts = ExpertParallelExperts(_experts_config(cfg), resolve_group(group, mesh_dim), phy2log,
                                        expert_dp_group, dedup, max_tokens_per_rank, overlap, sm_carveout,
                                        remote_first, transport, join_weight_grads, own_first)
        experts.init_logical(seed)
        super().__init__(cfg, dp_group=dp_group, experts=experts)  # allocates only the local slots


def parallelize(model: nn.Module, group=None, phy2log=None, *, mesh_dim: str | int | None = None,
                expert_dp_group=None, dedup: bool = True,
                max_tokens_per_rank: int | None = None, overlap: bool = False,
                sm_carveout: int | None = None, remote_first: bool = False,
                transport: str | CopyEngineExchange = "all_to_all",
                join_weight_grads: bool = True, own_first: bool = False) -> list[ExpertParallelExperts]:
    """Shard the routed experts of every :class:`moekit.MoE` in ``model``, in place.

    Each layer keeps its router and shared experts; its ``experts`` become an
    :class:`ExpertParallelExperts` holding this rank's slots, copied from the layer's full
    weights (identical on every rank, e.g. loaded from the same checkpoint). phy2log:
    ``[L, R]`` (or a ``Plan``), one row per MoE layer in ``model.modules()`` order, or
    ``None`` for one slot per expert. dedup, max_tokens_per_rank, overlap, sm_carveout, remote_first,
    transport, join_weight_grads, own_first: see :class:`ExpertParallelExperts`; with ``transport="copy_engine"`` all layers
    share one :class:`CopyEngineExchange` (one symmetric buffer, one stream). Returns the new
    expert modules in layer order.
    """
    ep_group = resolve_group(group, mesh_dim)
    layers = [m for m in model.modules() if isinstance(m, MoE) and not isinstance(m.experts, ExpertParallelExperts)]
    phy2log = getattr(phy2log, "phy2log", phy2log)
    if phy2log is not None and (len(phy2log) != len(layers) or getattr(phy2log, "ndim", 2) != 2):
        raise ValueError(f"phy2log: expected [L={len(layers)}, R], one row per MoE layer, got "
                         f"{tuple(getattr(phy2log, 'shape', (len(phy2log),)))}")
    if transport == "copy_engine" and layers:
        transport = CopyEngineExchange(ep_group)
    out = []
    for i, layer in enumerate(layers):
        full = layer.experts
        ep = ExpertParallelExperts(full.cfg, ep_group, None if phy2log is None else phy2log[i], expert_dp_group,
                                   dedup, max_tokens_per_rank, overlap, sm_carveout, remote_first, transport,
                                   join_weight_grads, own_first)
        ep.to(device=full.w_in.device, dtype=full.w_in.dtype)
        ep.load_logical(full.w_in.detach(), full.w_out.detach())
        layer.experts = ep
        out.append(ep)
    return out
