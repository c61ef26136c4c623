"""The fixed-size exchanges of the expert-parallel layer carried by the GPUs' copy engines.

Why: NCCL's all-to-all runs as GPU kernels that need streaming multiprocessors (SMs). Beside the
expert GEMMs of the overlap mode (persistent kernels that hold every SM until they end) an
NCCL kernel waits for SMs, and the two serialise. Measured on 2x H100 (NVLink, 2026-11-28,
``.probe``-style script, 64 MiB per rank and exchange): four NCCL exchanges beside 4.85 ms of
grouped GEMMs on another stream took 6.09 ms together, the sum of both alone (4.85 + 1.25 ms:
no overlap at all). A copy between GPUs that map each other's memory (``cudaMemcpyAsync``
through PyTorch's symmetric memory) runs on a copy engine and needs no SM: the same four
exchanges done so took 1.01 ms alone and 5.52 ms beside the GEMMs.

Protocol (pull), on one communication stream per exchange object, in the order in which every
rank issues its exchanges (the same order on all ranks, as for any collective):

1. copy this rank's send blocks into its symmetric buffer;
2. barrier: every rank's buffer holds its send blocks;
3. copy from each other rank's buffer the block meant for this rank (copy engine, NVLink),
   rank ``r`` from ``r+1, r+2, ...`` in turn, so that no GPU serves all readers at once
   (:func:`pull_plan`; read in rank order, an OLMoE-like step's exchanges took 4.81 instead
   of 2.75 ms at 4 ranks on 4x H200);
4. barrier: every rank has read its blocks, so the buffers may be written again.

Only the two barriers are kernels (one block each). Beside a persistent GEMM that holds every
SM they wait for it to end, which an SM carveout of a few SMs avoids (``sm_carveout``).

Two exchanges, both on ``C`` rows per block (the fixed-size dispatch of
:class:`~moekit.parallel.ExpertParallelExperts`), with or without a block for the rank itself:

- :func:`gather_blocks` (all-gather): every rank contributes ``[C, ...]`` and receives the
  blocks of the other ranks (and its own with ``include_self``) in rank order; its gradient is
  the :func:`swap_blocks` of the output gradient, summed over blocks;
- :func:`swap_blocks` (personalised all-to-all): block ``j`` of the input goes to the ``j``-th
  rank of the order, block ``j`` of the output comes from it; its own adjoint.

Shapes: ``P`` ranks, ``B = P`` (``include_self``) or ``P - 1`` blocks, ``C`` rows per block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moekit.parallel.rows import sum_partials

__all__ = ["CopyEngineExchange", "block_index", "gather_blocks", "pull_plan", "swap_blocks"]

_ALIGN = 256  # bytes: every tensor of an exchange starts at a multiple of this in the buffer


def block_index(peer: int, rank: int, include_self: bool) -> int:
    """Index of ``peer``'s block in ``rank``'s block order: ranks in order, ``rank`` itself
    left out unless ``include_self``."""
    if peer == rank and not include_self:
        raise ValueError(f"peer: rank {rank} has no block of its own without include_self")
    return peer if include_self else peer - (peer > rank)


def pull_plan(rank: int, world: int, include_self: bool, gather: bool) -> list[tuple[int, int | None, int]]:
    """What ``rank`` copies in an exchange: ``(peer, source block, destination block)`` per
    block it receives: block ``source`` of ``peer``'s send buffer (``None``: the whole buffer,
    one block sent to every rank, with ``gather``) into block ``destination`` of the result.

    In the order of the copies: ``rank`` reads from ``rank + 1``, ``rank + 2``, ... (mod
    ``world``; itself first with ``include_self``). At every step the ranks then read from
    ``world`` different peers, where reading in rank order would have every rank read from
    rank 0 first, then all from rank 1, ...: one GPU's outgoing links shared by all readers
    while the others' idle."""
    plan = []
    for shift in range(world):
        q = (rank + shift) % world
        if q == rank and not include_self:
            continue
        source = None if gather else block_index(rank, q, include_self)  # q's block for this rank
        plan.append((q, source, block_index(q, rank, include_self)))
    return plan


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class CopyEngineExchange:
    """The symmetric buffer, its handle and the communication stream of copy-engine exchanges
    over ``group`` (CUDA, peer-to-peer capable ranks of one node). One object serves any number
    of layers: their exchanges run one after another on its stream and share its buffer, which
    grows to the largest exchange (a collective step: every rank grows it at the same exchange,
    as their exchanges have the same shapes)."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group: expected an initialised torch.distributed process group")
        self.group = group if group is not None else dist.group.WORLD
        if dist.get_backend(self.group) != "nccl":
            raise ValueError(f"transport: 'copy_engine' needs an NCCL group of CUDA ranks, got a "
                             f"{dist.get_backend(self.group)!r} group")
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self._buffer: torch.Tensor | None = None
        self._handle = None
        self._peers: dict[int, torch.Tensor] = {}
        self._recipes: dict = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            # high priority: its barrier kernels go before queued GEMM blocks as SMs free up
            self._streams[device] = torch.cuda.Stream(device, priority=-1)
        return self._streams[device]

    def _buffers(self, nbytes: int, device: torch.device) -> dict[int, torch.Tensor]:
        """Every rank's buffer as a local ``uint8`` view (``{rank: [bytes]}``), at least ``nbytes``."""
        if self._buffer is None or self._buffer.numel() < nbytes or self._buffer.device != device:
            import torch.distributed._symmetric_memory as symm

            if self._buffer is not None:
                self._stream(self._buffer.device).synchronize()  # old buffer: last reads done
            self._buffer = symm.empty(nbytes, dtype=torch.uint8, device=device)
            self._handle = symm.rendezvous(self._buffer, self.group)
            self._peers = {q: self._handle.get_buffer(q, (nbytes,), torch.uint8, 0) for q in range(self.world)}
            self._recipes.clear()
        return self._peers

    def _recipe(self, tensors: list[torch.Tensor], include_self: bool, gather: bool):
        """The views of an exchange of tensors of these shapes, made once per buffer (a layer's
        exchanges repeat every step, and each view is host time on the launch path):
        ``(own views, [(peer view, tensor index, first row, end row of the result)])``."""
        key = (tuple((t.shape, t.dtype) for t in tensors), include_self, gather, tensors[0].device)
        if key in self._recipes:  # emptied whenever the buffer is made anew
            return self._recipes[key]
        nblocks = self.world if include_self else self.world - 1
        rows = [t.shape[0] if gather else t.shape[0] // nblocks for t in tensors]
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += _padded(t.numel() * t.element_size())
        peers = self._buffers(total, tensors[0].device)

        def view(q: int, i: int) -> torch.Tensor:
            t = tensors[i]
            return peers[q][offsets[i]:offsets[i] + t.numel() * t.element_size()].view(t.dtype).view(t.shape)

        own = [view(self.rank, i) for i in range(len(tensors))]
        pulls = []
        for q, source, j in pull_plan(self.rank, self.world, include_self, gather):
            for i, c in enumerate(rows):
                src = view(q, i) if source is None else view(q, i)[source * c:(source + 1) * c]
                pulls.append((src, i, j * c, (j + 1) * c))
        self._recipes[key] = (own, pulls, [nblocks * c for c in rows])
        return self._recipes[key]

    def run(self, tensors: list[torch.Tensor], include_self: bool, gather: bool) -> list[torch.Tensor]:
        """The exchange of each tensor (not differentiable; see :func:`gather_blocks` and
        :func:`swap_blocks`). gather: each tensor is one block ``[C, ...]`` sent to every
        rank; otherwise ``[B * C, ...]``, block ``j`` for the ``j``-th rank. Returns
        ``[B * C, ...]`` per tensor, block ``j`` from the ``j``-th rank."""
        device = tensors[0].device
        if device.type != "cuda":
            raise ValueError(f"transport: 'copy_engine' needs CUDA tensors, got tensors on {device}")
        tensors = [t.contiguous() for t in tensors]
        own, pulls, out_rows = self._recipe(tensors, include_self, gather)
        # made on the caller's stream, written on the communication stream, which it waits for
        outs = [t.new_empty((n,) + tuple(t.shape[1:])) for t, n in zip(tensors, out_rows)]
        main, comm = torch.cuda.current_stream(device), self._stream(device)
        comm.wait_stream(main)
        with torch.cuda.stream(comm):
            for mine, t in zip(own, tensors):
                mine.copy_(t)
            self._handle.barrier(channel=0)
            for src, i, first, end in pulls:
                (outs[i] if end - first == out_rows[i] else outs[i][first:end]).copy_(src)
            self._handle.barrier(channel=0)
        main.wait_stream(comm)
        for t in tensors:  # read on the communication stream: keep their memory until it did
            t.record_stream(comm)
        return outs


def _float_grads(ctx, grads) -> list[torch.Tensor]:
    """The gradients of the floating-point outputs, zeros where autograd passes ``None``
    (every rank must exchange the same tensors, whether or not its outputs were used)."""
    return [torch.zeros(shape, dtype=dtype, device=device) if g is None else g
            for g, (shape, dtype, device) in zip([g for g, f in zip(grads, ctx.float_mask) if f], ctx.float_meta)]


class _Exchange(torch.autograd.Function):
    """``gather`` (all-gather) or swap (personalised all-to-all) of ``tensors``; the backward
    swaps the output gradients back (a swap is its own adjoint) and, for a gather, sums each
    input's blocks (block ``j``: the ``j``-th rank's gradient of this rank's rows) with
    :func:`~moekit.parallel.rows.sum_partials`."""

    @staticmethod
    def forward(ctx, exchange, include_self, gather, *tensors):
        ctx.exchange, ctx.include_self, ctx.gather = exchange, include_self, gather
        ctx.float_mask = [t.is_floating_point() for t in tensors]
        outs = exchange.run(list(tensors), include_self, gather=gather)
        ctx.float_meta = [(o.shape, o.dtype, o.device) for o, f in zip(outs, ctx.float_mask) if f]
        ctx.mark_non_differentiable(*[o for o, f in zip(outs, ctx.float_mask) if not f])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        sent = _float_grads(ctx, grads)
        back = iter(ctx.exchange.run(sent, ctx.include_self, gather=False) if sent else ())
        nblocks = ctx.exchange.world if ctx.include_self else ctx.exchange.world - 1
        out = []
        for f in ctx.float_mask:
            g = next(back) if f else None
            if g is not None and ctx.gather:
                cap = g.shape[0] // nblocks
                g = sum_partials(g, nblocks, cap, cap, g.dtype)
            out.append(g)
        return (None, None, None) + tuple(out)


def _check_tensors(tensors: tuple[torch.Tensor, ...]) -> None:
    if not tensors:
        raise ValueError("tensors: expected at least one tensor to exchange")


def gather_blocks(exchange: CopyEngineExchange, include_self: bool, *tensors: torch.Tensor) -> tuple:
    """All-gather of ``[C, ...]`` blocks over the copy engines: ``[B * C, ...]`` per tensor,
    block ``j`` from the ``j``-th rank (this rank left out unless ``include_self``).
    Differentiable in the floating-point tensors; integer ones travel along."""
    _check_tensors(tensors)
    return _Exchange.apply(exchange, include_self, True, *tensors)


def swap_blocks(exchange: CopyEngineExchange, include_self: bool, *tensors: torch.Tensor) -> tuple:
    """Personalised all-to-all of ``[B * C, ...]`` tensors over the copy engines: block ``j``
    goes to the ``j``-th rank, block ``j`` of the result comes from it. Differentiable in the
    floating-point tensors (its own adjoint)."""
    _check_tensors(tensors)
    return _Exchange.apply(exchange, include_self, False, *tensors)
