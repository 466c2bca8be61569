"""The language-model head features of ``cross_entropy`` and ``linear_cross_entropy``.

Same-pass statistics (lse, token accuracy, predicted tokens, entropy), token weights and
normalisers, class weights, next-token shifting, skipped ignored rows and the float32
accumulation of a bf16 weight gradient -- each against plain float64 PyTorch.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import softgrad.torch as st  # noqa: E402
from softgrad.torch import _linear_cross_entropy as lce  # noqa: E402

F64 = dict(rtol=1e-9, atol=1e-11)
KERNELS = ["torch"]
try:
    from softgrad.torch import _triton_cross_entropy as _tri

    if _tri.INTERPRETED or torch.cuda.is_available():
        KERNELS.append("triton:two_pass:16")
        KERNELS.append("triton:one_pass")
except ImportError:  # pragma: no cover - triton is optional
    pass


def _reference_rows(z, y, *, softcap=None, label_smoothing=0.0, z_loss=0.0, weight=None):
    """Per-row loss (0 for ignored rows), lse, entropy and argmax in float64 from PyTorch ops."""
    s = softcap * torch.tanh(z / softcap) if softcap is not None else z
    ce = F.cross_entropy(s, y, reduction="none", label_smoothing=label_smoothing, weight=weight)
    lse = torch.logsumexp(s, dim=1)
    valid = y != -100
    rows = ce + torch.where(valid, z_loss * lse ** 2, torch.zeros_like(lse))
    log_p = torch.log_softmax(s, dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    return rows, lse, entropy, s.argmax(dim=1), valid


def _problem(rng, n=9, c=37):
    z = torch.from_numpy(rng.normal(size=(n, c)) * 2).requires_grad_()
    y = torch.from_numpy(rng.integers(0, c, size=n))
    y[[1, 5]] = -100
    y[2] = int(z[2].argmax())  # at least one correct prediction
    return z, y


# ----------------------------------------------------------------------------- same-pass statistics
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_cross_entropy_same_pass_statistics(rng, kernel, softcap):
    z, y = _problem(rng)
    with st.use_kernel(kernel):
        out = st.cross_entropy(z, y, softcap=softcap, reduction="none", return_token_accuracy=True,
                               return_predicted_tokens=True, return_entropy=True)
    rows, lse, entropy, argmax, valid = _reference_rows(z.detach(), y, softcap=softcap)
    torch.testing.assert_close(out.loss, rows, **F64)
    torch.testing.assert_close(out.lse, lse, **F64)
    torch.testing.assert_close(out.entropy, entropy, **F64)
    assert out.predicted_tokens.dtype == torch.int64
    torch.testing.assert_close(out.predicted_tokens, argmax)
    want = ((argmax == y) & valid).sum() / valid.sum()
    torch.testing.assert_close(out.token_accuracy, want.float())
    assert 0 < float(out.token_accuracy) < 1
    assert out.loss.requires_grad and not out.entropy.requires_grad
    # the loss stays differentiable and its gradient is the plain one
    up = torch.from_numpy(rng.normal(size=9))
    (g,) = torch.autograd.grad(out.loss, z, up)
    (ref,) = torch.autograd.grad(rows, z, up) if rows.requires_grad else (None,)
    s = softcap * torch.tanh(z / softcap) if softcap is not None else z
    (ref,) = torch.autograd.grad(F.cross_entropy(s, y, reduction="none"), z, up)
    torch.testing.assert_close(g, ref, **F64)


def test_statistics_under_torch_func_and_for_probability_targets(rng):
    z, y = _problem(rng)
    out = torch.func.grad_and_value(lambda x: st.cross_entropy(x, y, return_entropy=True,
                                                               return_token_accuracy=True).loss)(z.detach())
    assert torch.isfinite(out[1])
    p = torch.softmax(torch.from_numpy(rng.normal(size=(9, 37))), dim=1)
    res = st.cross_entropy(z, p, return_entropy=True, return_predicted_tokens=True)
    _, _, entropy, argmax, _ = _reference_rows(z.detach(), y)
    torch.testing.assert_close(res.entropy, entropy, **F64)
    torch.testing.assert_close(res.predicted_tokens, argmax)
    with pytest.raises(ValueError, match="return_token_accuracy needs class-index targets"):
        st.cross_entropy(z, p, return_token_accuracy=True)
    with pytest.raises(TypeError, match="return_entropy must be a bool"):
        st.cross_entropy(z, y, return_entropy=1)


def test_token_accuracy_with_every_row_ignored_is_nan(rng):
    z, _ = _problem(rng)
    out = st.cross_entropy(z, torch.full((9,), -100), return_token_accuracy=True)
    assert torch.isnan(out.token_accuracy)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("kernel", KERNELS[:2])
def test_linear_same_pass_statistics_and_ignored_rows(rng, kernel):
    h = torch.from_numpy(rng.normal(size=(2, 6, 5))).requires_grad_()
    w = torch.from_numpy(rng.normal(size=(37, 5))).requires_grad_()
    y = torch.from_numpy(rng.integers(0, 37, size=(2, 6)))
    y[0, :3] = -100  # a prompt: not computed at all
    with st.use_kernel(kernel):
        out = lce.linear_cross_entropy(h, w, y, reduction="none", return_lse=True, return_token_accuracy=True,
                                       return_predicted_tokens=True, return_entropy=True, chunk_size=4)
    z = (h @ w.T).reshape(-1, 37).detach()
    rows, lse, entropy, argmax, valid = _reference_rows(z, y.reshape(-1))
    torch.testing.assert_close(out.loss.reshape(-1), rows, **F64)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    torch.testing.assert_close(out.lse.reshape(-1), torch.where(valid, lse, nan), equal_nan=True, **F64)
    torch.testing.assert_close(out.entropy.reshape(-1), torch.where(valid, entropy, nan), equal_nan=True, **F64)
    torch.testing.assert_close(out.predicted_tokens.reshape(-1), torch.where(valid, argmax, -1))
    torch.testing.assert_close(out.token_accuracy, (((argmax == y.reshape(-1)) & valid).sum() / valid.sum()).float())
    up = torch.from_numpy(rng.normal(size=(2, 6)))
    grads = torch.autograd.grad(out.loss, (h, w), up)
    ref = F.cross_entropy((h @ w.T).reshape(-1, 37), y.reshape(-1), reduction="none")
    for a, e in zip(grads, torch.autograd.grad(ref, (h, w), up.reshape(-1))):
        torch.testing.assert_close(a, e, **F64)


def test_ignored_rows_skip_the_matmul(rng, monkeypatch):
    rows_seen = []
    original = lce._chunk_logits

    def spy(hidden, weight, bias, rows):
        z = original(hidden, weight, bias, rows)
        rows_seen.append(z.shape[0])
        return z

    monkeypatch.setattr(lce, "_chunk_logits", spy)
    h = torch.from_numpy(rng.normal(size=(40, 4))).requires_grad_()
    w = torch.from_numpy(rng.normal(size=(11, 4))).requires_grad_()
    y = torch.from_numpy(rng.integers(0, 11, size=40))
    y[:30] = -100
    loss = lce.linear_cross_entropy(h, w, y)
    loss.backward()
    assert sum(rows_seen) == 10  # the forward computed the 10 rows that count, and nothing else
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.cross_entropy(ref_h @ ref_w.T, y).backward()
    torch.testing.assert_close(h.grad, ref_h.grad, **F64)
    torch.testing.assert_close(w.grad, ref_w.grad, **F64)
    assert torch.count_nonzero(h.grad[:30]) == 0
    # every row ignored: NaN mean, zero gradients, no matmul
    rows_seen.clear()
    h.grad = None
    loss = lce.linear_cross_entropy(h, w, torch.full((40,), -100))
    loss.backward()
    assert torch.isnan(loss) and sum(rows_seen) == 0 and torch.count_nonzero(h.grad) == 0


# ----------------------------------------------------------------------------- token weights and normalisers
@pytest.mark.parametrize("kernel", KERNELS[:2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_weight_scales_rows_and_keeps_denominators(rng, kernel, reduction):
    z, y = _problem(rng)
    rho = torch.from_numpy(rng.uniform(0.0, 2.0, size=9))
    cw = torch.from_numpy(rng.uniform(0.5, 1.5, size=37))
    opts = dict(label_smoothing=0.1, z_loss=1e-2)
    with st.use_kernel(kernel):
        ours = st.cross_entropy(z, y, weight=cw, token_weight=rho, reduction=reduction, **opts)
    rows, *_ = _reference_rows(z, y, weight=cw, **opts)
    rows_ce, *_ = _reference_rows(z, y, weight=cw, label_smoothing=0.1)
    z_rows = rows - rows_ce
    valid = y != -100
    if reduction == "none":
        ref = rho * rows
    elif reduction == "sum":
        ref = (rho * rows).sum()
    else:  # PyTorch's denominators: summed class weights of the targets, count for the z-loss
        denom = cw[y.clamp(min=0)][valid].sum()
        ref = (rho * rows_ce).sum() / denom + (rho * z_rows).sum() / valid.sum()
    torch.testing.assert_close(ours, ref, **F64)
    up = torch.from_numpy(rng.normal(size=tuple(ref.shape)))
    torch.testing.assert_close(torch.autograd.grad(ours, z, up)[0], torch.autograd.grad(ref, z, up)[0], **F64)


@pytest.mark.parametrize("kernel", KERNELS[:2])
def test_normalizer_is_hugging_faces_num_items_in_batch(rng, kernel):
    z, y = _problem(rng)
    num_items = torch.tensor(17)  # e.g. the non-ignored tokens of every micro-batch of a step
    with st.use_kernel(kernel):
        ours = st.cross_entropy(z, y, normalizer=num_items, z_loss=1e-3)
        again = st.cross_entropy(z, y, normalizer=17.0, z_loss=1e-3)
    rows, *_ = _reference_rows(z, y, z_loss=1e-3)
    ref = rows.sum() / 17
    torch.testing.assert_close(ours, ref, **F64)
    torch.testing.assert_close(again, ref, **F64)
    torch.testing.assert_close(torch.autograd.grad(ours, z)[0], torch.autograd.grad(ref, z)[0], **F64)
    # gradient accumulation over two micro-batches equals the one big batch's mean
    h = torch.from_numpy(rng.normal(size=(12, 4))).requires_grad_()
    w = torch.from_numpy(rng.normal(size=(10, 4))).requires_grad_()
    t = torch.from_numpy(rng.integers(0, 10, size=12))
    t[[0, 7, 8]] = -100
    n_items = (t != -100).sum()
    for part in (slice(0, 5), slice(5, 12)):
        lce.linear_cross_entropy(h[part], w, t[part], normalizer=n_items, chunk_size=3).backward()
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.cross_entropy(ref_h @ ref_w.T, t).backward()
    torch.testing.assert_close(h.grad, ref_h.grad, **F64)
    torch.testing.assert_close(w.grad, ref_w.grad, **F64)


def test_sequence_normalizer_gives_the_mean_of_sequence_means(rng):
    z = torch.from_numpy(rng.normal(size=(7, 5))).requires_grad_()
    y = torch.from_numpy(rng.integers(0, 5, size=7))
    y[2] = -100
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])  # three packed sequences
    y[5:] = -100  # the third has nothing that counts: it is not part of the mean
    n = st.sequence_normalizer(ids, y)
    ours = st.cross_entropy(z, y, normalizer=n)
    rows = F.cross_entropy(z, y, reduction="none")
    ref = (rows[[0, 1]].sum() / 2 + rows[[3, 4]].sum() / 2) / 2
    torch.testing.assert_close(ours, ref, **F64)
    torch.testing.assert_close(torch.autograd.grad(ours, z)[0], torch.autograd.grad(ref, z)[0], **F64)
    with pytest.raises(ValueError, match="sequence_ids must have the target's shape"):
        st.sequence_normalizer(ids[:3], y)


def test_token_weight_and_normalizer_errors(rng):
    z, y = _problem(rng)
    cases = [
        (ValueError, "needs reduction='mean'", dict(normalizer=3.0, reduction="sum")),
        (ValueError, "finite number > 0", dict(normalizer=0.0)),
        (ValueError, "one per row of the batch shape", dict(normalizer=torch.ones(4))),
        (ValueError, "token_weight must have the batch shape", dict(token_weight=torch.ones(4))),
        (TypeError, "token_weight must be a floating-point tensor", dict(token_weight=torch.ones(9, dtype=torch.long))),
        (ValueError, "token_weight requires grad", dict(token_weight=torch.ones(9, requires_grad=True))),
    ]
    for exc, match, kw in cases:
        with pytest.raises(exc, match=match):
            st.cross_entropy(z, y, **kw)
        h = torch.from_numpy(rng.normal(size=(9, 3)))
        with pytest.raises(exc, match=match):
            lce.linear_cross_entropy(h, torch.from_numpy(rng.normal(size=(37, 3))), y, **kw)


# ----------------------------------------------------------------------------- linear_cross_entropy options
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_class_weight_shift_and_lse(rng, reduction):
    h = torch.from_numpy(rng.normal(size=(3, 5, 4))).requires_grad_()
    w = torch.from_numpy(rng.normal(size=(13, 4))).requires_grad_()
    b = torch.from_numpy(rng.normal(size=13)).requires_grad_()
    y = torch.from_numpy(rng.integers(0, 13, size=(3, 5)))
    y[1, 2] = -100
    cw = torch.from_numpy(rng.uniform(0.2, 2.0, size=13))
    out = lce.linear_cross_entropy(h, w, y, b, class_weight=cw, shift=True, reduction=reduction, return_lse=True,
                                   label_smoothing=0.1, chunk_size=4)
    z = h[:, :-1] @ w.T + b
    ref = F.cross_entropy(z.reshape(-1, 13), y[:, 1:].reshape(-1), weight=cw, reduction=reduction,
                          label_smoothing=0.1)
    if reduction == "none":  # the last position of each sequence has no next token: loss 0
        ref = torch.cat([ref.reshape(3, 4), torch.zeros(3, 1, dtype=ref.dtype)], dim=1)
    torch.testing.assert_close(out.loss, ref, **F64)
    assert out.lse.shape == (3, 5) and torch.isnan(out.lse[:, -1]).all()
    valid = y[:, 1:] != -100
    torch.testing.assert_close(out.lse[:, :-1][valid], torch.logsumexp(z, dim=-1)[valid], **F64)
    up = torch.from_numpy(rng.normal(size=tuple(ref.shape)))
    for a, e in zip(torch.autograd.grad(out.loss, (h, w, b), up), torch.autograd.grad(ref, (h, w, b), up)):
        torch.testing.assert_close(a, e, **F64)


def test_class_weight_errors(rng):
    h = torch.from_numpy(rng.normal(size=(4, 3)))
    w = torch.from_numpy(rng.normal(size=(6, 3)))
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="weight"):
        lce.linear_cross_entropy(h, w, y, class_weight=torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight contains NaN"):
        lce.linear_cross_entropy(h, w, y, class_weight=torch.tensor([1.0, float("nan"), 1, 1, 1, 1],
                                                                   dtype=torch.float64))
    with pytest.raises(TypeError, match="accum_dtype"):
        lce.linear_cross_entropy(h, w, y, accum_dtype=torch.int32)


def test_float32_accumulation_of_a_bf16_weight_gradient():
    # frequent tokens: each target row's gradient collects same-signed contributions from every
    # chunk, so a bf16 running sum is rounded (relative 2^-9) once per chunk; a float32 one once
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_lce_accum_precision.py"
    spec = importlib.util.spec_from_file_location("bench_lce_accum_precision", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    weight_grad_error = bench.weight_grad_error

    err32 = weight_grad_error(None, n=1024, v=8192, chunk=8)
    err16 = weight_grad_error(torch.bfloat16, n=1024, v=8192, chunk=8)
    assert err32 < 2 ** -8, err32  # what bf16 logits and a bf16 chunk gradient cost anyway
    assert 3 * err32 < err16, (err32, err16)
