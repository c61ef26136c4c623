"""moekit's Triton grouped GEMMs (:mod:`moekit.experts.triton_gmm`) in Triton's interpreter:
both layouts of the M-grouped product and the K-grouped weight gradient (also accumulated into
an existing output) equal a per-expert loop, with experts of zero rows, ``-1`` tail rows poisoned with NaN (never read, never
written), and reduction / output widths that are not multiples of the tile.

fp32 and fp16 only: the interpreter's ``tl.dot`` multiplies bf16 operands as their raw 16-bit
integers (numpy has no bf16), so bf16 is checked on the GPU (``test_triton_gmm_gpu.py``)."""

import textwrap

# Run by the run_interpreted fixture (conftest.py: TRITON_INTERPRET=1 in a fresh process).
_CHECK = textwrap.dedent("""
    import torch

    from moekit.experts import triton_gmm as tg

    def loop_m(a, w, offs, w_is_ok):
        out, start = [], 0
        for e, end in enumerate(offs.tolist()):
            we = w[e].double()
            out.append(a[start:end].double() @ (we.t() if w_is_ok else we))
            start = end
        return torch.cat(out)

    def loop_k(a, b, offs):
        out, start = [], 0
        for end in offs.tolist():
            out.append(a[start:end].double().t() @ b[start:end].double())
            start = end
        return torch.stack(out)

    def rel(x, y):
        return ((x.double() - y).norm() / y.norm().clamp_min(1e-30)).item()

    g = torch.Generator().manual_seed(0)
    # K (reduction) 40 and O 24 are not multiples of the 16-wide tiles; experts 1 and 4 are empty;
    # expert 3 spans more row tiles than a swizzle group (8); 5 tail rows of -1 slots carry NaN.
    counts = [19, 0, 7, 150, 0, 17]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    E, nv, tail, K, O = len(counts), sum(counts), 5, 40, 24
    cases = ((torch.float32, 1e-6, tg.GmmConfig(16, 16, 16, 1, 4)),
             (torch.float16, 2e-3, tg.GmmConfig(16, 32, 16, 2, 4, flatten=True, epilogue_subtile=True)))
    for dtype, tol, cfg in cases:
        a = torch.randn(nv + tail, K, generator=g).to(dtype); a[nv:] = float("nan")
        for w_is_ok in (True, False):
            w = torch.randn(E, *((O, K) if w_is_ok else (K, O)), generator=g).to(dtype)
            out = tg.gmm_m_grouped(a, w, offs, w_is_ok=w_is_ok, config=cfg)
            assert out.shape == (nv + tail, O) and out.dtype == dtype
            assert rel(out[:nv], loop_m(a[:nv], w, offs, w_is_ok)) < tol, (dtype, w_is_ok)
            # rows of -1 slots are never written: a preset output keeps its tail
            preset = torch.full_like(out, 7.0)
            assert tg.gmm_m_grouped(a, w, offs, w_is_ok=w_is_ok, config=cfg, out=preset) is preset
            assert torch.equal(preset[:nv], out[:nv]) and torch.all(preset[nv:] == 7.0)
        b = torch.randn(nv + tail, O, generator=g).to(dtype); b[nv:] = float("nan")
        out = tg.gmm_k_grouped(a, b, offs, config=cfg)
        assert out.shape == (E, K, O) and torch.isfinite(out).all()
        assert rel(out, loop_k(a[:nv], b[:nv], offs)) < tol, dtype
        assert torch.all(out[1] == 0) and torch.all(out[4] == 0)  # empty experts: exact zeros
        # against torch._grouped_mm itself (the op the kernels stand in for)
        ref = torch._grouped_mm(a[:nv].t(), b[:nv], offs=offs)
        assert rel(out, ref.double()) < tol
        # accumulate: out += a^T b per expert; experts without rows keep their old value exactly
        prev = torch.randn(E, K, O, generator=g).to(dtype)
        acc = prev.clone()
        assert tg.gmm_k_grouped(a, b, offs, config=cfg, out=acc, accumulate=True) is acc
        assert rel(acc, prev.double() + loop_k(a[:nv], b[:nv], offs)) < tol, dtype
        assert torch.equal(acc[1], prev[1]) and torch.equal(acc[4], prev[4])
        # out without accumulate overwrites; no rows at all leaves an accumulated out as it was
        over = torch.full_like(prev, 3.0)
        assert torch.equal(tg.gmm_k_grouped(a, b, offs, config=cfg, out=over), out)
        zero_offs = torch.zeros(E, dtype=torch.int32)
        kept = prev.clone()
        tg.gmm_k_grouped(a[:0], b[:0], zero_offs, config=cfg, out=kept, accumulate=True)
        assert torch.equal(kept, prev)
        for bad in (dict(accumulate=True), dict(out=prev[:, :1]), dict(out=prev.double(), accumulate=True)):
            try:
                tg.gmm_k_grouped(a, b, offs, config=cfg, **bad)
            except ValueError as err:
                assert "out" in str(err), err
            else:
                raise AssertionError(f"accepted {list(bad)}")
    print("ok")
""")


def test_triton_gmm_in_interpreter(run_interpreted):
    run_interpreted(_CHECK)
