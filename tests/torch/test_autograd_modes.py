"""Every autograd mode PyTorch users reach for, on ``cross_entropy`` and ``linear_cross_entropy``.

The cases follow PyTorch's OpInfo checks for ``nn.functional.cross_entropy`` (gradcheck,
gradgradcheck, forward-mode AD, ``torch.func`` transforms, meta tensors) with our extra
options, each against plain PyTorch autograd in float64 as the reference. What the
vocabulary-parallel functions do not support (double backward) raises, never returns zeros.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.autograd import forward_ad  # noqa: E402

import softgrad.torch as st  # noqa: E402

OPTIONS = [
    dict(),
    dict(label_smoothing=0.2, z_loss=1e-2),
    dict(softcap=2.5, z_loss=0.05),
]
REDUCTIONS = ["mean", "sum", "none"]
F64 = dict(rtol=1e-9, atol=1e-11)


def _reference(z, y, *, weight=None, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None):
    """Plain PyTorch ops in float64: what every mode is compared with."""
    s = softcap * torch.tanh(z / softcap) if softcap is not None else z
    loss = F.cross_entropy(s, y, weight=weight, reduction="none", label_smoothing=label_smoothing)
    valid = (y != -100).to(z.dtype) if not y.is_floating_point() else torch.ones(z.shape[0], dtype=z.dtype)
    zl = z_loss * torch.logsumexp(s, dim=1) ** 2 * valid
    if reduction == "none":
        return loss + zl
    if reduction == "sum":
        return loss.sum() + zl.sum()
    if y.is_floating_point():
        denom = torch.tensor(float(z.shape[0]), dtype=z.dtype)
    else:
        w_y = weight[y.clamp(min=0)] if weight is not None else torch.ones_like(z[:, 0])
        denom = (w_y * valid).sum()
    return loss.sum() / denom + zl.sum() / valid.sum()


def _problem(rng, n=4, c=5, probs=False):
    z = torch.from_numpy(rng.normal(size=(n, c)) * 1.5).requires_grad_()
    if probs:
        y = torch.from_numpy(rng.dirichlet(np.ones(c), size=n))
    else:
        y = torch.from_numpy(rng.integers(0, c, size=n))
        y[1] = -100
    w = torch.from_numpy(rng.uniform(0.5, 1.5, size=c))
    return z, y, w


# ----------------------------------------------------------------------------- cross_entropy
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_and_gradgradcheck(rng, options, reduction):
    z, y, w = _problem(rng)

    def f(x):
        return st.cross_entropy(x, y, weight=w, reduction=reduction, **options)

    assert torch.autograd.gradcheck(f, (z,))
    assert torch.autograd.gradgradcheck(f, (z,))


@pytest.mark.parametrize("options", OPTIONS)
def test_gradgradcheck_probability_targets_both_arguments(rng, options):
    z, t, w = _problem(rng, probs=True)
    t.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: st.cross_entropy(a, b, weight=w, **options), (z, t))
    assert torch.autograd.gradgradcheck(lambda a, b: st.cross_entropy(a, b, weight=w, **options), (z, t))


@pytest.mark.parametrize("options", OPTIONS)
def test_hessian_equals_pytorch(rng, options):
    z, y, w = _problem(rng)
    ours = torch.autograd.functional.hessian(lambda x: st.cross_entropy(x, y, weight=w, **options), z.detach())
    ref = torch.autograd.functional.hessian(lambda x: _reference(x, y, weight=w, **options), z.detach())
    torch.testing.assert_close(ours, ref, **F64)
    assert ours.abs().max() > 0.01  # not the silent zeros of a non-differentiable backward


def test_gradient_penalty_trains_through_the_gradient(rng):
    # the WGAN-GP pattern: differentiate ||d loss / d z||^2 with respect to the parameters
    x = torch.from_numpy(rng.normal(size=(6, 3)))
    W = torch.from_numpy(rng.normal(size=(5, 3))).requires_grad_()
    y = torch.from_numpy(rng.integers(0, 5, size=6))
    grads = []
    for fn in (lambda z: st.cross_entropy(z, y, label_smoothing=0.1, softcap=3.0),
               lambda z: _reference(z, y, label_smoothing=0.1, softcap=3.0)):
        z = x @ W.T
        (gz,) = torch.autograd.grad(fn(z), z, create_graph=True)
        (gw,) = torch.autograd.grad((gz ** 2).sum(), W)
        grads.append(gw)
    torch.testing.assert_close(grads[0], grads[1], **F64)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward_mode_ad_random_tangent(rng, options, reduction):
    z, y, w = _problem(rng)
    tangent = torch.from_numpy(rng.normal(size=tuple(z.shape)))
    with forward_ad.dual_level():
        out = st.cross_entropy(forward_ad.make_dual(z.detach(), tangent), y, weight=w, reduction=reduction, **options)
        ours = forward_ad.unpack_dual(out).tangent
    _, ref = torch.func.jvp(lambda x: _reference(x, y, weight=w, reduction=reduction, **options), (z.detach(),),
                            (tangent,))
    torch.testing.assert_close(ours, ref, **F64)
    assert ours.abs().max() > 0  # not a silent zero tangent


@pytest.mark.parametrize("options", OPTIONS)
def test_torch_func_grad_jvp_vmap(rng, options):
    z, y, w = _problem(rng)
    z = z.detach()

    def ours(x):
        return st.cross_entropy(x, y, weight=w, **options)

    def ref(x):
        return _reference(x, y, weight=w, **options)

    torch.testing.assert_close(torch.func.grad(ours)(z), torch.func.grad(ref)(z), **F64)
    v = torch.from_numpy(rng.normal(size=tuple(z.shape)))
    torch.testing.assert_close(torch.func.jvp(ours, (z,), (v,))[1], torch.func.jvp(ref, (z,), (v,))[1], **F64)
    # per-example losses over a batch of problems
    batch = torch.from_numpy(rng.normal(size=(3,) + tuple(z.shape)))
    torch.testing.assert_close(torch.func.vmap(ours)(batch), torch.func.vmap(ref)(batch), **F64)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(ours))(batch),
                               torch.func.vmap(torch.func.grad(ref))(batch), **F64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_meta_and_fake_tensors_give_shapes_and_dtypes(reduction):
    from torch._subclasses.fake_tensor import FakeTensorMode

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        z = torch.empty(8, 11, device="meta", dtype=dtype, requires_grad=True)
        y = torch.empty(8, device="meta", dtype=torch.int64)
        loss = st.cross_entropy(z, y, reduction=reduction, label_smoothing=0.1)
        ref = F.cross_entropy(z, y, reduction=reduction, label_smoothing=0.1)
        assert (loss.shape, loss.dtype, loss.device) == (ref.shape, ref.dtype, ref.device)
        (g,) = torch.autograd.grad(loss.sum(), z)
        assert (g.shape, g.dtype, g.device.type) == (z.shape, dtype, "meta")
    with FakeTensorMode():
        z = torch.empty(4, 9, requires_grad=True)
        y = torch.zeros(4, dtype=torch.int64)
        out = st.cross_entropy(z, y, reduction=reduction, return_lse=True)
        assert out.loss.shape == ((4,) if reduction == "none" else ())
        assert out.lse.shape == (4,) and out.lse.dtype == torch.float32


def test_use_kernel_is_local_to_each_thread():
    seen, errors = {}, []

    def worker(kernel):
        try:
            with st.use_kernel(kernel):
                for _ in range(200):
                    if st.get_kernel() != kernel:
                        raise AssertionError(f"{kernel}: saw {st.get_kernel()}")
                seen[kernel] = st.get_kernel()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    before = st.get_kernel()
    threads = [threading.Thread(target=worker, args=(k,)) for k in ("torch", "auto", "triton:two_pass:16")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen == {"torch": "torch", "auto": "auto", "triton:two_pass:16": "triton:two_pass:16"}
    assert st.get_kernel() == before
    with pytest.raises(ValueError, match="kernel must be"):
        with st.use_kernel("cuda"):
            pass


# ----------------------------------------------------------------------------- linear_cross_entropy
def _linear_problem(rng, n=6, d=3, v=7):
    h = torch.from_numpy(rng.normal(size=(n, d))).requires_grad_()
    W = torch.from_numpy(rng.normal(size=(v, d))).requires_grad_()
    b = torch.from_numpy(rng.normal(size=v)).requires_grad_()
    y = torch.from_numpy(rng.integers(0, v, size=n))
    y[2] = -100
    return h, W, b, y


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_gradcheck_and_gradgradcheck(rng, options, reduction):
    h, W, b, y = _linear_problem(rng)

    def f(h, W, b):
        return st.linear_cross_entropy(h, W, y, b, reduction=reduction, chunk_size=4, **options)

    assert torch.autograd.gradcheck(f, (h, W, b))
    assert torch.autograd.gradgradcheck(f, (h, W, b))


@pytest.mark.parametrize("options", OPTIONS)
def test_linear_forward_ad_and_torch_func(rng, options):
    h, W, b, y = _linear_problem(rng)
    h, W, b = h.detach(), W.detach(), b.detach()

    def ours(h, W):
        return st.linear_cross_entropy(h, W, y, b, chunk_size=4, **options)

    def ref(h, W):
        return _reference(h @ W.T + b, y, **options)

    th = torch.from_numpy(rng.normal(size=tuple(h.shape)))
    tw = torch.from_numpy(rng.normal(size=tuple(W.shape)))
    with forward_ad.dual_level():
        out = ours(forward_ad.make_dual(h, th), forward_ad.make_dual(W, tw))
        tangent = forward_ad.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, torch.func.jvp(ref, (h, W), (th, tw))[1], **F64)
    for a, e in zip(torch.func.grad(ours, argnums=(0, 1))(h, W), torch.func.grad(ref, argnums=(0, 1))(h, W)):
        torch.testing.assert_close(a, e, **F64)


def test_linear_hessian_equals_pytorch(rng):
    h, W, b, y = _linear_problem(rng)
    opts = dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0)
    ours = torch.autograd.functional.hessian(lambda x: st.linear_cross_entropy(x, W.detach(), y, b.detach(),
                                                                               chunk_size=4, **opts), h.detach())
    ref = torch.autograd.functional.hessian(lambda x: _reference(x @ W.detach().T + b.detach(), y, **opts),
                                            h.detach())
    torch.testing.assert_close(ours, ref, **F64)


def test_linear_meta_tensors():
    h = torch.empty(10, 4, device="meta", requires_grad=True)
    W = torch.empty(9, 4, device="meta", requires_grad=True)
    y = torch.empty(10, device="meta", dtype=torch.int64)
    for reduction, shape in (("mean", ()), ("none", (10,))):
        loss = st.linear_cross_entropy(h, W, y, reduction=reduction)
        assert loss.shape == shape and loss.device.type == "meta"
        gh, gw = torch.autograd.grad(loss.sum(), (h, W))
        assert gh.shape == h.shape and gw.shape == W.shape


# ----------------------------------------------------------------------------- vocabulary-parallel
def test_vocab_parallel_double_backward_raises_not_zeros(rng):
    import torch.distributed as dist

    from softgrad.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        z, y, _ = _problem(rng)
        (g,) = torch.autograd.grad(vocab_parallel_cross_entropy(z, y), z)
        torch.testing.assert_close(g, torch.autograd.grad(F.cross_entropy(z, y), z)[0], **F64)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(vocab_parallel_cross_entropy(z, y), z, create_graph=True)
        h, W, _, y = _linear_problem(rng)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(vocab_parallel_linear_cross_entropy(h, W, y), h, create_graph=True)
    finally:
        dist.destroy_process_group()
