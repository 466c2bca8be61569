"""Every cross-entropy implementation against one independent float64 oracle.

The oracle below is written from the definition (PyTorch's ``F.cross_entropy`` semantics plus
z-loss and softcap), row by row in plain Python floats, sharing no code with
:mod:`softgrad._cross_entropy_rule`; its gradient is central differences of itself. Each
implementation -- the NumPy reference, the Numba kernels, ``softgrad.torch.cross_entropy``
on the PyTorch-ops rows and on the Triton kernels (interpreted without a GPU),
``linear_cross_entropy`` with an identity head, and the vocabulary-parallel function on one
rank -- must give the oracle's loss and gradient on the same grid of options, including the
extremes the rule has conventions for: ``-inf`` masks, a zero class weight on a ``-inf``
class (``0 * -inf`` counts 0), logits of +-1e4, all rows ignored, one class.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import softgrad

try:
    import torch
except ImportError:  # pragma: no cover - the NumPy side runs without PyTorch
    torch = None

NEG_INF = -math.inf


# ----------------------------------------------------------------------------- the oracle
def _oracle_row(z_row, target_row, *, weight, ignore_index, label_smoothing, z_loss, softcap, prob_target):
    """One row's ``(ce, z_loss term, counts in the mean, weight in the mean)``, straight from the definition."""
    c = len(z_row)
    w = [1.0] * c if weight is None else [float(x) for x in weight]
    eps = label_smoothing
    s = [float(v) for v in z_row]
    if softcap is not None:
        s = [softcap * math.tanh(v / softcap) for v in s]
    m = max(s)
    lse = m + math.log(sum(math.exp(v - m) for v in s)) if m != NEG_INF else NEG_INF
    logp = [v - lse for v in s]
    if prob_target:
        q = [(1 - eps) * float(target_row[k]) + eps / c for k in range(c)]
        ce = -sum(w[k] * q[k] * logp[k] for k in range(c) if w[k] * q[k] != 0)  # a zero coefficient counts 0
        return ce, z_loss * lse * lse, 1.0, 1.0
    y = int(target_row)
    if y == ignore_index:
        return 0.0, 0.0, 0.0, 0.0
    ce = 0.0
    if (1 - eps) * w[y] != 0:
        ce -= (1 - eps) * w[y] * logp[y]
    if eps:
        ce -= eps / c * sum(w[k] * logp[k] for k in range(c) if w[k] != 0)
    return ce, z_loss * lse * lse, 1.0, w[y]


def _oracle(z, target, upstream, *, reduction, h=1e-5, **kw):
    """``(loss, d <upstream, loss> / dz)``: PyTorch's reductions over the rows, central differences per entry.

    Only row ``i`` depends on ``z[i]`` and the mean's denominators do not depend on ``z``, so
    each entry's difference quotient needs its own row alone. ``-inf`` logits get 0 (no
    probability mass moves there); a mean over nothing is NaN with a zero gradient, as PyTorch.
    """
    rows = [_oracle_row(z[i], target[i], **kw) for i in range(z.shape[0])]
    ce = np.array([r[0] for r in rows])
    zr = np.array([r[1] for r in rows])
    count = sum(r[2] for r in rows)
    denom = sum(r[3] for r in rows)
    if reduction == "none":
        loss = ce + zr
        factors = [(upstream[i], upstream[i]) for i in range(z.shape[0])]
    elif reduction == "sum":
        loss = np.array(ce.sum() + zr.sum())
        factors = [(float(upstream), float(upstream))] * z.shape[0]
    else:
        z_part = zr.sum() / count if count else 0.0
        loss = np.array((ce.sum() / denom if denom else math.nan) + z_part)
        kappa = 1.0 / denom if denom else 0.0
        zeta = 1.0 / count if count else 0.0
        factors = [(float(upstream) * kappa, float(upstream) * zeta)] * z.shape[0]
    grad = np.zeros_like(z)
    for i, k in itertools.product(range(z.shape[0]), range(z.shape[1])):
        if math.isinf(z[i, k]) or factors[i] == (0.0, 0.0):
            continue
        zp, zm = z[i].copy(), z[i].copy()
        zp[k] += h
        zm[k] -= h
        (cp, zlp, _, _), (cm, zlm, _, _) = _oracle_row(zp, target[i], **kw), _oracle_row(zm, target[i], **kw)
        grad[i, k] = (factors[i][0] * (cp - cm) + factors[i][1] * (zlp - zlm)) / (2 * h)
    return loss, grad


