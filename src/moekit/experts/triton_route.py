"""The routing sort of the grouped expert path as a stable counting sort in Triton.

:func:`route_slots` computes what :func:`moekit.experts.grouped.route_by_expert` defines with
``torch.sort(stable=True)``: the ``N = T*K`` slots ordered by expert, ``-1`` slots last, ties in
slot order. A radix sort is the wrong tool for keys of ``log2(E + 1) <= 9`` bits: torch's sorts
all 32 bits of an int32 key (several passes over ``N``, plus ``searchsorted`` and an inverse
scatter), about 0.3 ms for ``N = 131072`` on an H100 (``bench_layer_steps.py``,
``route_by_expert``). A counting sort reads the keys twice:

1. ``_block_hist_kernel``: each program counts the keys of its block of ``BLOCK`` slots:
   ``counts_BX [num_blocks, E + 1]`` (bin ``E`` = the ``-1`` slots).
2. Torch, on ``[num_blocks, E + 1]`` (tiny): where each (block, expert) run starts in the
   sorted order = the expert's start + the rows of that expert in earlier blocks; minus where
   the run starts inside the block once the block is sorted, which gives ``adj_BX``.
3. ``_place_kernel``: each program sorts its block's ``key * BLOCK + lane`` in registers (a
   bitonic ``tl.sort``; ties cannot happen, so the order is stable) and writes slot ``s`` at
   sorted position ``adj_BX[block, key] + p`` (``p`` its position in the sorted block):
   ``order_N[pos] = s`` and ``inv_N[s] = pos`` (``-1`` for a ``-1`` slot).

No atomics, so the result is deterministic, and it equals the stable sort exactly. The kernels
run in Triton's interpreter too (``TRITON_INTERPRET=1``), which is how they are tested on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["route_slots"]

# Slots per program. tl.sort is a bitonic network over the whole block in registers;
# 1024 keeps it cheap and still gives N / 1024 programs (128 for T = 16384, K = 8).
_MAX_BLOCK = 1024


@triton.jit
def _block_hist_kernel(key_ptr, counts_ptr, n, NUM_BINS: tl.constexpr, BINS_P2: tl.constexpr,
                       BLOCK: tl.constexpr):
    block = tl.program_id(0)
    idx = block * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    key = tl.load(key_ptr + idx, mask=mask, other=0)
    hist = tl.histogram(key, BINS_P2, mask=mask)
    bins = tl.arange(0, BINS_P2)
    tl.store(counts_ptr + block * NUM_BINS + bins, hist, mask=bins < NUM_BINS)


@triton.jit
def _place_kernel(key_ptr, adj_ptr, order_ptr, inv_ptr, n, NUM_BINS: tl.constexpr,
                  BLOCK: tl.constexpr):
    block = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    idx = block * BLOCK + lane
    # padding lanes get the key past the last bin: they sort behind every real slot
    key = tl.load(key_ptr + idx, mask=idx < n, other=NUM_BINS)
    ordered = tl.sort(key * BLOCK + lane)
    key_s = ordered // BLOCK
    slot_s = block * BLOCK + ordered % BLOCK
    real = key_s < NUM_BINS
    pos = tl.load(adj_ptr + block * NUM_BINS + key_s, mask=real, other=0) + lane
    tl.store(order_ptr + pos, slot_s.to(tl.int64), mask=real)
    # the last bin holds the -1 slots: sorted behind all experts, but no row of their own
    inv = tl.where(key_s < NUM_BINS - 1, pos, -1)
    tl.store(inv_ptr + slot_s, inv.to(tl.int64), mask=real)


def _run_starts(counts_BX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``counts_BX [B, X]`` (keys of bin ``x`` in block ``b``) -> ``adj_BX [B, X]`` int32 (sorted
    position of a block's run of bin ``x`` minus the run's position inside the sorted block) and
    ``ends_X [X]`` int32 (end of each bin's rows in the sorted order)."""
    before_blocks = counts_BX.cumsum(0, dtype=torch.int32) - counts_BX  # same bin, earlier blocks
    totals_X = before_blocks[-1] + counts_BX[-1]
    ends_X = totals_X.cumsum(0, dtype=torch.int32)
    before_bins = counts_BX.cumsum(1, dtype=torch.int32) - counts_BX    # same block, lower bins
    adj_BX = (ends_X - totals_X) + before_blocks - before_bins
    return adj_BX, ends_X


def route_slots(indices_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``indices_TK [T, K]`` (``-1`` = no expert) -> ``order_N [N]`` int64 (slot of each sorted
    row), ``inv_TK [T, K]`` int64 (sorted row of each slot, ``-1`` for a ``-1`` slot) and
    ``offs_E [E]`` int32 (end of each expert's rows): the contract of
    :func:`moekit.experts.grouped.route_by_expert`, experts ascending, ties in slot order."""
    n = indices_TK.numel()
    dev = indices_TK.device
    order_N = torch.empty(n, dtype=torch.int64, device=dev)
    inv_N = torch.empty(n, dtype=torch.int64, device=dev)
    num_bins = num_experts + 1
    if n == 0:
        return order_N, inv_N.view(indices_TK.shape), torch.zeros(num_experts, dtype=torch.int32, device=dev)
    flat = indices_TK.reshape(-1)
    key_N = torch.where(flat < 0, num_experts, flat).to(torch.int32)
    block = min(_MAX_BLOCK, max(16, triton.next_power_of_2(n)))
    num_blocks = triton.cdiv(n, block)
    counts_BX = torch.empty(num_blocks, num_bins, dtype=torch.int32, device=dev)
    _block_hist_kernel[(num_blocks,)](key_N, counts_BX, n, NUM_BINS=num_bins,
                                      BINS_P2=triton.next_power_of_2(num_bins), BLOCK=block)
    adj_BX, ends_X = _run_starts(counts_BX)
    _place_kernel[(num_blocks,)](key_N, adj_BX, order_N, inv_N, n, NUM_BINS=num_bins, BLOCK=block,
                                 num_warps=4 if block >= 512 else 1)
    return order_N, inv_N.view(indices_TK.shape), ends_X[:num_experts]
