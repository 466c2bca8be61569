"""The Triton cross-entropy kernels against the PyTorch-ops kernels and against PyTorch.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest.py before triton is imported) on small CPU tensors with small blocks, so rows span
several blocks and end in a partial one. With a GPU the same tests run on CUDA, and the
``gpu`` tests add vocabulary-sized rows, int64 offsets and the no-recompilation check. One
test compiles the kernels for an H100 (sm_90) without a GPU, which catches code that the
interpreter accepts but the compiler does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
import torch.nn.functional as F  # noqa: E402

from softgrad.torch import cross_entropy  # noqa: E402
from softgrad.torch import use_kernel  # noqa: E402
from softgrad.torch import _torch_cross_entropy as ref_kernels  # noqa: E402
from softgrad.torch import _triton_cross_entropy as tri  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
if not ON_GPU and not tri.INTERPRETED:
    pytest.skip("no CUDA device and triton was imported without TRITON_INTERPRET=1", allow_module_level=True)
# the interpreter warns about the 0 * -inf products that the kernels mask out afterwards
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

F64 = dict(rtol=1e-10, atol=1e-12)
TOL = {torch.float64: F64, torch.float32: dict(rtol=2e-5, atol=2e-6),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
N, C = 6, 37  # 37 columns: two full blocks of 16 and a partial one
VARIANTS = [tri.KernelConfig("two_pass", 16), tri.KernelConfig("two_pass", 32, 2), tri.KernelConfig("one_pass")]
# (probability targets, class weights, label_smoothing, softcap, z_loss)
OPTIONS = [
    (False, False, 0.0, None, 0.0),
    (False, True, 0.2, None, 1e-2),
    (False, False, 0.0, 3.0, 0.0),
    (True, True, 0.1, 2.0, 1e-2),
    (True, False, 0.0, None, 0.0),
]


def _inputs(rng, dtype, prob_target, weighted, n=N, c=C):
    """Logits with a -inf entry, a row offset by 1e4, an ignored row and (index) an out-of-range target."""
    z = torch.from_numpy(rng.normal(size=(n, c)) * 3)
    z[1, 5] = float("-inf")
    z[2] += 1e4
    if prob_target:
        t = torch.from_numpy(rng.dirichlet(np.ones(c), size=n)).to(dtype)
    else:
        t = torch.from_numpy(rng.integers(0, c, size=n))
        t[3] = -100
        t[4] = c + 2  # out of range: the kernels give NaN for this row
    w = torch.from_numpy(rng.uniform(0.5, 1.5, size=c)) if weighted else None
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    return (z.to(dtype).to(DEVICE), t.to(DEVICE), None if w is None else w.to(cdt).to(DEVICE),
            torch.tensor([0.3, 0.7], dtype=cdt, device=DEVICE))


def _run_forward(module, z, t, w, scales, prob, eps, cap, zl, *, config=None, with_grad=True, inplace=False,
                 row_scale=None):
    grad = (z if inplace else torch.empty_like(z)) if with_grad else None
    ce, lse = module.forward(z, t, w, scales, ignore_index=-100, label_smoothing=eps, z_loss=zl, softcap=cap,
                             prob_target=prob, grad_out=grad, row_scale=row_scale, config=config)
    return ce, lse, grad


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: c.variant)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "probs" if o[0] else "index")
def test_fused_forward_matches_pytorch_ops_float64(rng, config, options):
    prob, weighted, eps, cap, zl = options
    z, t, w, scales = _inputs(rng, torch.float64, prob, weighted)
    # a per-row factor on the gradient (linear_cross_entropy's reduction="none" backward) with z-loss
    rs = torch.from_numpy(rng.normal(size=N)).to(DEVICE) if zl else None
    got = _run_forward(tri, z, t, w, scales, prob, eps, cap, zl, config=config, row_scale=rs)
    want = _run_forward(ref_kernels, z, t, w, scales, prob, eps, cap, zl, row_scale=rs)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, equal_nan=True, **F64)
    if not prob:
        assert torch.isnan(got[0][4]) and torch.isnan(got[2][4]).all()  # the out-of-range target
        assert got[0][3] == 0 and torch.count_nonzero(got[2][3]) == 0  # the ignored row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", VARIANTS[::2], ids=lambda c: c.variant)
def test_fused_forward_low_precision_in_place_and_without_grad(rng, dtype, config):
    prob, weighted, eps, cap, zl = OPTIONS[1]
    z, t, w, scales = _inputs(rng, dtype, prob, weighted)
    want = _run_forward(ref_kernels, z, t, w, scales, prob, eps, cap, zl)
    buf = z.clone()
    got = _run_forward(tri, buf, t, w, scales, prob, eps, cap, zl, config=config, inplace=True)
    assert got[2] is buf and got[2].dtype == dtype
    for a, e in zip(got, want):
        # the same float32 arithmetic in both; bf16 differs by the one rounding of the gradient at most
        torch.testing.assert_close(a, e, equal_nan=True, **TOL[dtype])
    ce, lse, _ = _run_forward(tri, z, t, w, scales, prob, eps, cap, zl, config=config, with_grad=False)
    torch.testing.assert_close(ce, want[0], equal_nan=True, **TOL[torch.float32])
    torch.testing.assert_close(lse, want[1], **TOL[torch.float32])


def test_scale_rows_skips_unit_factors(rng):
    g = torch.from_numpy(rng.normal(size=(5, 8200))).to(DEVICE)  # rows of two blocks (8192 + 8)
    # exact in float64; bfloat16 within one ulp (the interpreter truncates float32 -> bfloat16, a GPU rounds)
    for dtype, rtol in ((torch.float64, 0.0), (torch.bfloat16, 2.0**-7)):
        x = g.to(dtype)
        y = x.clone()
        tri.scale_rows_(y, torch.tensor(1.0, device=DEVICE))
        assert torch.equal(y, x)
        tri.scale_rows_(y, torch.tensor(-0.5, device=DEVICE))
        torch.testing.assert_close(y, (x.double() * -0.5).to(dtype), rtol=rtol, atol=0)
        y = x.clone()
        rows = torch.tensor([1.0, 2.0, 0.0, 1.0, -3.0], device=DEVICE)
        tri.scale_rows_(y, rows)
        torch.testing.assert_close(y, (x.double() * rows.double()[:, None]).to(dtype), rtol=rtol, atol=0)
        assert torch.equal(y[[0, 3]], x[[0, 3]])


@pytest.mark.parametrize("prob", [False, True], ids=["index", "probs"])
def test_sharded_stats_and_grad_pass_match_pytorch_ops(rng, prob):
    z, t, w, _ = _inputs(rng, torch.float64, prob, True)
    if not prob:
        t = t.clamp(0, C - 1)
    lo, hi = 11, 30  # one shard of the classes, [11, 30)
    shard = z[:, lo:hi].contiguous()
    t_shard = t[:, lo:hi].contiguous() if prob else t
    opts = dict(class_offset=lo, num_classes=C, label_smoothing=0.1, softcap=2.0, prob_target=prob)
    got = tri.row_stats(shard, t_shard, w[lo:hi], need_dot=True, config=tri.KernelConfig(block_size=16), **opts)
    want = ref_kernels.row_stats(shard, t_shard, w[lo:hi], need_dot=True, **opts)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **F64)
    lse = torch.logsumexp(2.0 * torch.tanh(z / 2.0), dim=1)
    coeffs = torch.from_numpy(rng.normal(size=(N, 3))).to(DEVICE)
    outs = [torch.empty_like(shard) for _ in range(2)]
    tri.grad_pass(shard, t_shard, w[lo:hi], lse, coeffs, outs[0], config=tri.KernelConfig(block_size=16), **opts)
    ref_kernels.grad_pass(shard, t_shard, w[lo:hi], lse, coeffs, outs[1], **opts)
    torch.testing.assert_close(outs[0], outs[1], **F64)


def _must_not_run(*args, **kwargs):
    raise AssertionError("the PyTorch-ops kernel ran where the Triton kernel was requested")


@pytest.mark.parametrize(("shape", "kind", "reduction", "inplace"), [
    ((4, 37, 2), "index", "mean", False),
    ((6, 37), "index", "none", True),
    ((6, 37), "probs", "sum", False),
])
def test_public_api_on_triton_matches_torch(rng, monkeypatch, shape, kind, reduction, inplace):
    # the PyTorch-ops kernels must not run here: this checks Triton's, not a silent fallback
    for name in ("forward", "scale_rows_"):
        monkeypatch.setattr(ref_kernels, name, _must_not_run)
    z0 = torch.from_numpy(rng.normal(size=shape) * 2).to(DEVICE).requires_grad_()
    if kind == "probs":
        y = torch.from_numpy(rng.dirichlet(np.ones(shape[1]), size=shape[0])).to(DEVICE)
    else:
        y = torch.from_numpy(rng.integers(0, shape[1], size=(shape[0],) + shape[2:])).to(DEVICE)
        y.view(-1)[1] = -100
    w = torch.from_numpy(rng.uniform(0.5, 1.5, size=shape[1])).to(DEVICE)
    opts = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    with use_kernel("triton:two_pass:16"):
        loss = cross_entropy(z0 * 1.0, y, inplace_backward=inplace, **opts)
    ref = F.cross_entropy(z0, y, **opts)
    torch.testing.assert_close(loss, ref, **F64)
    up = torch.from_numpy(rng.normal(size=tuple(ref.shape))).to(DEVICE) if reduction == "none" else 3.0 * torch.ones(
        (), dtype=torch.float64, device=DEVICE)
    (g,) = torch.autograd.grad(loss, z0, up)
    (gr,) = torch.autograd.grad(ref, z0, up)
    torch.testing.assert_close(g, gr, **F64)


def test_all_ignored_batch_on_triton(rng):
    z = torch.from_numpy(rng.normal(size=(4, 37))).to(DEVICE).requires_grad_()
    y = torch.full((4,), -100, device=DEVICE)
    with use_kernel("triton:one_pass"):
        loss = cross_entropy(z, y, z_loss=1e-2, label_smoothing=0.1)
        assert cross_entropy(z.detach(), y, reduction="sum").item() == 0.0
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(z, y))
    loss.backward()
    assert torch.count_nonzero(z.grad) == 0


def test_torch_compile_traces_the_triton_path(rng):
    h = torch.from_numpy(rng.normal(size=(5, 4))).to(DEVICE).requires_grad_()
    wt = torch.from_numpy(rng.normal(size=(37, 4))).to(DEVICE).requires_grad_()
    y = torch.from_numpy(rng.integers(0, 37, size=5)).to(DEVICE)

    def step(h, wt, y):
        return cross_entropy(h @ wt.T, y, z_loss=1e-3, softcap=5.0)

    with use_kernel("triton:two_pass:16"):
        loss = torch.compile(step, fullgraph=True, backend="aot_eager")(h, wt, y)
        ours = torch.autograd.grad(loss, (h, wt))
    z = h @ wt.T
    s = 5.0 * torch.tanh(z / 5.0)
    ref = F.cross_entropy(s, y) + 1e-3 * (torch.logsumexp(s, 1) ** 2).mean()
    torch.testing.assert_close(loss, ref, **F64)
    for a, e in zip(ours, torch.autograd.grad(ref, (h, wt))):
        torch.testing.assert_close(a, e, **F64)


def test_kernel_choice_and_config_validation():
    assert tri._resolve(None, 32000, 2) == ("one_pass", 32768, 32)
    assert tri._resolve(None, 32000, 2, heavy=True)[0] == "two_pass"  # too many live registers for one pass
    assert tri._resolve(None, 16000, 2, heavy=True) == ("one_pass", 16384, 32)
    assert tri._resolve(None, 128256, 2) == ("two_pass", 8192, 16)
    assert tri._resolve(None, 128256, 4) == ("two_pass", 4096, 8)
    assert tri._resolve(tri.KernelConfig("two_pass", 1024, 2), 10**6, 2) == ("two_pass", 1024, 2)
    with pytest.raises(ValueError, match="C <= 32768"):
        tri._resolve(tri.KernelConfig("one_pass"), 40000, 2)
    for bad, match in ((dict(variant="fast"), "variant"), (dict(block_size=100), "block_size"),
                       (dict(num_warps=3), "num_warps")):
        with pytest.raises(ValueError, match=match):
            tri.KernelConfig(**bad)
    with pytest.raises(ValueError, match="kernel"):
        with use_kernel("cuda"):
            pass


_COMPILE_FOR_H100 = textwrap.dedent("""
    import json, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from softgrad.torch import _triton_cross_entropy as K
    row = {"X": "*bf16", "stride_x": "i32", "G": "*bf16", "stride_g": "i32", "T": "*i64", "stride_t": "i32",
           "W": "*fp32", "P": "*fp32", "RS": "*fp32", "LOSS": "*fp32", "LSE": "*fp32", "STATS_OUT": "*fp32",
           "n_rows": "i32", "n_cols": "i32", "ignore_index": "i32"}
    plain = dict(HAS_ROW_SCALE=False, HAS_WEIGHT=False, PROB_TARGET=False, SMOOTH=False, HAS_SOFTCAP=False, HAS_ZLOSS=False,
                 WITH_GRAD=True, NEED_DOT=False, STATS=False, ACC=tl.float32)
    every = dict(plain, HAS_ROW_SCALE=True, HAS_WEIGHT=True, SMOOTH=True, HAS_SOFTCAP=True, HAS_ZLOSS=True, NEED_DOT=True,
                 STATS=True)
    probs = dict(every, PROB_TARGET=True)
    f64 = {k: v.replace("bf16", "fp64").replace("fp32", "fp64") for k, v in row.items()}
    probs_sig = dict(row, T="*bf16")
    jobs = [
        ("two_pass", K._ce_two_pass_kernel, row, dict(plain, REVERSE=True, BLOCK=8192, NEG_BIG=-3.4e38), 16),
        ("two_pass_every", K._ce_two_pass_kernel, row, dict(every, REVERSE=False, BLOCK=8192, NEG_BIG=-3.4e38), 16),
        ("two_pass_probs", K._ce_two_pass_kernel, probs_sig, dict(probs, REVERSE=True, BLOCK=4096, NEG_BIG=-3.4e38),
         8),
        ("two_pass_f64", K._ce_two_pass_kernel, f64, dict(every, ACC=tl.float64, REVERSE=True, BLOCK=2048,
                                                          NEG_BIG=-1.7e308), 8),
        ("one_pass", K._ce_one_pass_kernel, row, dict(plain, BLOCK=32768), 32),
        ("one_pass_stats", K._ce_one_pass_kernel, row, dict(plain, STATS=True, BLOCK=16384), 32),
        ("stats", K._ce_stats_kernel,
         {"X": "*bf16", "stride_x": "i32", "T": "*i64", "stride_t": "i32", "W": "*fp32", "P": "*fp32",
          "OUT": "*fp32", "n_rows": "i32", "n_cols": "i32", "class_offset": "i32", "num_classes": "i32"},
         dict(NEED_DOT=True, HAS_WEIGHT=True, PROB_TARGET=False, HAS_SOFTCAP=True, BLOCK=8192, ACC=tl.float32,
              NEG_BIG=-3.4e38, STATS=True), 16),
        ("grad", K._ce_grad_kernel,
         {"X": "*bf16", "stride_x": "i32", "G": "*bf16", "stride_g": "i32", "T": "*i64", "stride_t": "i32",
          "W": "*fp32", "P": "*fp32", "LSE": "*fp32", "COEF": "*fp32", "n_cols": "i32", "class_offset": "i32",
          "num_classes": "i32"},
         dict(NEED_U=True, HAS_WEIGHT=True, PROB_TARGET=False, HAS_SOFTCAP=True, BLOCK=8192, ACC=tl.float32), 16),
        ("scale", K._scale_rows_kernel, {"G": "*bf16", "stride_g": "i32", "S": "*fp32", "stride_s": "i32",
                                         "n_cols": "i32"}, dict(BLOCK=8192, ACC=tl.float32), 8),
    ]
    done = []
    for name, fn, sig, consts, warps in jobs:
        src = triton.compiler.ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}},
                                        constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert len(compiled.asm["cubin"]) > 0
        done.append(name)
    print(json.dumps(done))