# ----------------------------------------------------------------------------- the problems
def _problem(rng, case):
    """``(z (N, C) float64, target, weight or None, options)`` for a named case."""
    n, c = 5, 7
    z = rng.normal(size=(n, c)) * 2
    y = rng.integers(0, c, size=n)
    weight = None
    if case == "plain":
        pass
    elif case == "masked":  # -inf masks, one row with a single finite class
        z[0, [1, 4]] = NEG_INF
        z[2, :] = NEG_INF
        z[2, 3] = 0.5
        y[0], y[2] = 0, 3
    elif case == "zero_weight_on_masked_class":  # the seeds of the rule: 0 * -inf counts 0
        z[:, 0] = NEG_INF
        y[:] = rng.integers(1, c, size=n)
        weight = rng.uniform(0.5, 2.0, size=c)
        weight[0] = 0.0
    elif case == "large":  # logits of +-1e4: no overflow, no cancellation
        z = rng.choice([-1e4, 1e4], size=(n, c)) + rng.normal(size=(n, c))
    elif case == "ignored":
        y[[1, 3]] = -100
    elif case == "all_ignored":
        y[:] = -100
    elif case == "one_class":
        z = z[:, :1]
        y[:] = 0
    else:  # pragma: no cover
        raise AssertionError(case)
    return z, y, weight


CASES = ["plain", "masked", "zero_weight_on_masked_class", "large", "ignored", "all_ignored", "one_class"]
OPTIONS = [
    dict(),
    dict(label_smoothing=0.2),
    dict(z_loss=1e-2),
    dict(softcap=3.0),
    dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0),
]
REDUCTIONS = ["mean", "sum", "none"]


def _skip_undefined(case, options, weighted):
    # label smoothing puts weight on every class: a -inf class then has an infinite loss in
    # every implementation (and in PyTorch); the softcap maps -inf to -cap, so it is finite again
    if case in ("masked", "zero_weight_on_masked_class") and options.get("label_smoothing"):
        if options.get("softcap") is None and not (case == "zero_weight_on_masked_class" and weighted):
            return True
    return False


def _row_all_masked_on_some_shard(z, widths):
    """Whether some shard of the columns holds only ``-inf`` in some row (the combine's special case)."""
    edges = np.cumsum([0] + list(widths))
    return any(np.isneginf(z[:, a:b]).all(axis=1).any() for a, b in zip(edges[:-1], edges[1:]) if b > a)


def _scale(loss):
    finite = np.abs(np.asarray(loss)[np.isfinite(loss)])
    return max(1.0, float(finite.max(initial=0.0)))


def _expected(z, y, weight, options, reduction, upstream, prob_target=False):
    kw = dict(weight=weight, ignore_index=-100, label_smoothing=options.get("label_smoothing", 0.0),
              z_loss=options.get("z_loss", 0.0), softcap=options.get("softcap"), prob_target=prob_target)
    return _oracle(z, y, upstream, reduction=reduction, **kw)


# ----------------------------------------------------------------------------- implementations
def _numpy_api(backend):
    def run(z, y, weight, options, reduction, upstream):
        with softgrad.use_backend(backend):
            loss, grad = softgrad.softmax_cross_entropy(z, y, weight=weight, reduction=reduction, **options)
        # reduction="none": the returned gradient is that of the sum, row by row: scale by upstream
        grad = grad * (upstream[:, None] if reduction == "none" else upstream)
        return np.asarray(loss, dtype=np.float64), grad
    return run


def _torch_ce(kernel):
    def run(z, y, weight, options, reduction, upstream):
        from softgrad.torch import cross_entropy, use_kernel

        zt = torch.from_numpy(z).requires_grad_()
        wt = None if weight is None else torch.from_numpy(weight)
        with use_kernel(kernel):
            loss = cross_entropy(zt, torch.from_numpy(y), weight=wt, reduction=reduction, **options)
            (grad,) = torch.autograd.grad(loss, zt, torch.as_tensor(upstream))
        return loss.detach().numpy(), grad.numpy()
    return run


def _torch_linear(z, y, weight, options, reduction, upstream):
    # hidden = z, W = I: the head's logits are z itself
    from softgrad.torch import linear_cross_entropy

    if weight is not None:
        pytest.skip("linear_cross_entropy has no class weights")
    zt = torch.from_numpy(z.copy())
    if not np.isfinite(z).all():
        pytest.skip("-inf logits cannot come out of a finite matmul")
    h = zt.clone().requires_grad_()
    eye = torch.eye(z.shape[1], dtype=torch.float64)
    loss = linear_cross_entropy(h, eye, torch.from_numpy(y), reduction=reduction, chunk_size=2, **options)
    (grad,) = torch.autograd.grad(loss, h, torch.as_tensor(upstream))
    return loss.detach().numpy(), grad.numpy()


def _torch_linear_triton(*args):
    from softgrad.torch import use_kernel

    with use_kernel("triton:two_pass:16"):
        return _torch_linear(*args)


