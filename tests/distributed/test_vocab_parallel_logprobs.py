"""vocab_parallel_linear_logprobs in this process, on a gloo group of one rank (every row of W here).

It must equal ``softgrad.torch.linear_logprobs`` on the same weight; validation, the unsupported
autograd modes and the communication volume are checked here too. Several ranks are in
``test_distributed_multiprocess.py`` (check ``logprobs_head_grid``).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from softgrad.distributed import vocab_parallel_linear_logprobs as vp  # noqa: E402
from softgrad.distributed._comm import record_collectives  # noqa: E402
from softgrad.torch import linear_logprobs  # noqa: E402

F64 = dict(rtol=1e-10, atol=1e-12)


def _problem(seed, shape=(3, 5), dim=4, vocab=9):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, dim, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    b = torch.randn(vocab, generator=g, dtype=torch.float64)
    t = torch.randint(0, vocab, shape, generator=g)
    t.view(-1)[1] = -100
    tau = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
    up = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2)]
    return h, w, b, t, tau, up


def test_without_a_process_group_the_error_says_what_to_do():
    if dist.is_initialized():
        pytest.skip("a default process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vp(torch.zeros(2, 4), torch.zeros(3, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize("temperature", ["scalar", "tensor"])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("return_entropy", [True, False])
def test_world_of_one_equals_linear_logprobs(world_of_one, temperature, use_bias, return_entropy):
    h, w, b, t, tau, up = _problem(1)
    tau = 0.8 if temperature == "scalar" else tau
    params = [x.clone().requires_grad_() for x in (h, w, b)]
    ref_params = [x.clone().requires_grad_() for x in (h, w, b)]
    kw = dict(temperature=tau, return_entropy=return_entropy, chunk_size=4)
    out = vp(params[0], params[1], t, params[2] if use_bias else None, **kw)
    ref = linear_logprobs(ref_params[0], ref_params[1], t, ref_params[2] if use_bias else None, **kw)
    outs, refs = (tuple(out), tuple(ref)) if return_entropy else ((out,), (ref,))
    for a, e in zip(outs, refs):
        assert a.shape == t.shape and a.dtype == torch.float64
        torch.testing.assert_close(a, e, **F64)
    n = 3 if use_bias else 2
    got = torch.autograd.grad(outs, params[:n], up[:len(outs)])
    want = torch.autograd.grad(refs, ref_params[:n], up[:len(outs)])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **F64)


def test_entropy_gradient_alone_and_float32(world_of_one):
    h, w, _, t, tau, up = _problem(2, shape=(7,), vocab=12)
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = vp(hs, ws, t, temperature=tau, return_entropy=True, chunk_size=3)
    ref = linear_logprobs(hr, wr, t, temperature=tau, return_entropy=True)
    for a, e in zip(torch.autograd.grad(out.entropy, (hs, ws), up[0]),
                    torch.autograd.grad(ref.entropy, (hr, wr), up[0])):
        torch.testing.assert_close(a, e, **F64)
    h32, w32 = h.float().requires_grad_(), w.float().requires_grad_()
    lp = vp(h32, w32, t, temperature=tau.float())
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, linear_logprobs(h32, w32, t, temperature=tau.float()), rtol=1e-5, atol=1e-6)


def test_gradcheck(world_of_one):
    h, w, b, t, tau, _ = _problem(3, shape=(4,), dim=2, vocab=5)
    fn = lambda h, w, b: tuple(vp(h, w, t, b, temperature=tau, return_entropy=True, chunk_size=3))  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(x.clone().requires_grad_() for x in (h, w, b)))


def test_communication_is_order_n(world_of_one):
    h, w, _, t, tau, up = _problem(4)
    n, d = t.numel(), h.shape[-1]
    hs = h.clone().requires_grad_()
    with record_collectives() as log:
        out = vp(hs, w, t, temperature=tau, return_entropy=True)
        torch.autograd.grad(out, hs, up)
    sent = [(r.op, r.numel) for r in log]
    assert sent == [("all_reduce:max", 2 * 1 + 16), ("all_reduce:max", 3), ("all_reduce:max", n),
                    ("all_reduce:sum", 4 * n), ("all_reduce:sum", n * d)], sent
    with record_collectives() as log:
        vp(h, w, t, temperature=0.5)  # a float temperature, no entropy, no gradient
    assert [(r.op, r.numel) for r in log] == [("all_reduce:max", 18), ("all_reduce:max", n), ("all_reduce:sum", 3 * n)]


def test_validation_and_unsupported_modes(world_of_one):
    h, w, b, t, tau, _ = _problem(5)
    cases = [
        (TypeError, "weight_shard", lambda: vp(h, w.numpy(), t)),
        (TypeError, "bias_shard", lambda: vp(h, w, t, [0.0])),
        (ValueError, "weight_shard must have shape", lambda: vp(h, w[:, :2], t)),
        (TypeError, "weight_shard dtype", lambda: vp(h, w.float(), t)),
        (ValueError, "bias_shard must have shape", lambda: vp(h, w, t, b[:3])),
        (ValueError, "target shape", lambda: vp(h, w, t[:, :2])),
        (TypeError, "target", lambda: vp(h, w, t.double())),
        (ValueError, "temperature must be a finite float > 0", lambda: vp(h, w, t, temperature=0.0)),
        (ValueError, "temperature requires grad", lambda: vp(h, w, t, temperature=tau.requires_grad_())),
        (TypeError, "return_entropy", lambda: vp(h, w, t, return_entropy="yes")),
        (TypeError, "ignore_index", lambda: vp(h, w, t, ignore_index=None)),
        (ValueError, "chunk_size", lambda: vp(h, w, t, chunk_size=-2)),
        (ValueError, "class index 9 outside \\[0, 9\\)", lambda: vp(h, w, torch.full_like(t, 9))),
        (ValueError, "temperature must be finite and > 0", lambda: vp(h, w, t, temperature=tau.detach() - 1.0)),
        (ValueError, "contain NaN or \\+inf", lambda: vp(h.masked_fill(h > 1, float("nan")), w, t)),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(lambda x: vp(x, w, t).sum())(h)
    hs = h.clone().requires_grad_()
    (g,) = torch.autograd.grad(vp(hs, w, t).sum(), hs)  # a plain backward works
    assert torch.isfinite(g).all() and g.abs().max() > 0
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(vp(hs, w, t).sum(), hs, create_graph=True)
