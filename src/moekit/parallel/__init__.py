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

from moekit.parallel.carveout import carved_out, sm_carveout
from moekit.parallel.comm import (
    all_to_all,
    all_to_all_plain,
    exchange_counts,
    resolve_group,
)
from moekit.parallel.copy_engine import CopyEngineExchange
from moekit.parallel.dispatch import (
    DispatchOrder,
    RowDispatch,
    SlotTables,
    assignment_slots,
    combine,
    dispatch_order,
    received_routing,
    received_slots,
    row_dispatch,
    slot_tables,
)
from moekit.parallel.experts import ExpertParallelExperts, compact_grouped_experts
from moekit.parallel.grads import (
    broadcast_dense_parameters,
    dense_parameters,
    reduce_gradients,
)
from moekit.parallel.layer import ExpertParallelMoE, parallelize
from moekit.parallel.rebalance import MoveReport, Transfer, apply_plan, plan_transfers
from moekit.parallel.replicas import ReplicaSync, replica_sync
from moekit.parallel.rows import collect, gather_sum_rows, spread

__all__ = [
    "CopyEngineExchange",
    "DispatchOrder",
    "ExpertParallelExperts",
    "ExpertParallelMoE",
    "MoveReport",
    "ReplicaSync",
    "RowDispatch",
    "SlotTables",
    "Transfer",
    "all_to_all",
    "all_to_all_plain",
    "apply_plan",
    "assignment_slots",
    "carved_out",
    "broadcast_dense_parameters",
    "collect",
    "combine",
    "compact_grouped_experts",
    "dense_parameters",
    "dispatch_order",
    "exchange_counts",
    "gather_sum_rows",
    "parallelize",
    "plan_transfers",
    "received_routing",
    "received_slots",
    "reduce_gradients",
    "replica_sync",
    "resolve_group",
    "row_dispatch",
    "slot_tables",
    "sm_carveout",
    "spread",
]