""")


@pytest.mark.skipif(ON_GPU, reason="with a GPU the kernels are compiled and run by the other tests")
def test_kernels_compile_for_an_h100_without_a_gpu():
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(json.loads(out.stdout.strip().splitlines()[-1])) == 9


# ----------------------------------------------------------------------------- real GPU only
gpu = pytest.mark.skipif(not ON_GPU, reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("variant", ["auto", "two_pass", "two_pass:4096:8"])
def test_gpu_vocabulary_rows_bfloat16_within_upcast_reference(variant):
    g = torch.Generator(device="cuda").manual_seed(1)
    n, v = 64, 128256
    z = (torch.randn(n, v, device="cuda", generator=g) * 2).bfloat16()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[3] = -100
    zr = z.float().requires_grad_()
    ref = F.cross_entropy(zr, y, label_smoothing=0.1)
    ref.backward()
    for inplace in (False, True):
        zz = (z * 1).requires_grad_() if not inplace else z.clone().requires_grad_()
        src = zz if not inplace else zz * 1  # in place needs a non-leaf
        with use_kernel(f"triton:{variant}"):
            loss = cross_entropy(src, y, label_smoothing=0.1, inplace_backward=inplace)
        loss.backward()
        torch.testing.assert_close(loss.float(), ref, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(zz.grad.float(), zr.grad.bfloat16().float(), rtol=2e-2, atol=1e-7)


@pytest.mark.gpu
@gpu
def test_gpu_no_recompilation_per_vocabulary_size():
    kernel = tri._ce_two_pass_kernel
    if not hasattr(kernel, "device_caches"):
        pytest.skip("this triton version keeps its kernel cache elsewhere")
    sizes = []
    for v in (40000, 50257, 128256, 256000, 1_000_003):
        z = torch.randn(4, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = torch.randint(0, v, (4,), device="cuda")
        with use_kernel("triton:two_pass"):
            loss = cross_entropy(z, y)
        loss.backward()
        torch.testing.assert_close(loss.float(), F.cross_entropy(z.float(), y), rtol=1e-2, atol=1e-2)
        sizes.append(len(kernel.device_caches[torch.cuda.current_device()][0]))
    assert sizes[-1] == sizes[0], sizes


@pytest.mark.gpu
@gpu
def test_gpu_int64_offsets_past_two_to_the_31():
    n, v = 16400, 131072  # n * v > 2**31 elements
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * v * 2:
        pytest.skip("needs ~13 GB of free GPU memory")
    z = torch.zeros(n, v, device="cuda", dtype=torch.bfloat16)
    z[-2:].normal_()
    y = torch.randint(0, v, (n,), device="cuda")
    loss = cross_entropy(z, y, reduction="none")
    tail = F.cross_entropy(z[-2:].float(), y[-2:], reduction="none")
    torch.testing.assert_close(loss[-2:].float(), tail, rtol=1e-2, atol=1e-2)
    assert torch.isfinite(loss).all()


# ----------------------------------------------------------------------------- linear_cross_entropy on the fused kernel
@pytest.fixture
def fused_chunks(monkeypatch):
    """linear_cross_entropy's chunks through the Triton kernel (interpreted on CPU), never the PyTorch-ops rows."""
    monkeypatch.setattr(ref_kernels, "forward", _must_not_run)
    with use_kernel("triton:two_pass:16"):
        yield


