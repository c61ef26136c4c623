"""moekit's Triton grouped GEMMs on CUDA equal ``torch._grouped_mm`` on the six GEMMs of the
expert path (bf16 / fp16 on the Qwen3 and DeepSeek-slice benchmark shapes, fp32 on fewer
tokens of the same widths), and keep their contract on ragged edge cases: experts without
rows, NaN-poisoned ``-1`` tail rows never read or written, widths off the tile grid, Zipf
group sizes.

Bounds are relative Frobenius errors against ``torch._grouped_mm`` (CUTLASS, fp32
accumulation): both round the fp32 sum once to the output dtype, but sum in a different order,
so they differ by about one rounding of that dtype (2^-8 bf16, 2^-11 fp16); fp32 allows for a
TF32 reference.
"""

import pytest
import torch

from moekit.experts import triton_gmm as tg

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-3}
CONFIGS = [tg.DEFAULT_M_CONFIG, tg.DEFAULT_K_CONFIG, tg.GmmConfig(128, 128, 64, 4, 4, flatten=True),
           tg.GmmConfig(128, 256, 64, 4, 8, epilogue_subtile=True)]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _offs(counts):
    return torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)


def _counts(N, E, kind, gen):
    """Rows per expert summing to ``N``: equal-ish (uniform) or Zipf(1.2) shares."""
    if kind == "zipf":
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
    else:
        p = torch.ones(E, dtype=torch.float64)
    idx = torch.multinomial(p / p.sum(), N, replacement=True, generator=gen)
    return torch.bincount(idx, minlength=E).tolist()


def _six(N, D, F, E, counts, dtype, gen, config):
    """``{gemm: (triton result, torch._grouped_mm result)}`` for the layouts of grouped.py."""
    H = 2 * F
    offs = _offs(counts)

    cuda_gen = torch.Generator(device="cuda").manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=cuda_gen) * scale).to(dtype)

    x, dy, a, dh = rnd(N, D), rnd(N, D), rnd(N, F), rnd(N, H)
    w_in, w_out = rnd(E, H, D, scale=D ** -0.5), rnd(E, D, F, scale=F ** -0.5)
    gmm = torch._grouped_mm
    m_, k_ = tg.gmm_m_grouped, tg.gmm_k_grouped
    return {
        "gate+up": (m_(x, w_in, offs, w_is_ok=True, config=config), gmm(x, w_in.transpose(-2, -1), offs=offs)),
        "down": (m_(a, w_out, offs, w_is_ok=True, config=config), gmm(a, w_out.transpose(-2, -1), offs=offs)),
        "dau": (m_(dy, w_out, offs, w_is_ok=False, config=config), gmm(dy, w_out, offs=offs)),
        "dw_out": (k_(dy, a, offs, config=config), gmm(dy.t(), a, offs=offs)),
        "dw_in": (k_(dh, x, offs, config=config), gmm(dh.t(), x, offs=offs)),
        "dx": (m_(dh, w_in, offs, w_is_ok=False, config=config), gmm(dh, w_in, offs=offs)),
    }


@pytest.mark.parametrize("kind", ["uniform", "zipf"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16384, 2048, 768, 128, 8), (8192, 7168, 2048, 32, 8)], ids=["qwen3", "deepseek"])
def test_six_gemms_match_grouped_mm(shape, dtype, kind):
    T, D, F, E, K = shape
    gen = torch.Generator().manual_seed(0)
    counts = _counts(T * K, E, kind, gen)
    for gemm, (got, want) in _six(T * K, D, F, E, counts, dtype, gen, None).items():
        assert got.dtype == dtype and got.shape == want.shape, gemm
        assert _rel(got, want) < TOL[dtype], (gemm, _rel(got, want))


def test_six_gemms_fp32():
    gen = torch.Generator().manual_seed(1)
    T, D, F, E, K = 1024, 2048, 768, 128, 8
    counts = _counts(T * K, E, "zipf", gen)
    for gemm, (got, want) in _six(T * K, D, F, E, counts, torch.float32, gen, None).items():
        assert _rel(got, want) < TOL[torch.float32], (gemm, _rel(got, want))


