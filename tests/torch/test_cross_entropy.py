"""softgrad.torch.cross_entropy on CPU (the PyTorch-ops kernels): parity with
torch.nn.functional.cross_entropy over the full option grid in float64, gradient checks,
z-loss / softcap / lse against a plain float64 autograd reference, autograd plumbing
(accumulation, in-place gradient, retain_graph, compile, autocast), extremes and validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from softgrad.torch import CrossEntropyLoss, CrossEntropyOutput, cross_entropy  # noqa: E402
import softgrad.torch  # noqa: E402
from softgrad.torch import _torch_cross_entropy as torch_kernels  # noqa: E402

F64 = dict(rtol=1e-10, atol=1e-12)
REDUCTIONS = ("mean", "sum", "none")
# logits shapes: (N, C), PyTorch's (N, C, d1, d2) with classes on dim 1, and unbatched (C,)
LAYOUTS = [(6, 5), (3, 4, 2, 3), (7,)]
GRID = list(itertools.product(
    LAYOUTS,
    ["index", "probs"],
    [False, True],      # class weights
    [-100, 2],          # ignore_index (2 is a real class: its rows are ignored)
    REDUCTIONS,
    [0.0, 0.25],        # label_smoothing
))


# ----------------------------------------------------------------------------- helpers
def _class_dim(shape):
    return 0 if len(shape) == 1 else 1


def _make_target(rng, kind, shape, ignore_index=-100, n_ignored=1):
    """Class indices (a few set to ignore_index) or rows of class probabilities, as float64/int64 tensors."""
    dim = _class_dim(shape)
    classes = shape[dim]
    batch = tuple(s for i, s in enumerate(shape) if i != dim)
    if kind == "probs":
        p = rng.dirichlet(np.ones(classes), size=int(np.prod(batch, dtype=int)))  # (rows, C)
        p = p.reshape(batch + (classes,))
        return torch.from_numpy(np.moveaxis(p, -1, dim).copy())
    y = rng.integers(0, classes, size=batch)
    flat = y.reshape(-1)
    if flat.size > 1:  # an unbatched row stays a real target (all-ignored batches have their own test)
        flat[rng.permutation(flat.size)[:n_ignored]] = ignore_index
    return torch.from_numpy(y)


def _reference(z, y, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
               softcap=None):
    """Plain float64 autograd: softcap, then F.cross_entropy, then the z-loss with our denominators."""
    s = softcap * torch.tanh(z / softcap) if softcap is not None else z
    loss = F.cross_entropy(s, y, weight=weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(s, dim=_class_dim(z.shape))
        valid = torch.ones_like(lse, dtype=torch.bool) if y.is_floating_point() else y != ignore_index
        z_rows = torch.where(valid, z_loss * lse**2, torch.zeros_like(lse))
        if reduction == "none":
            loss = loss + z_rows
        elif reduction == "sum":
            loss = loss + z_rows.sum()
        else:
            loss = loss + z_rows.sum() / valid.sum()
    return loss


def _upstream(rng, loss):
    """A random upstream gradient for reduction='none', the factor 3 (``loss * 3``) for scalars."""
    if loss.dim() == 0:
        return torch.tensor(3.0, dtype=loss.dtype)
    return torch.from_numpy(rng.normal(size=tuple(loss.shape))).to(loss.dtype)


def _loss_and_grad(fn, z, rng_seed, **kwargs):
    z = z.detach().clone().requires_grad_()
    loss = fn(z, **kwargs)
    up = _upstream(np.random.default_rng(rng_seed), loss)
    (grad,) = torch.autograd.grad(loss, z, up)
    return loss.detach(), grad


def _numerical_gradient(f, z, h=1e-6):
    """Central differences of the scalar ``f`` at every entry of the float64 tensor ``z``."""
    g = torch.zeros_like(z)
    flat, gflat = z.view(-1), g.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + h
        fp = f(z).item()
        flat[i] = old - h
        fm = f(z).item()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return g


# ----------------------------------------------------------------------------- parity with PyTorch
@pytest.mark.parametrize("shape, kind, weighted, ignore_index, reduction, smoothing", GRID)
def test_parity_with_torch_float64(rng, shape, kind, weighted, ignore_index, reduction, smoothing):
    z = torch.from_numpy(rng.normal(size=shape) * 3)
    y = _make_target(rng, kind, shape, ignore_index)
    w = torch.from_numpy(rng.uniform(0.1, 2.0, size=shape[_class_dim(shape)])) if weighted else None
    opts = dict(weight=w, ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing)
    if kind == "probs" and ignore_index != -100:  # PyTorch rejects this combination; so do we
        with pytest.raises(ValueError, match="ignore_index"):
            cross_entropy(z, y, **opts)
        return
    seed = int(rng.integers(2**31))
    loss, grad = _loss_and_grad(lambda x, **k: cross_entropy(x, y, **k), z, seed, **opts)
    ref, ref_grad = _loss_and_grad(lambda x, **k: F.cross_entropy(x, y, **k), z, seed, **opts)
    assert loss.shape == ref.shape and loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, equal_nan=True, **F64)  # NaN: a mean over only ignored rows
    torch.testing.assert_close(grad, ref_grad, **F64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.3}, {"z_loss": 1e-2}, {"softcap": 2.5},
                                     {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0}])
def test_inplace_backward_equals_out_of_place(rng, reduction, options):
    # logits from an op whose backward does not need its output: the buffer can take the gradient
    h = torch.from_numpy(rng.normal(size=(9, 4))).requires_grad_()
    wt = torch.from_numpy(rng.normal(size=(11, 4)))
    y = _make_target(rng, "index", (9, 11), n_ignored=2)
    up = None
    grads = []
    for inplace in (False, True):
        h.grad = None
        loss = cross_entropy(h @ wt.T, y, reduction=reduction, inplace_backward=inplace, **options)
        up = _upstream(rng, loss) if up is None else up
        loss.backward(up)
        grads.append((loss.detach(), h.grad.clone()))
    ref = _reference(h @ wt.T, y, reduction=reduction, **options)
    torch.testing.assert_close(grads[1][0], ref.detach(), **F64)
    torch.testing.assert_close(grads[0][0], grads[1][0], **F64)
    torch.testing.assert_close(grads[0][1], grads[1][1], **F64)


def test_inplace_backward_overwrites_logits_with_the_gradient(rng):
    z0 = torch.from_numpy(rng.normal(size=(5, 6))).requires_grad_()
    y = _make_target(rng, "index", (5, 6))
    logits = z0 * 1.0  # a non-leaf the caller gives away
    loss = cross_entropy(logits, y, label_smoothing=0.2, inplace_backward=True)
    # after the forward the buffer holds d loss / d logits for grad_output = 1
    (expected,) = torch.autograd.grad(F.cross_entropy(z0, y, label_smoothing=0.2), z0)
    torch.testing.assert_close(logits.detach(), expected, **F64)
    loss.backward(torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(z0.grad, 0.5 * expected, **F64)
    # the gradient handed to autograd is a plain buffer, not a tensor of the graph
    leaf = z0.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(cross_entropy(leaf.view(5, 6), y, label_smoothing=0.2, inplace_backward=True), leaf)
    assert not g.requires_grad and g.grad_fn is None
    torch.testing.assert_close(g, expected, **F64)


def test_logits_unchanged_without_inplace(rng):
    for kind in ("index", "probs"):
        z = torch.from_numpy(rng.normal(size=(4, 3, 5))).requires_grad_()
        before = z.detach().clone()
        y = _make_target(rng, kind, z.shape)
        cross_entropy(z, y, label_smoothing=0.1, z_loss=1e-3, softcap=2.0).backward()
        torch.testing.assert_close(z.detach(), before, rtol=0, atol=0)
    with torch.no_grad():  # inplace_backward without a gradient writes nothing
        z = torch.from_numpy(rng.normal(size=(4, 5)))
        before = z.clone()
        cross_entropy(z, _make_target(rng, "index", (4, 5)), inplace_backward=True)
        torch.testing.assert_close(z, before, rtol=0, atol=0)


# ----------------------------------------------------------------------------- z-loss, softcap, lse
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_z_loss_and_softcap_against_float64_autograd(rng, kind, reduction):
    shape = (8, 7)
    z = torch.from_numpy(rng.normal(size=shape) * 4)
    y = _make_target(rng, kind, shape, n_ignored=2)
    w = torch.from_numpy(rng.uniform(0.5, 1.5, size=7))
    opts = dict(weight=w, reduction=reduction, label_smoothing=0.15, z_loss=3e-2, softcap=3.0)
    seed = int(rng.integers(2**31))
    loss, grad = _loss_and_grad(lambda x, **k: cross_entropy(x, y, **k), z, seed, **opts)
    ref, ref_grad = _loss_and_grad(lambda x, **k: _reference(x, y, **k), z, seed, **opts)
    torch.testing.assert_close(loss, ref, **F64)
    torch.testing.assert_close(grad, ref_grad, **F64)


@pytest.mark.parametrize("options", [{}, {"z_loss": 1e-2, "label_smoothing": 0.2}, {"softcap": 2.0},
                                     {"z_loss": 0.1, "softcap": 1.5}])
def test_gradcheck_float64(rng, options):
    z = torch.from_numpy(rng.normal(size=(4, 5, 2)) * 2).requires_grad_()
    y = _make_target(rng, "index", z.shape)
    w = torch.from_numpy(rng.uniform(0.5, 1.5, size=5))
    # gradcheck back-propagates through one call several times: no switch needed
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda x: cross_entropy(x, y, weight=w, reduction=reduction, **options), (z,))


def test_gradient_matches_central_differences_for_probability_targets(rng):
    z = torch.from_numpy(rng.normal(size=(3, 4)))
    y = _make_target(rng, "probs", (3, 4))
    opts = dict(label_smoothing=0.1, z_loss=0.05, softcap=2.0, weight=torch.tensor([0.5, 1.0, 2.0, 1.5],
                                                                                  dtype=torch.float64))
    zz = z.clone().requires_grad_()
    cross_entropy(zz, y, **opts).backward()
    num = _numerical_gradient(lambda x: cross_entropy(x, y, **opts), z.clone())
    torch.testing.assert_close(zz.grad, num, rtol=1e-6, atol=1e-9)


def test_gradient_for_probability_targets_matches_torch(rng):
    z = torch.from_numpy(rng.normal(size=(5, 6))).requires_grad_()
    t = _make_target(rng, "probs", (5, 6)).requires_grad_()
    w = torch.from_numpy(rng.uniform(0.5, 1.5, size=6))
    for reduction in REDUCTIONS:
        ours = cross_entropy(z, t, weight=w, reduction=reduction, label_smoothing=0.2)
        ref = F.cross_entropy(z, t, weight=w, reduction=reduction, label_smoothing=0.2)
        up = _upstream(rng, ref)
        got = torch.autograd.grad(ours, (z, t), up)
        want = torch.autograd.grad(ref, (z, t), up)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, **F64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_return_lse_and_z_loss_part(rng, reduction):
    z = torch.from_numpy(rng.normal(size=(2, 6, 3)) * 5).requires_grad_()  # (N, C, d1)
    y = _make_target(rng, "index", z.shape, n_ignored=2)
    out = cross_entropy(z, y, reduction=reduction, z_loss=1e-2, softcap=4.0, return_lse=True)
    assert isinstance(out, CrossEntropyOutput)
    s = 4.0 * torch.tanh(z / 4.0)
    lse = torch.logsumexp(s, dim=1)
    assert out.lse.shape == y.shape and not out.lse.requires_grad and not out.z_loss.requires_grad
    torch.testing.assert_close(out.lse, lse.detach(), **F64)
    valid = y != -100
    z_rows = torch.where(valid, 1e-2 * lse**2, torch.zeros_like(lse)).detach()
    expected_z = {"none": z_rows, "sum": z_rows.sum(), "mean": z_rows.sum() / valid.sum()}[reduction]
    torch.testing.assert_close(out.z_loss, expected_z, **F64)
    plain = cross_entropy(z, y, reduction=reduction, softcap=4.0)
    torch.testing.assert_close(out.loss, plain + expected_z, **F64)
    none = cross_entropy(z, y, reduction=reduction, return_lse=True)  # z_loss=0: zeros
    assert torch.count_nonzero(none.z_loss) == 0


# ----------------------------------------------------------------------------- autograd plumbing
@pytest.mark.parametrize("inplace", [False, True])
def test_gradient_accumulation_into_existing_grad(rng, inplace):
    h = torch.from_numpy(rng.normal(size=(6, 3))).requires_grad_()
    wt = torch.from_numpy(rng.normal(size=(8, 3))).requires_grad_()
    batches = [_make_target(rng, "index", (6, 8)) for _ in range(3)]
    for use_ours in (True, False):
        h.grad, wt.grad = torch.ones_like(h), None  # .grad already set before the first micro-batch
        for y in batches:
            logits = h @ wt.T
            loss = (cross_entropy(logits, y, z_loss=1e-3, inplace_backward=inplace) if use_ours
                    else _reference(logits, y, z_loss=1e-3))
            (loss / len(batches)).backward()
        if use_ours:
            ours = (h.grad.clone(), wt.grad.clone())
    torch.testing.assert_close(ours[0], h.grad, **F64)
    torch.testing.assert_close(ours[1], wt.grad, **F64)


def test_leaf_logits_accumulate_across_calls(rng):
    z = torch.from_numpy(rng.normal(size=(5, 4))).requires_grad_()
    y = _make_target(rng, "index", (5, 4))
    for _ in range(2):
        cross_entropy(z, y, reduction="sum").backward()
    (g,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), z)
    torch.testing.assert_close(z.grad, 2 * g, **F64)


def test_second_backward_through_one_call_recomputes(rng):
    # the first backward hands on the forward's gradient (scaled in place); later ones recompute it
    z = torch.from_numpy(rng.normal(size=(3, 4))).requires_grad_()
    y = _make_target(rng, "index", (3, 4))
    loss = cross_entropy(z, y, label_smoothing=0.1)
    (g1,) = torch.autograd.grad(loss, z, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, z, grad_outputs=torch.tensor(3.0, dtype=torch.float64), retain_graph=True)
    (g3,) = torch.autograd.grad(loss, z)
    (ref,) = torch.autograd.grad(F.cross_entropy(z, y, label_smoothing=0.1), z)
    torch.testing.assert_close(g1, ref, **F64)
    torch.testing.assert_close(g2, 3 * ref, **F64)
    torch.testing.assert_close(g3, ref, **F64)


def test_inplace_backward_refuses_a_second_backward(rng):
    z = torch.from_numpy(rng.normal(size=(3, 4))).requires_grad_()
    y = _make_target(rng, "index", (3, 4))
    loss = cross_entropy(z * 1.0, y, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        loss.backward()


def test_inplace_backward_refuses_what_it_cannot_overwrite(rng):
    z = torch.from_numpy(rng.normal(size=(4, 5))).requires_grad_()
    y = _make_target(rng, "index", (4, 5))
    with pytest.raises(ValueError, match="leaf"):
        cross_entropy(z, y, inplace_backward=True)
    with pytest.raises(ValueError, match="contiguous"):
        cross_entropy((z * 1.0).T.contiguous().T, y, inplace_backward=True)
    with pytest.raises(ValueError, match="contiguous"):
        cross_entropy((z * 1.0)[:, None, :].movedim(2, 1), y[:, None], inplace_backward=True)
    # an op that saved its output for its own backward: autograd's version check catches the overwrite
    logits = torch.exp(z)
    loss = cross_entropy(logits, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        loss.backward()


def test_module_equals_functional(rng):
    z = torch.from_numpy(rng.normal(size=(6, 5))).requires_grad_()
    y = _make_target(rng, "index", (6, 5), ignore_index=1)
    w = torch.from_numpy(rng.uniform(0.5, 2.0, size=5))
    opts = dict(weight=w, ignore_index=1, reduction="sum", label_smoothing=0.1, z_loss=1e-3, softcap=3.0)
    mod = CrossEntropyLoss(**opts)
    torch.testing.assert_close(mod(z, y), cross_entropy(z, y, **opts), rtol=0, atol=0)
    assert mod.weight is w and "weight" in dict(mod.named_buffers())
    assert "label_smoothing=0.1" in repr(mod)
    out = CrossEntropyLoss(return_lse=True)(z, y)
    assert isinstance(out, CrossEntropyOutput)
    with pytest.raises(ValueError, match="reduction"):
        CrossEntropyLoss(reduction="avg")


@pytest.mark.parametrize(("backend", "inplace", "reduction"), [("aot_eager", False, "none"),
                                                               ("aot_eager", True, "mean"),
                                                               ("inductor", False, "sum")])
def test_torch_compile_fullgraph(rng, backend, inplace, reduction):
    h = torch.from_numpy(rng.normal(size=(6, 4))).requires_grad_()
    wt = torch.from_numpy(rng.normal(size=(9, 4))).requires_grad_()
    y = _make_target(rng, "index", (6, 9))

    def step(h, wt, y):
        return cross_entropy(h @ wt.T, y, reduction=reduction, z_loss=1e-3, label_smoothing=0.1,
                             inplace_backward=inplace)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss = compiled(h, wt, y)
    ref = _reference(h @ wt.T, y, reduction=reduction, z_loss=1e-3, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref, **F64)
    up = _upstream(rng, ref)
    for a, e in zip(torch.autograd.grad(loss, (h, wt), up), torch.autograd.grad(ref, (h, wt), up)):
        torch.testing.assert_close(a, e, **F64)


def test_custom_ops_pass_opcheck(rng):
    z = torch.from_numpy(rng.normal(size=(5, 6))).requires_grad_()
    y = _make_target(rng, "index", (5, 6))
    p = _make_target(rng, "probs", (5, 6))
    w = torch.from_numpy(rng.uniform(0.5, 1.5, size=6))
    ops = torch.ops.softgrad
    r = torch.from_numpy(rng.uniform(0.5, 2.0, size=5))
    torch.library.opcheck(ops.cross_entropy.default, (z, y, w, None, -100, "mean", 0.1, 1e-3, 2.0, True, False,
                                                      "torch"))
    torch.library.opcheck(ops.cross_entropy.default, (z, p, None, r, -100, "none", 0.0, 0.0, None, True, True,
                                                      "torch"))
    torch.library.opcheck(ops.cross_entropy_inplace_.default,
                          (z.detach().clone(), y, None, r, -100, "sum", 0.0, 1e-3, None, True, "torch"))
    torch.library.opcheck(ops.cross_entropy_rows_.default,
                          (z.detach().clone(), y, w, torch.tensor([0.5, 0.25], dtype=torch.float64), r, -100, 0.1,
                           1e-3, 2.0, True, True, "torch"))


def test_autocast_returns_float32_loss_like_torch(rng):
    z = torch.from_numpy(rng.normal(size=(6, 10))).float()
    y = _make_target(rng, "index", (6, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = z.bfloat16().requires_grad_()
        ours = cross_entropy(zb, y)
        ref = F.cross_entropy(zb, y)
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    ours.backward()
    assert zb.grad.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- dtypes and extremes
@pytest.mark.parametrize(("dtype", "rtol", "atol"), [(torch.float32, 1e-5, 1e-6),
                                                     (torch.bfloat16, 2e-2, 1e-2),
                                                     (torch.float16, 2e-3, 1e-3)])
def test_low_precision_within_float32_upcast_reference(rng, dtype, rtol, atol):
    z64 = torch.from_numpy(rng.normal(size=(16, 33)) * 4)
    y = _make_target(rng, "index", (16, 33), n_ignored=3)
    z = z64.to(dtype).requires_grad_()
    loss = cross_entropy(z, y, label_smoothing=0.1)
    loss.backward()
    # the reference PyTorch users rely on: the same low-precision logits upcast to float32
    zr = z.detach().float().requires_grad_()
    ref = F.cross_entropy(zr, y, label_smoothing=0.1)
    ref.backward()
    assert loss.dtype == dtype and z.grad.dtype == dtype
    torch.testing.assert_close(loss.float(), ref, rtol=rtol, atol=atol)
    # the gradient carries one rounding to the logits' dtype, as the upcast reference's does when cast back
    torch.testing.assert_close(z.grad.float(), zr.grad.to(dtype).float(), rtol=rtol, atol=atol * 1e-2)


def test_huge_logits_float32_match_float64(rng):
    # logits of +-1e4, and a common offset of 1e4 that must cancel exactly
    z64 = torch.from_numpy(rng.choice([-1e4, 0.0, 1e4], size=(8, 6)) + rng.normal(size=(8, 6)))
    z64[0] = 1e4 + torch.from_numpy(rng.normal(size=6))
    y = _make_target(rng, "index", (8, 6))
    for opts in ({}, {"label_smoothing": 0.1}, {"z_loss": 1e-6}):
        for kind_y in (y, _make_target(rng, "probs", (8, 6)).float()):
            z = z64.float().requires_grad_()
            loss = cross_entropy(z, kind_y, reduction="none", **opts)
            loss.sum().backward()
            # float64 on the same (float32-rounded) inputs: the difference is our arithmetic alone
            zr = z.detach().double().requires_grad_()
            ref = _reference(zr, kind_y.double() if kind_y.is_floating_point() else kind_y, reduction="none", **opts)
            ref.sum().backward()
            # float32 keeps ~1e-7 of each loss (about 1e4 here): no cancellation of the 1e4 offsets
            torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-7, atol=1e-6)
            torch.testing.assert_close(z.grad.double(), zr.grad, rtol=1e-5, atol=1e-6)


def test_neg_inf_logits(rng):
    z = torch.from_numpy(rng.normal(size=(4, 5))).requires_grad_()
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = mask[2, 4] = True
    y = torch.tensor([0, 4, 1, 1])  # every target logit finite
    zm = z.masked_fill(mask, float("-inf"))
    loss = cross_entropy(zm, y, reduction="none")
    ref = F.cross_entropy(zm, y, reduction="none")
    torch.testing.assert_close(loss, ref, **F64)
    (g,) = torch.autograd.grad(loss.sum(), z, retain_graph=True)
    (gr,) = torch.autograd.grad(ref.sum(), z)
    torch.testing.assert_close(g, gr, **F64)
    assert torch.all(g[mask] == 0)
    # a -inf target logit: infinite loss, as in PyTorch
    assert torch.isinf(cross_entropy(zm.detach(), torch.tensor([1, 0, 0, 0]), reduction="none")[0])
    # with smoothing and a zero-weight class at -inf the term counts 0 (PyTorch: NaN)
    w = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    out = cross_entropy(zm.detach()[:2], torch.tensor([0, 4]), weight=w, label_smoothing=0.1, reduction="none")
    assert torch.isfinite(out[0])


def test_all_targets_ignored(rng):
    z = torch.from_numpy(rng.normal(size=(4, 5))).requires_grad_()
    y = torch.full((4,), -100)
    loss = cross_entropy(z, y, z_loss=1e-2)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(z, y))
    loss.backward()
    assert torch.count_nonzero(z.grad) == 0
    assert cross_entropy(z, y, reduction="sum").item() == 0.0
    assert torch.count_nonzero(cross_entropy(z, y, reduction="none")) == 0


def test_no_grad_inference_matches(rng):
    z = torch.from_numpy(rng.normal(size=(5, 7))).requires_grad_()
    y = _make_target(rng, "index", (5, 7))
    with torch.no_grad():
        for reduction in REDUCTIONS:
            torch.testing.assert_close(cross_entropy(z, y, reduction=reduction),
                                       F.cross_entropy(z, y, reduction=reduction), **F64)


def test_integer_target_dtypes(rng):
    z = torch.from_numpy(rng.normal(size=(5, 7)))
    y = _make_target(rng, "index", (5, 7), n_ignored=0)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(cross_entropy(z, y.to(dtype)), F.cross_entropy(z, y), **F64)


def test_large_batch_crosses_row_chunks(rng, monkeypatch):
    # the PyTorch-ops kernel works in chunks of rows; force several uneven ones
    monkeypatch.setattr(torch_kernels, "_CHUNK_BYTES", 8 * 4 * 13 * 3)
    z = torch.from_numpy(rng.normal(size=(10, 13)))
    y = _make_target(rng, "index", (10, 13), n_ignored=2)
    for kind_y in (y, _make_target(rng, "probs", (10, 13))):
        seed = int(rng.integers(2**31))
        opts = dict(reduction="none", label_smoothing=0.2, z_loss=1e-2, softcap=3.0)
        loss, grad = _loss_and_grad(lambda x, **k: cross_entropy(x, kind_y, **k), z, seed, **opts)
        ref, ref_grad = _loss_and_grad(lambda x, **k: _reference(x, kind_y, **k), z, seed, **opts)
        torch.testing.assert_close(loss, ref, **F64)
        torch.testing.assert_close(grad, ref_grad, **F64)


def test_row_scale_multiplies_each_rows_gradient(rng):
    z = torch.from_numpy(rng.normal(size=(6, 9)))
    y = _make_target(rng, "index", (6, 9), n_ignored=2)
    r = torch.from_numpy(rng.normal(size=6))
    scales = torch.tensor([0.25, 0.5], dtype=torch.float64)
    opts = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-2, softcap=3.0, prob_target=False)
    g1, g2 = torch.empty_like(z), torch.empty_like(z)
    ce1, lse1 = torch_kernels.forward(z, y, None, scales, grad_out=g1, **opts)
    ce2, lse2 = torch_kernels.forward(z, y, None, scales, grad_out=g2, row_scale=r, **opts)
    torch.testing.assert_close(ce2, ce1, rtol=0, atol=0)
    torch.testing.assert_close(g2, g1 * r[:, None], **F64)


# ----------------------------------------------------------------------------- building blocks for vocab-parallel
def _combine_shards(stats):
    """The all-reduce of RowStats over shards (as softgrad.distributed would do it)."""
    m = torch.stack([s.max for s in stats]).amax(dim=0)
    lse = m + torch.log(sum(torch.exp(s.max + s.log_sum - m) for s in stats))
    mass = sum(s.mass for s in stats)
    dot = sum(s.dot + s.mass * (s.max - m) for s in stats)
    return m, lse, sum(s.target_logit for s in stats), dot, mass


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_sharded_stats_and_grad_pass_reproduce_the_fused_forward(rng, kind):
    n, c, eps, zl, cap = 6, 11, 0.2, 1e-2, 3.0
    z = torch.from_numpy(rng.normal(size=(n, c)) * 3)
    z[1, 4] = float("-inf")
    y = _make_target(rng, kind, (n, c), n_ignored=0)
    w = torch.from_numpy(rng.uniform(0.5, 1.5, size=c))
    kappa, zeta = 1.0 / n, 1.0 / n
    grad = torch.empty_like(z)
    ce, lse = torch_kernels.forward(z, y, w, torch.tensor([kappa, zeta], dtype=torch.float64), ignore_index=-100,
                                    label_smoothing=eps, z_loss=zl, softcap=cap, prob_target=kind == "probs",
                                    grad_out=grad)
    cuts = [0, 4, 9, c]  # three uneven shards of the classes
    shards = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    stats = [torch_kernels.row_stats(z[:, sh].contiguous(), y[:, sh] if kind == "probs" else y, w[sh],
                                     class_offset=sh.start, num_classes=c, label_smoothing=eps, softcap=cap,
                                     prob_target=kind == "probs", need_dot=True) for sh in shards]
    m, lse_all, s_y, dot, mass = _combine_shards(stats)
    torch.testing.assert_close(lse_all, lse, **F64)
    log_d = lse_all - m
    if kind == "probs":
        ce_all = mass * log_d - dot
        alpha, beta, gamma = kappa * mass, torch.zeros(n, dtype=torch.float64), torch.full((n,), kappa, dtype=torch.float64)
    else:
        w_y = w[y]
        ce_all = (1 - eps) * w_y * (m - s_y + log_d) + eps / c * (mass * log_d - dot)
        alpha = kappa * ((1 - eps) * w_y + eps / c * mass)
        beta, gamma = kappa * (1 - eps) * w_y, torch.full((n,), kappa * eps / c, dtype=torch.float64)
    torch.testing.assert_close(ce_all, ce, **F64)
    coeffs = torch.stack([alpha + 2 * zl * zeta * lse_all, beta, gamma], dim=1)
    for sh in shards:
        out = torch.empty(n, sh.stop - sh.start, dtype=torch.float64)
        torch_kernels.grad_pass(z[:, sh].contiguous(), y[:, sh] if kind == "probs" else y, w[sh], lse_all, coeffs,
                                out, class_offset=sh.start, num_classes=c, label_smoothing=eps, softcap=cap,
                                prob_target=kind == "probs")
        torch.testing.assert_close(out, grad[:, sh], **F64)


# ----------------------------------------------------------------------------- validation
def test_validation_errors_name_the_argument(rng):
    z = torch.from_numpy(rng.normal(size=(4, 5)))
    y = _make_target(rng, "index", (4, 5), n_ignored=0)
    cases = [
        (TypeError, "logits", lambda: cross_entropy(z.numpy(), y)),
        (TypeError, "logits", lambda: cross_entropy(y, y)),
        (TypeError, "target", lambda: cross_entropy(z, [1, 2, 3, 4])),
        (TypeError, "target", lambda: cross_entropy(z, y > 2)),
        (ValueError, "logits", lambda: cross_entropy(z[:0], y[:0])),
        (ValueError, "logits", lambda: cross_entropy(z[0, 0], y[0])),
        (ValueError, "target", lambda: cross_entropy(z, y[:3])),
        (ValueError, "target", lambda: cross_entropy(z, z[:, :4])),
        (ValueError, "target contains class index 5", lambda: cross_entropy(z, torch.tensor([0, 5, 1, 2]))),
        (ValueError, "target contains class index -1", lambda: cross_entropy(z, torch.tensor([0, -1, 1, 2]))),
        (ValueError, "target", lambda: cross_entropy(z, -z.softmax(1))),
        (TypeError, "weight", lambda: cross_entropy(z, y, weight=[1.0] * 5)),
        (TypeError, "weight", lambda: cross_entropy(z, y, weight=torch.ones(5, dtype=torch.int64))),
        (ValueError, "weight", lambda: cross_entropy(z, y, weight=torch.ones(4, dtype=torch.float64))),
        (ValueError, "weight", lambda: cross_entropy(z, y, weight=torch.tensor([1.0, float("nan"), 1, 1, 1]))),
        (ValueError, "weight", lambda: cross_entropy(z, y, weight=torch.ones(5, requires_grad=True))),
        (TypeError, "ignore_index", lambda: cross_entropy(z, y, ignore_index=1.5)),
        (ValueError, "reduction", lambda: cross_entropy(z, y, reduction="avg")),
        (TypeError, "label_smoothing", lambda: cross_entropy(z, y, label_smoothing="0.1")),
        (ValueError, "label_smoothing", lambda: cross_entropy(z, y, label_smoothing=1.5)),
        (ValueError, "z_loss", lambda: cross_entropy(z, y, z_loss=-1.0)),
        (ValueError, "z_loss", lambda: cross_entropy(z, y, z_loss=float("inf"))),
        (ValueError, "softcap", lambda: cross_entropy(z, y, softcap=0.0)),
        (TypeError, "softcap", lambda: cross_entropy(z, y, softcap=True)),
        (TypeError, "return_lse", lambda: cross_entropy(z, y, return_lse=1)),
        (ValueError, "logits contain NaN", lambda: cross_entropy(z.masked_fill(z > 1, float("nan")), y)),
        (ValueError, "logits contain NaN or \\+inf", lambda: cross_entropy(z.masked_fill(z > 1, float("inf")), y)),
        (ValueError, "entirely -inf", lambda: cross_entropy(z.masked_fill(torch.arange(4)[:, None] == 2,
                                                                          float("-inf")), y)),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()


def test_unchecked_bad_rows_give_nan_not_garbage(rng):
    # what a compiled graph (which skips the data checks) returns for out-of-range targets and NaN logits
    z = torch.from_numpy(rng.normal(size=(4, 5))).requires_grad_()
    y = torch.tensor([0, 7, 2, -3])
    with softgrad.torch.use_value_checks(False):
        loss = cross_entropy(z, y, reduction="none")
        nan_row = cross_entropy(z.detach().masked_fill(torch.arange(4)[:, None] == 0, float("nan")),
                                torch.tensor([0, 1, 2, 3]), reduction="none")
    assert torch.isnan(loss[[1, 3]]).all() and torch.isfinite(loss[[0, 2]]).all()
    (g,) = torch.autograd.grad(loss[[0, 2]].sum(), z)
    assert torch.isnan(g[[1, 3]]).all() and torch.isfinite(g[[0, 2]]).all()
    assert torch.isnan(nan_row[0]) and torch.isfinite(nan_row[1:]).all()


def test_import_and_cpu_path_work_without_triton():
    # a subprocess in which `import triton` fails: softgrad.torch must still import and run on CPU
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton blocked for this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, torch.nn.functional as F\n"
        "from softgrad.torch import cross_entropy, linear_cross_entropy\n"
        "z = torch.randn(4, 7, dtype=torch.float64, requires_grad=True); y = torch.tensor([1, 2, -100, 6])\n"
        "loss = cross_entropy(z, y, z_loss=1e-3); loss.backward()\n"
        "assert 'triton' not in sys.modules\n"
        "print('ok', float(loss))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


# ----------------------------------------------------------------------------- the GPU benchmark's smoke mode
def test_gpu_benchmark_runs_end_to_end_on_cpu_with_tiny_shapes():
    # --tiny exercises every code path of benchmarks/bench_gpu_cross_entropy.py (correctness gate,
    # timing, ratios, table, JSON, PNG) on CPU; its results go to a temporary directory
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu_cross_entropy.py"
    out = subprocess.run([sys.executable, str(script), "--tiny", "--repeats", "1", "--dtype", "bf16"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    written = Path(out.stdout.strip().splitlines()[-1].removeprefix("wrote "))
    payload = json.loads(written.read_text())
    timed = {row["impl"] for row in payload["rows"] if "median_ms" in row}
    assert {"eager", "eager_upcast", "compile", "softgrad", "softgrad_inplace", "floor"} <= timed
    assert any(row["impl"] == "liger" and "skipped" in row for row in payload["rows"])
    assert all(row["floor_fraction"] > 0 for row in payload["rows"] if "median_ms" in row)
    assert payload["provenance"]["torch"] == torch.__version__
    assert written.with_suffix(".png").exists()
