"""softgrad.distributed in this process, on a gloo group of one rank: validation, API surface, accounting.

A world of one rank holds all the columns (or all the rows), so every function must equal its
unsharded counterpart exactly here too; the multi-process behaviour is in
``test_distributed_multiprocess.py``. No process is spawned in this file.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import softgrad.distributed as sd  # noqa: E402
from softgrad.distributed._comm import CollectiveError, record_collectives  # noqa: E402
from softgrad.torch import cross_entropy, linear_cross_entropy  # noqa: E402

F64 = dict(rtol=1e-10, atol=1e-12)


def test_public_api():
    assert sorted(sd.__all__) == ["CollectiveError", "fit_data_parallel", "vocab_parallel_cross_entropy",
                                  "vocab_parallel_linear_cross_entropy", "vocab_parallel_linear_logprobs"]
    assert issubclass(CollectiveError, RuntimeError)


def test_without_a_process_group_the_error_says_what_to_do():
    if dist.is_initialized():
        pytest.skip("a default process group is initialised in this process")
    z, y = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="init_process_group"):
        sd.vocab_parallel_cross_entropy(z, y)
    with pytest.raises(RuntimeError, match="init_process_group"):
        sd.vocab_parallel_linear_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), y)
    from softgrad import SoftmaxClassifier

    with pytest.raises(RuntimeError, match="init_process_group"):
        sd.fit_data_parallel(SoftmaxClassifier(), np.zeros((2, 1)), np.array([0, 1]))


def test_world_of_one_equals_the_unsharded_functions(world_of_one, rng):
    z = torch.from_numpy(rng.normal(size=(7, 9)) * 4)
    y = torch.from_numpy(rng.integers(0, 9, size=7))
    y[3] = -100
    w = torch.from_numpy(rng.uniform(0.5, 2, size=9))
    for opts in ({}, {"weight": w, "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0, "reduction": "sum"}):
        a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
        out = sd.vocab_parallel_cross_entropy(a, y, return_lse=True, **opts)
        ref = cross_entropy(b, y, return_lse=True, **opts)
        (out.loss * 3).backward()
        (ref.loss * 3).backward()
        torch.testing.assert_close(out.loss, ref.loss, **F64)
        torch.testing.assert_close(out.lse, ref.lse, **F64)
        torch.testing.assert_close(out.z_loss, ref.z_loss, **F64)
        torch.testing.assert_close(a.grad, b.grad, **F64)
    h = torch.from_numpy(rng.normal(size=(7, 5))).requires_grad_()
    W = torch.from_numpy(rng.normal(size=(9, 5))).requires_grad_()
    loss = sd.vocab_parallel_linear_cross_entropy(h, W, y, reduction="none", chunk_size=2)
    ref = linear_cross_entropy(h, W, y, reduction="none")
    up = torch.from_numpy(rng.normal(size=7))
    g = torch.autograd.grad(loss, (h, W), up)
    g_ref = torch.autograd.grad(ref, (h, W), up)
    torch.testing.assert_close(loss, ref, **F64)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, **F64)


def test_gradcheck_of_the_sharded_functions(world_of_one, rng):
    # central differences in float64 against the closed-form backward (no stored gradient is reused)
    z = torch.from_numpy(rng.normal(size=(4, 6))).requires_grad_()
    y = torch.tensor([1, -100, 5, 0])
    t = torch.from_numpy(rng.dirichlet(np.ones(6), size=4)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sd.vocab_parallel_cross_entropy(
        x, y, label_smoothing=0.3, z_loss=0.1, softcap=2.0, reduction="none"), (z,))
    assert torch.autograd.gradcheck(lambda x, p: sd.vocab_parallel_cross_entropy(x, p, label_smoothing=0.1), (z, t))
    h = torch.from_numpy(rng.normal(size=(3, 2))).requires_grad_()
    W = torch.from_numpy(rng.normal(size=(5, 2))).requires_grad_()
    b = torch.from_numpy(rng.normal(size=5)).requires_grad_()
    assert torch.autograd.gradcheck(lambda h, W, b: sd.vocab_parallel_linear_cross_entropy(
        h, W, torch.tensor([0, 4, 2]), b, z_loss=0.1, softcap=3.0, chunk_size=2), (h, W, b))


def test_validation_errors_name_the_argument(world_of_one, rng):
    z = torch.from_numpy(rng.normal(size=(4, 5)))
    y = torch.tensor([0, 1, 2, 3])
    vp = sd.vocab_parallel_cross_entropy
    cases = [
        (TypeError, "logits_shard", lambda: vp(z.numpy(), y)),
        (TypeError, "logits_shard", lambda: vp(y, y)),
        (TypeError, "target", lambda: vp(z, [0, 1, 2, 3])),
        (TypeError, "target", lambda: vp(z, y > 1)),
        (TypeError, "target is uint64", lambda: vp(z, y.to(torch.uint64))),
        (ValueError, "logits_shard", lambda: vp(z[None], y)),
        (ValueError, "logits_shard has no rows", lambda: vp(z[:0], y[:0])),
        (ValueError, "target must have shape", lambda: vp(z, y[:3])),
        (ValueError, "target holds class probabilities", lambda: vp(z, z[:, :3])),
        (ValueError, "ignore_index is not supported", lambda: vp(z, z.softmax(1), ignore_index=0)),
        (TypeError, "weight", lambda: vp(z, y, weight=[1.0] * 5)),
        (TypeError, "weight", lambda: vp(z, y, weight=torch.ones(5, dtype=torch.int64))),
        (ValueError, "weight must be 1-D", lambda: vp(z, y, weight=torch.ones(1, 5))),
        (ValueError, "weight on rank 0 has 4 entries", lambda: vp(z, y, weight=torch.ones(4, dtype=torch.float64))),
        (ValueError, "weight requires grad", lambda: vp(z, y, weight=torch.ones(5, requires_grad=True))),
        (TypeError, "ignore_index", lambda: vp(z, y, ignore_index=1.5)),
        (ValueError, "reduction", lambda: vp(z, y, reduction="avg")),
        (TypeError, "label_smoothing", lambda: vp(z, y, label_smoothing="0.1")),
        (ValueError, "label_smoothing", lambda: vp(z, y, label_smoothing=-0.1)),
        (ValueError, "z_loss", lambda: vp(z, y, z_loss=float("nan"))),
        (ValueError, "softcap", lambda: vp(z, y, softcap=-1.0)),
        (TypeError, "return_lse", lambda: vp(z, y, return_lse=1)),
        (ValueError, "class index 5 outside \\[0, 5\\)", lambda: vp(z, torch.tensor([0, 5, 1, 2]))),
        (ValueError, "class index -3", lambda: vp(z, torch.tensor([0, -3, 1, 2]))),
        (ValueError, "negative, NaN or infinite", lambda: vp(z, -z.softmax(1))),
        (ValueError, "logits contain NaN", lambda: vp(z.masked_fill(z > 1, float("nan")), y)),
        (ValueError, "-inf on every rank", lambda: vp(z.masked_fill(torch.arange(4)[:, None] == 1, -float("inf")), y)),
        (ValueError, "leaf", lambda: vp(z.clone().requires_grad_(), y, inplace_backward=True)),
        (ValueError, "C-contiguous", lambda: vp((z.clone().requires_grad_() * 1)[:, ::2], y, inplace_backward=True)),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
    h, W = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64)
    lin = sd.vocab_parallel_linear_cross_entropy
    linear_cases = [
        (TypeError, "hidden", lambda: lin(h.numpy(), W, y)),
        (TypeError, "hidden must be float", lambda: lin(y[:, None], W, y)),
        (ValueError, "hidden must have shape", lambda: lin(h[0], W, y)),
        (ValueError, "weight_shard must have shape", lambda: lin(h, W[:, :2], y)),
        (TypeError, "weight_shard dtype", lambda: lin(h, W.float(), y)),
        (ValueError, "bias_shard", lambda: lin(h, W, y, torch.zeros(4, dtype=torch.float64))),
        (TypeError, "bias_shard", lambda: lin(h, W, y, [0.0] * 5)),
        (TypeError, "target must hold integer", lambda: lin(h, W, y.double())),
        (TypeError, "target is uint64", lambda: lin(h, W, y.to(torch.uint64))),
        (ValueError, "target shape", lambda: lin(h, W, y[:2])),
        (ValueError, "chunk_size", lambda: lin(h, W, y, chunk_size=0)),
        (ValueError, "reduction", lambda: lin(h, W, y, reduction="avg")),
        (ValueError, "class index 7", lambda: lin(h, W, torch.tensor([0, 7, 1, 1]))),
    ]
    for exc, match, call in linear_cases:
        with pytest.raises(exc, match=match):
            call()


def test_inputs_are_not_modified(world_of_one, rng):
    z = torch.from_numpy(rng.normal(size=(5, 6))).requires_grad_()
    y = torch.tensor([0, 1, 2, 3, -100])
    w = torch.from_numpy(rng.uniform(0.5, 2, size=6))
    before = (z.detach().clone(), y.clone(), w.clone())
    sd.vocab_parallel_cross_entropy(z, y, weight=w, label_smoothing=0.1).backward()
    for got, want in zip((z.detach(), y, w), before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_record_collectives_counts_every_byte(world_of_one):
    z = torch.zeros(10, 7, requires_grad=True)  # float32: row statistics in float32
    y = torch.zeros(10, dtype=torch.int64)
    with record_collectives() as log:
        sd.vocab_parallel_cross_entropy(z, y).backward()
    assert [(r.op, r.dtype, r.numel, r.nbytes) for r in log] == [
        ("all_reduce:max", "int64", 18, 144), ("all_reduce:max", "float32", 10, 40), ("all_reduce:sum", "float32", 20, 80)]
    with record_collectives() as outer, record_collectives() as inner:
        sd.vocab_parallel_cross_entropy(z, y)
    assert len(outer) == len(inner) == 3


def test_fit_data_parallel_in_a_world_of_one(world_of_one):
    from sklearn.datasets import load_iris
    from threadpoolctl import threadpool_limits

    import softgrad
    from softgrad import SoftmaxClassifier

    softgrad.get_backend()  # loaded, so that threadpool_limits reaches the kernels
    with threadpool_limits(1):  # tiny products: idle threads only cost time on a shared machine
        _check_fit_data_parallel(load_iris(return_X_y=True), SoftmaxClassifier)


def _check_fit_data_parallel(data, SoftmaxClassifier):
    X, y = data
    for params in ({"alpha": 1e-2}, {"alpha": 1e-2, "solver": "gd", "max_iter": 30},
                   {"alpha": 1e-2, "class_weight": {0: 2.0, 1: 1.0, 2: 0.5}}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = SoftmaxClassifier(**params).fit(X, y)
            got = sd.fit_data_parallel(SoftmaxClassifier(**params), X, y)
        np.testing.assert_allclose(got.coef_, ref.coef_, rtol=0, atol=1e-10)
        np.testing.assert_allclose(got.loss_curve_, ref.loss_curve_, rtol=1e-12)
        assert got.n_iter_ == ref.n_iter_
    # a normal fitted estimator: predicts, pickles, warm-starts
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(got)).predict(X), got.predict(X))
    warm = sd.fit_data_parallel(SoftmaxClassifier(alpha=1e-2, warm_start=True), X, y)
    n_cold = warm.n_iter_
    sd.fit_data_parallel(warm, X, y)
    assert warm.n_iter_ < n_cold
    with pytest.raises(TypeError, match="SoftmaxClassifier"):
        sd.fit_data_parallel(object(), X, y)
    with pytest.raises(ValueError, match="sgd"):
        sd.fit_data_parallel(SoftmaxClassifier(solver="sgd"), X, y)
    with pytest.raises(ValueError, match="sample_weight"):
        sd.fit_data_parallel(SoftmaxClassifier(), X, y, sample_weight=-np.ones(len(y)))
    with pytest.raises(ValueError, match="at least 2 classes"):
        sd.fit_data_parallel(SoftmaxClassifier(), X[:10], y[:10])
    with pytest.raises(ValueError, match="every rank's shard is empty"):
        sd.fit_data_parallel(SoftmaxClassifier(), X[:0], y[:0])
    # a line search that finds no decrease is reported as such, as by SoftmaxClassifier.fit
    huge = np.random.default_rng(12).standard_normal((40, 3)) * 1e155
    with pytest.warns(Warning, match="stopped abnormally after 0 iterations") as record:
        sd.fit_data_parallel(SoftmaxClassifier(max_iter=20), huge, (huge[:, 0] > 0).astype(int))
    assert not any("did not converge within" in str(w.message) for w in record)


def test_collective_failure_becomes_collective_error(world_of_one, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("[gloo] Connection closed by peer\nmore detail")

    monkeypatch.setattr(dist, "all_reduce", broken)
    with pytest.raises(CollectiveError, match="all_reduce\\(max\\) of logits_shard layout and checks failed on "
                                              "rank 0 of 1.*Backend said: \\[gloo\\] Connection closed by peer$") as info:
        sd.vocab_parallel_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]))
    assert isinstance(info.value.__cause__, RuntimeError)