@pytest.mark.parametrize("config", CONFIGS, ids=["default_m", "default_k", "128x128_flat", "subtile_s4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ragged_edges(dtype, config):
    """Empty experts (first, middle, last), groups shorter than a tile and longer than one,
    widths off the tile grid, NaN tail rows that must neither reach a result nor be written."""
    gen = torch.Generator().manual_seed(2)
    counts = [0, 1, 300, 0, 129, 77, 0]
    E, nv, tail, K, O = len(counts), sum(counts), 40, 200, 136
    offs = _offs(counts)
    a = torch.randn(nv + tail, K, generator=gen).to("cuda", dtype)
    a[nv:] = float("nan")
    for w_is_ok in (True, False):
        w = torch.randn(E, *((O, K) if w_is_ok else (K, O)), generator=gen).to("cuda", dtype)
        out = torch.full((nv + tail, O), 7.0, device="cuda", dtype=dtype)
        tg.gmm_m_grouped(a, w, offs, w_is_ok=w_is_ok, config=config, out=out)
        want = torch._grouped_mm(a[:nv], w.transpose(-2, -1) if w_is_ok else w, offs=offs)
        assert _rel(out[:nv], want) < TOL[dtype]
        assert torch.all(out[nv:] == 7.0)
    b = torch.randn(nv + tail, O, generator=gen).to("cuda", dtype)
    b[nv:] = float("nan")
    got = tg.gmm_k_grouped(a, b, offs, config=config)
    assert torch.isfinite(got).all()
    assert _rel(got, torch._grouped_mm(a[:nv].t(), b[:nv], offs=offs)) < TOL[dtype]
    for e in (0, 3, 6):
        assert torch.all(got[e] == 0)
    # accumulate (the joined weight gradient): out += a^T b, empty experts keep their value
    prev = torch.randn(E, K, O, generator=gen).to("cuda", dtype)
    acc = tg.gmm_k_grouped(a, b, offs, config=config, out=prev.clone(), accumulate=True)
    want = prev.double() + torch._grouped_mm(a[:nv].float().t(), b[:nv].float(), offs=offs).double()
    assert _rel(acc, want) < TOL[dtype]
    for e in (0, 3, 6):
        assert torch.equal(acc[e], prev[e])


def test_no_host_sync():
    """The tile schedule is read on the device: no synchronisation in either kernel."""
    gen = torch.Generator().manual_seed(3)
    counts = [5, 0, 260, 31]
    offs = _offs(counts)
    a = torch.randn(sum(counts), 64, generator=gen).to("cuda", torch.bfloat16)
    w = torch.randn(4, 48, 64, generator=gen).to("cuda", torch.bfloat16)
    b = torch.randn(sum(counts), 48, generator=gen).to("cuda", torch.bfloat16)
    tg.gmm_m_grouped(a, w, offs, w_is_ok=True)  # compile outside the check
    tg.gmm_k_grouped(a, b, offs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tg.gmm_m_grouped(a, w, offs, w_is_ok=True)
        tg.gmm_k_grouped(a, b, offs)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_sm_carveout_gives_the_same_results():
    """Under PyTorch's SM carveout the persistent grid is smaller (fewer programs walk the same
    tiles): results are bit-identical to the full grid's."""
    from moekit.parallel import sm_carveout

    gen = torch.Generator().manual_seed(4)
    counts = [0, 700, 129, 513, 0, 260]
    offs = _offs(counts)
    a = torch.randn(sum(counts), 256, generator=gen).to("cuda", torch.bfloat16)
    w = torch.randn(len(counts), 384, 256, generator=gen).to("cuda", torch.bfloat16)
    b = torch.randn(sum(counts), 384, generator=gen).to("cuda", torch.bfloat16)
    full = tg.gmm_m_grouped(a, w, offs, w_is_ok=True), tg.gmm_k_grouped(a, b, offs)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with sm_carveout(sms - 5):
        assert tg._programs_for(a) == 5
        carved = tg.gmm_m_grouped(a, w, offs, w_is_ok=True), tg.gmm_k_grouped(a, b, offs)
    for got, want in zip(carved, full):  # a holds no tail rows: every output row is written
        assert torch.equal(got, want)