def _linear_reference(h, w, b, t, *, reduction, label_smoothing=0.0, z_loss=0.0, softcap=None):
    z = F.linear(h, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = t != -100
    loss = F.cross_entropy(z, t, reduction="none", label_smoothing=label_smoothing)
    loss = loss + z_loss * torch.logsumexp(z, dim=1) ** 2 * valid
    return {"mean": loss.sum() / valid.sum(), "sum": loss.sum(), "none": loss}[reduction]


@pytest.mark.parametrize(("reduction", "options"), [
    ("mean", {}),
    ("none", {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}),  # backward recomputes with row scales
    ("sum", {"z_loss": 1e-3}),
])
def test_linear_cross_entropy_chunks_on_the_fused_kernel(rng, fused_chunks, reduction, options):
    from softgrad.torch import _linear_cross_entropy as lce

    h = torch.from_numpy(rng.normal(size=(10, 6))).to(DEVICE).requires_grad_()
    w = torch.from_numpy(rng.normal(size=(37, 6)) * 0.5).to(DEVICE).requires_grad_()
    b = torch.from_numpy(rng.normal(size=37)).to(DEVICE).requires_grad_()
    t = torch.from_numpy(rng.integers(0, 37, size=10)).to(DEVICE)
    t[[2, 7]] = -100
    ours = lce.linear_cross_entropy(h, w, t, b, reduction=reduction, chunk_size=4, **options)
    ref = _linear_reference(h, w, b, t, reduction=reduction, **options)
    torch.testing.assert_close(ours, ref, **F64)
    up = torch.from_numpy(rng.normal(size=tuple(ref.shape))).to(DEVICE)
    for a, e in zip(torch.autograd.grad(ours, (h, w, b), up), torch.autograd.grad(ref, (h, w, b), up)):
        torch.testing.assert_close(a, e, **F64)


def test_linear_cross_entropy_fused_bfloat16_and_compiled(rng, fused_chunks):
    from softgrad.torch import _linear_cross_entropy as lce

    h64 = torch.from_numpy(rng.normal(size=(12, 8))).to(DEVICE)
    w64 = torch.from_numpy(rng.normal(size=(40, 8)) * 0.3).to(DEVICE)
    t = torch.from_numpy(rng.integers(0, 40, size=12)).to(DEVICE)
    hb, wb = h64.bfloat16().requires_grad_(), w64.bfloat16().requires_grad_()
    ours = lce.linear_cross_entropy(hb, wb, t, chunk_size=5, label_smoothing=0.1)
    ours.backward()
    hr, wr = hb.detach().double().requires_grad_(), wb.detach().double().requires_grad_()
    ref = _linear_reference(hr, wr, None, t, reduction="mean", label_smoothing=0.1)
    ref.backward()
    assert hb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(hb.grad.double(), hr.grad, rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(wb.grad.double(), wr.grad, rtol=5e-2, atol=2e-3)
    # torch.compile sees the chunks' fused kernel as the opaque softgrad::cross_entropy_rows_ operator
    h, w = h64.clone().requires_grad_(), w64.clone().requires_grad_()
    step = torch.compile(lambda h, w, t: lce.linear_cross_entropy(h, w, t, chunk_size=5, z_loss=1e-3),
                         fullgraph=True, backend="aot_eager")
    loss = step(h, w, t)
    ref = _linear_reference(h, w, None, t, reduction="mean", z_loss=1e-3)
    torch.testing.assert_close(loss, ref, **F64)
    for a, e in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(a, e, **F64)