def _vocab_parallel(z, y, weight, options, reduction, upstream):
    import torch.distributed as dist

    from softgrad.distributed import vocab_parallel_cross_entropy

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        zt = torch.from_numpy(z).requires_grad_()
        wt = None if weight is None else torch.from_numpy(weight)
        loss = vocab_parallel_cross_entropy(zt, torch.from_numpy(y), weight=wt, reduction=reduction, **options)
        (grad,) = torch.autograd.grad(loss, zt, torch.as_tensor(upstream))
    finally:
        if created:
            dist.destroy_process_group()
    return loss.detach().numpy(), grad.numpy()


def _implementations():
    impls = [pytest.param(_numpy_api(b), id=f"numpy-api[{b}]") for b in softgrad.available_backends()]
    if torch is not None:
        impls.append(pytest.param(_torch_ce("torch"), id="torch[torch-ops]"))
        try:
            from softgrad.torch import _triton_cross_entropy as tri

            if tri.INTERPRETED or torch.cuda.is_available():
                impls.append(pytest.param(_torch_ce("triton:two_pass:16"), id="torch[triton]"))
        except ImportError:
            pass
        impls.append(pytest.param(_torch_linear, id="linear_cross_entropy"))
        if any("triton" in p.id for p in impls):
            impls.append(pytest.param(_torch_linear_triton, id="linear_cross_entropy[triton chunks]"))
        impls.append(pytest.param(_vocab_parallel, id="vocab_parallel[1 rank]"))
    return impls


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("impl", _implementations())
@pytest.mark.parametrize("case", CASES)
def test_every_implementation_matches_the_oracle(rng, impl, case):
    z, y, weight = _problem(rng, case)
    ran = 0
    for options, reduction, weighted in itertools.product(OPTIONS, REDUCTIONS, [False, True]):
        if _skip_undefined(case, options, weighted):
            continue
        if case == "zero_weight_on_masked_class":
            w = weight if weighted else None
        else:
            w = rng.uniform(0.5, 2.0, size=z.shape[1]) if weighted else None
        upstream = rng.normal(size=z.shape[0]) if reduction == "none" else np.array(1.7)
        want_loss, want_grad = _expected(z, y, w, options, reduction, upstream)
        try:
            loss, grad = impl(z, y, w, options, reduction, upstream)
        except pytest.skip.Exception:
            continue
        ran += 1
        where = f"case={case} options={options} reduction={reduction} weighted={w is not None}"
        np.testing.assert_allclose(loss, want_loss, rtol=1e-9, atol=1e-9, err_msg=where)
        # central differences with h = 1e-5: truncation ~1e-10, rounding ~1e-16 |loss| / h (1e-5 at 1e4 logits
        # with a z-loss, whose rows are ~1e6)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6 + 1e-10 * _scale(want_loss), err_msg=where)
    if not ran:
        pytest.skip(f"the implementation does not take the inputs of case {case!r}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("impl", _implementations())
def test_probability_targets_match_the_oracle(rng, impl):
    if getattr(impl, "__name__", "").startswith("_torch_linear"):
        pytest.skip("linear_cross_entropy takes class indices")
    z = rng.normal(size=(4, 6)) * 2
    t = rng.dirichlet(np.ones(6), size=4)
    t[0] = 0.0
    t[0, 2] = 1.0  # a one-hot row
    for options, reduction in itertools.product(OPTIONS, REDUCTIONS):
        w = rng.uniform(0.5, 2.0, size=6)
        upstream = rng.normal(size=4) if reduction == "none" else np.array(0.6)
        want_loss, want_grad = _expected(z, t, w, options, reduction, upstream, prob_target=True)
        loss, grad = impl(z, t, w, options, reduction, upstream)
        where = f"options={options} reduction={reduction}"
        np.testing.assert_allclose(loss, want_loss, rtol=1e-9, atol=1e-9, err_msg=where)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6, err_msg=where)


def test_the_oracle_is_pytorch_where_pytorch_has_the_option(rng):
    # the oracle itself, held to F.cross_entropy on the options PyTorch has
    F = pytest.importorskip("torch.nn.functional")
    z, y, _ = _problem(rng, "ignored")
    w = rng.uniform(0.5, 2.0, size=z.shape[1])
    for reduction, eps in itertools.product(REDUCTIONS, [0.0, 0.3]):
        ref = F.cross_entropy(torch.from_numpy(z), torch.from_numpy(y), weight=torch.from_numpy(w),
                              reduction=reduction, label_smoothing=eps).numpy()
        got, _ = _oracle(z, y, np.ones(z.shape[0]) if reduction == "none" else np.array(1.0), reduction=reduction, weight=w, ignore_index=-100,
                         label_smoothing=eps, z_loss=0.0, softcap=None, prob_target=False)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", softgrad.available_backends())
