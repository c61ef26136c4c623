"""Expert parallelism over ``torch.distributed``: all-to-all token dispatch, replicated
experts from a placement plan, moving experts (and optimizer state) when the plan changes.

Runs under ``torchrun`` with gloo (CPU) or NCCL (GPUs). Typical use::

    dist.init_process_group("nccl")
    layer = moekit.parallel.ExpertParallelMoE(cfg, group)             # or parallelize(model, group)
    out = layer(x_local)                                              # collective over the EP group
    out.hidden.sum().backward()
    moekit.parallel.reduce_gradients(layer)                           # DP all-reduce + replica sums
    report = moekit.parallel.apply_plan(layer, plan.phy2log, optimizer)  # move experts to a new plan
"""

from moekit.parallel.comm import all_to_all, all_to_all_plain, exchange_counts, resolve_group
from moekit.parallel.dispatch import (
    DispatchOrder,
    SlotTables,
    TokenDispatch,
    combine,
    dispatch_order,
    received_routing,
    received_slots,
    slot_tables,
    token_dispatch,
)
from moekit.parallel.experts import ExpertParallelExperts
from moekit.parallel.grads import broadcast_dense_parameters, dense_parameters, reduce_gradients
from moekit.parallel.layer import ExpertParallelMoE, parallelize
from moekit.parallel.rebalance import MoveReport, Transfer, apply_plan, plan_transfers

__all__ = [
    "DispatchOrder",
    "ExpertParallelExperts",
    "ExpertParallelMoE",
    "MoveReport",
    "SlotTables",
    "TokenDispatch",
    "Transfer",
    "all_to_all",
    "all_to_all_plain",
    "apply_plan",
    "broadcast_dense_parameters",
    "combine",
    "dense_parameters",
    "dispatch_order",
    "exchange_counts",
    "parallelize",
    "plan_transfers",
    "received_routing",
    "received_slots",
    "reduce_gradients",
    "resolve_group",
    "slot_tables",
    "token_dispatch",
]