def test_a_million_classes(backend):
    rng = np.random.default_rng(7)
    z = rng.normal(size=(2, 10**6)).astype(np.float32)
    y = np.array([3, 999_999])
    with softgrad.use_backend(backend):
        loss, grad = softgrad.softmax_cross_entropy(z, y, reduction="none", label_smoothing=0.1)
    z64 = z.astype(np.float64)
    lse = np.log(np.exp(z64 - z64.max(1, keepdims=True)).sum(1)) + z64.max(1)
    logp = z64 - lse[:, None]
    want = -(0.9 * logp[[0, 1], y] + 0.1 * logp.mean(1))
    np.testing.assert_allclose(loss, want, rtol=2e-5)
    assert grad.dtype == np.float32
    np.testing.assert_allclose(grad.sum(1), 0.0, atol=1e-4)


# ----------------------------------------------------------------------------- low precision
# (loss rtol, gradient atol): the oracle runs on the inputs rounded to the dtype, so what is
# left is the arithmetic (float32 inside every implementation) and the output's rounding
LOW_PRECISION = {"float32": (1e-5, 1e-6), "float16": (2e-3, 2e-3), "bfloat16": (1e-2, 1e-2)}


def _low_precision_runners():
    runners = [pytest.param(b, id=f"numpy-api[{b}]") for b in softgrad.available_backends()]
    if torch is not None:
        runners += [pytest.param("torch", id="torch[torch-ops]"), pytest.param("linear", id="linear_cross_entropy")]
        try:
            from softgrad.torch import _triton_cross_entropy as tri

            if tri.INTERPRETED or torch.cuda.is_available():
                runners += [pytest.param("triton:two_pass:16", id="torch[triton]"),
                            pytest.param("linear-triton", id="linear_cross_entropy[triton chunks]")]
        except ImportError:
            pass
    return runners


def _run_low(runner, z, y, dtype, options, reduction, upstream):
    """Loss and gradient (as float64 arrays) from ``runner`` on ``z`` cast to ``dtype``."""
    if runner in softgrad.available_backends():
        if dtype == "bfloat16":
            pytest.skip("NumPy has no bfloat16")
        with softgrad.use_backend(runner):
            loss, grad = softgrad.softmax_cross_entropy(z.astype(dtype), y, reduction=reduction, **options)
        assert grad.dtype == np.dtype(dtype)
        grad = grad.astype(np.float64) * (upstream[:, None] if reduction == "none" else upstream)
        return np.asarray(loss, dtype=np.float64), grad
    from softgrad.torch import cross_entropy, linear_cross_entropy, use_kernel

    tdt = getattr(torch, dtype)
    x = torch.from_numpy(z).to(tdt).requires_grad_()
    kernel = "triton:two_pass:16" if runner in ("linear-triton", "triton:two_pass:16") else "torch"
    with use_kernel(kernel):
        if runner.startswith("linear"):
            eye = torch.eye(z.shape[1], dtype=tdt)
            loss = linear_cross_entropy(x, eye, torch.from_numpy(y), reduction=reduction, chunk_size=2, **options)
        else:
            loss = cross_entropy(x, torch.from_numpy(y), reduction=reduction, **options)
        (grad,) = torch.autograd.grad(loss, x, torch.as_tensor(upstream).to(loss.dtype))
    assert loss.dtype == tdt and grad.dtype == tdt
    return loss.detach().double().numpy(), grad.double().numpy()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("runner", _low_precision_runners())
@pytest.mark.parametrize("dtype", list(LOW_PRECISION))
def test_low_precision_matches_the_oracle_on_rounded_inputs(rng, runner, dtype):
    loss_rtol, grad_atol = LOW_PRECISION[dtype]
    for case in ("plain", "masked", "large", "ignored"):
        if case == "masked" and str(runner).startswith("linear"):
            continue  # -inf logits cannot come out of a finite matmul
        z, y, _ = _problem(rng, case)
        if torch is not None:
            rounded = torch.from_numpy(z).to(getattr(torch, dtype)).double().numpy()
        else:
            rounded = z.astype(dtype).astype(np.float64)
        for options, reduction in itertools.product([dict(), dict(label_smoothing=0.2), dict(softcap=30.0)],
                                                    ["mean", "none"]):
            if _skip_undefined(case, options, False):
                continue
            upstream = rng.normal(size=z.shape[0]) if reduction == "none" else np.array(1.0)
            want_loss, want_grad = _expected(rounded, y, None, options, reduction, upstream)
            loss, grad = _run_low(runner, z, y, dtype, options, reduction, upstream)
            where = f"case={case} options={options} reduction={reduction}"
            np.testing.assert_allclose(loss, want_loss, rtol=loss_rtol, atol=loss_rtol, err_msg=where)
            np.testing.assert_allclose(grad, want_grad, rtol=10 * loss_rtol, atol=grad_atol, err_msg=where)
