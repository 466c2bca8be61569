"""The RL head ``linear_logprobs``: log-probabilities and entropy against a float64 reference built
from the full logits, gradients for random upstream gradients on both outputs, every autograd mode,
ignored tokens, temperatures, a GRPO-style loss, validation and bounded memory."""

from __future__ import annotations

import sys
import zlib

import numpy as np
import pytest
from _peak_memory import measure

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import softgrad.torch as st  # noqa: E402
from softgrad.torch import LogprobsOutput, linear_logprobs  # noqa: E402

F64 = dict(rtol=1e-10, atol=1e-12)


def _gen(seed):
    rng = np.random.default_rng(seed)
    return torch.Generator().manual_seed(int(rng.integers(2**31)))


def _reference(hidden, weight, target, bias=None, *, temperature=1.0, ignore_index=-100):
    """Float64, from the full logits: F.log_softmax, the target's entry, entropy -sum p log p."""
    z = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    tau = temperature.double().expand(target.shape)[..., None] if isinstance(temperature, torch.Tensor) \
        else temperature
    log_p = F.log_softmax(z / tau, dim=-1)
    valid = target != ignore_index
    logp = log_p.gather(-1, torch.where(valid, target, 0)[..., None]).squeeze(-1)
    ent = -(log_p.exp() * log_p).sum(-1)
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(valid, logp, zero), torch.where(valid, ent, zero)


def _inputs(seed, shape=(3, 7), dim=6, vocab=13, dtype=torch.float64, bias=True, n_ignored=2, scale=1.0):
    g = _gen(seed)
    h = (torch.randn(*shape, dim, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    w = (torch.randn(vocab, dim, generator=g, dtype=torch.float64) * 0.7).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, vocab, shape, generator=g)
    flat = t.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:n_ignored]] = -100
    return h, w, b, t


def _temperature(kind, shape, seed):
    g = _gen(seed)
    if kind == "scalar":
        return 0.6
    if kind == "per_token":
        return torch.rand(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3
    if kind == "per_sequence":
        return torch.rand(shape[:-1] + (1,), generator=g, dtype=torch.float64) + 0.5
    return 1.0


def _grads(outputs, params, upstream):
    params = [p for p in params if p is not None]
    return torch.autograd.grad(outputs, params, upstream, allow_unused=True)


@pytest.mark.parametrize("temperature", ["one", "scalar", "per_token", "per_sequence"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 7), (11,)])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_matches_float64_reference_for_random_upstream_gradients(temperature, bias, shape, chunk_size):
    seed = zlib.crc32(repr((temperature, bias, shape, chunk_size)).encode())
    h, w, b, t = _inputs(seed, shape=shape, bias=bias)
    tau = _temperature(temperature, shape, seed + 1)
    out = linear_logprobs(h, w, t, b, temperature=tau, return_entropy=True, chunk_size=chunk_size)
    ref = _reference(h, w, t, b, temperature=tau)
    assert isinstance(out, LogprobsOutput) and out.logprobs.shape == t.shape and out.entropy.shape == t.shape
    torch.testing.assert_close(out.logprobs, ref[0], **F64)
    torch.testing.assert_close(out.entropy, ref[1], **F64)
    g = _gen(seed + 2)
    up = [torch.randn(t.shape, generator=g, dtype=torch.float64) for _ in range(2)]
    for got, want in zip(_grads(out, (h, w, b), up), _grads(ref, (h, w, b), up)):
        torch.testing.assert_close(got, want, **F64)


def test_each_output_alone_carries_its_own_gradient():
    h, w, b, t = _inputs(1)
    up = torch.randn(t.shape, generator=_gen(2), dtype=torch.float64)
    ref_lp = _reference(h, w, t, b, temperature=0.8)[0]
    ref_h = _reference(h, w, t, b, temperature=0.8)[1]
    # only the log-probabilities (return_entropy=False returns a plain tensor)
    lp = linear_logprobs(h, w, t, b, temperature=0.8, chunk_size=5)
    assert isinstance(lp, torch.Tensor) and not isinstance(lp, tuple)
    for got, want in zip(_grads(lp, (h, w, b), up), _grads(ref_lp, (h, w, b), up)):
        torch.testing.assert_close(got, want, **F64)
    # only the entropy: the log-probabilities computed but unused
    out = linear_logprobs(h, w, t, b, temperature=0.8, return_entropy=True, chunk_size=5)
    for got, want in zip(_grads(out.entropy, (h, w, b), up), _grads(ref_h, (h, w, b), up)):
        torch.testing.assert_close(got, want, **F64)
    # the entropy's gradient is real: not zero, and not the log-probabilities' gradient
    (gh,) = torch.autograd.grad(linear_logprobs(h, w, t, b, return_entropy=True).entropy.sum(), h)
    assert gh.abs().max() > 1e-3


def test_gradcheck_and_gradgradcheck_in_float64():
    h, w, b, t = _inputs(3, shape=(4,), dim=3, vocab=5, n_ignored=1)
    tau = torch.rand(4, generator=_gen(4), dtype=torch.float64) + 0.5

    def fn(h, w, b):
        return tuple(linear_logprobs(h, w, t, b, temperature=tau, return_entropy=True, chunk_size=2))

    assert torch.autograd.gradcheck(fn, (h, w, b))
    assert torch.autograd.gradgradcheck(fn, (h, w, b))
    assert torch.autograd.gradcheck(fn, (h, w, b), check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False)


def test_ignored_tokens_give_zero_outputs_and_zero_gradient():
    h, w, b, t = _inputs(5, shape=(4, 6), n_ignored=0)
    t[t == 7] = 8
    t[2, 3] = 7
    t[1] = 7  # a custom ignore_index: row 1 holds the ignored tokens
    t[1, 0] = 2
    tau = torch.rand(4, 6, generator=_gen(6), dtype=torch.float64) + 0.5
    tau[1, 1:] = 0.0  # never read: a temperature padded with zeros on ignored tokens is fine
    out = linear_logprobs(h, w, t, b, temperature=tau, return_entropy=True, ignore_index=7)
    ignored = t == 7
    assert torch.equal(out.logprobs[ignored], torch.zeros(int(ignored.sum()), dtype=torch.float64))
    assert torch.equal(out.entropy[ignored], torch.zeros(int(ignored.sum()), dtype=torch.float64))
    assert (out.entropy[~ignored] > 0).all() and (out.logprobs[~ignored] < 0).all()
    ref = _reference(h, w, t, b, temperature=torch.where(ignored, 1.0, tau), ignore_index=7)
    torch.testing.assert_close(out.logprobs, ref[0], **F64)
    up = [torch.randn(t.shape, generator=_gen(7), dtype=torch.float64) for _ in range(2)]
    (gh,) = torch.autograd.grad(out, h, up)
    assert torch.equal(gh[ignored], torch.zeros_like(gh[ignored]))


def test_all_tokens_ignored():
    h, w, b, t = _inputs(8, shape=(5,))
    t.fill_(-100)
    out = linear_logprobs(h, w, t, b, return_entropy=True)
    assert torch.equal(out.logprobs, torch.zeros(5, dtype=torch.float64))
    assert torch.equal(out.entropy, torch.zeros(5, dtype=torch.float64))
    grads = torch.autograd.grad(out.logprobs.sum() + out.entropy.sum(), (h, w, b))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("chunk_size", [1, 2, 6, 7, 8, 1000])
def test_chunk_boundaries_do_not_change_the_result(chunk_size):
    h, w, b, t = _inputs(9, shape=(7,), vocab=29)
    tau = torch.rand(7, generator=_gen(10), dtype=torch.float64) + 0.4
    up = [torch.randn(7, generator=_gen(11), dtype=torch.float64) for _ in range(2)]
    base = linear_logprobs(h, w, t, b, temperature=tau, return_entropy=True, chunk_size=7)
    out = linear_logprobs(h, w, t, b, temperature=tau, return_entropy=True, chunk_size=chunk_size)
    for a, e in zip(out, base):
        torch.testing.assert_close(a, e, **F64)
    for a, e in zip(_grads(out, (h, w, b), up), _grads(base, (h, w, b), up)):
        torch.testing.assert_close(a, e, **F64)


@pytest.mark.parametrize(("dtype", "rtol", "atol"), [
    (torch.float32, 2e-5, 2e-5),
    (torch.bfloat16, 4e-2, 4e-2),
    (torch.float16, 5e-3, 5e-3),
])
def test_low_precision_within_paired_tolerance_of_float64(dtype, rtol, atol):
    h, w, b, t = _inputs(12, shape=(4, 9), dim=16, vocab=37, dtype=dtype)
    tau = torch.rand(4, 9, generator=_gen(13), dtype=torch.float64).to(dtype) + 0.5
    out = linear_logprobs(h, w, t, b, temperature=tau, return_entropy=True, chunk_size=5)
    assert out.logprobs.dtype == torch.float32 and out.entropy.dtype == torch.float32  # not rounded to dtype
    # the reference sees exactly the rounded inputs, upcast
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, b))
    ref = _reference(h64, w64, t, b64, temperature=tau.double())
    torch.testing.assert_close(out.logprobs.double(), ref[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(out.entropy.double(), ref[1], rtol=rtol, atol=atol)
    up = [torch.randn(t.shape, generator=_gen(14)) for _ in range(2)]
    grads = torch.autograd.grad(out, (h, w, b), up)
    ref_grads = torch.autograd.grad(ref, (h64, w64, b64), [u.double() for u in up])
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * max(1.0, float(want.abs().max())))


def test_large_logits_lose_nothing_to_cancellation():
    # logits of size ~1e4: a naive exp overflows, and an entropy formed as lse - sum p s
    # subtracts two numbers of size 1e4 to leave one of size 1e-300
    g = _gen(15)
    h = torch.randn(6, 4, generator=g, dtype=torch.float64) * 100
    w = torch.randn(50, 4, generator=g, dtype=torch.float64) * 100
    t = torch.randint(0, 50, (6,), generator=g)
    out = linear_logprobs(h.float(), w.float(), t, return_entropy=True)
    ref = _reference(h.float(), w.float(), t)
    assert torch.isfinite(out.logprobs).all() and (out.entropy >= 0).all()
    torch.testing.assert_close(out.logprobs.double(), ref[0], rtol=1e-5, atol=1e-2)
    # the entropy of near one-hot rows is tiny; it keeps its relative accuracy
    torch.testing.assert_close(out.entropy.double(), ref[1], rtol=1e-4, atol=1e-30)
    # a near one-hot row in float64 keeps logp ~ -1e-20, not 0 or a rounding residue
    w2 = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    lp = linear_logprobs(torch.tensor([[46.0]], dtype=torch.float64), w2, torch.tensor([0]), return_entropy=True)
    np.testing.assert_allclose(lp.logprobs.item(), -np.log1p(np.exp(-46.0)), rtol=1e-12)
    np.testing.assert_allclose(lp.entropy.item(), np.exp(-46.0) * 47.0, rtol=1e-10)


def _grpo_loss(logp, old_logp, advantages, mask, entropy, *, clip=0.2, entropy_coef=0.01):
    """GRPO/PPO clipped objective, token-mean per sequence then mean over sequences, minus an entropy bonus."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = -torch.minimum(ratio * advantages[:, None], clipped * advantages[:, None])
    per_seq = (per_token * mask).sum(1) / mask.sum(1)
    bonus = (entropy * mask).sum() / mask.sum()
    return per_seq.mean() - entropy_coef * bonus


def test_grpo_style_loss_gradient_matches_the_reference():
    # 4 sequences of 12 tokens: a prompt of 3-5 tokens (ignored) and a sampled completion;
    # the old policy is a perturbed copy, so some ratios leave the clip range
    B, T, D, V = 4, 12, 8, 31
    g = _gen(16)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    labels = tokens.clone()
    for i, prompt in enumerate([3, 5, 4, 3]):
        labels[i, :prompt] = -100
    mask = (labels != -100).double()
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    tau = 0.9
    with torch.no_grad():
        old = linear_logprobs(h + 0.3 * torch.randn(h.shape, generator=g, dtype=torch.float64), w, labels,
                              temperature=tau)
    out = linear_logprobs(h, w, labels, temperature=tau, return_entropy=True, chunk_size=5)
    loss = _grpo_loss(out.logprobs, old, advantages, mask, out.entropy)
    ref = _reference(h, w, labels, temperature=tau)
    ref_loss = _grpo_loss(ref[0], old, advantages, mask, ref[1])
    ratio = torch.exp(ref[0] - old)[mask.bool()]
    assert ((ratio < 0.8) | (ratio > 1.2)).any() and ((ratio > 0.8) & (ratio < 1.2)).any()  # both branches
    torch.testing.assert_close(loss, ref_loss, **F64)
    for got, want in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref_loss, (h, w))):
        torch.testing.assert_close(got, want, **F64)


def test_backward_twice_tied_weights_and_accumulation():
    h, w, b, t = _inputs(17)
    out = linear_logprobs(h, w, t, b, return_entropy=True, chunk_size=4)
    loss = out.logprobs.sum() + 0.5 * out.entropy.sum()
    (g1,) = torch.autograd.grad(loss, w, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, w)
    torch.testing.assert_close(g1, g2, **F64)
    # the head's weight also used as an input embedding: the gradients add up
    emb = w.detach().clone().requires_grad_()
    x = emb[torch.tensor([0, 3, 5])]
    lp = linear_logprobs(h, emb, t, return_entropy=True)
    total = lp.logprobs.sum() + lp.entropy.sum() + (x ** 2).sum()
    total.backward()
    ref_emb = w.detach().clone().requires_grad_()
    ref = _reference(h, ref_emb, t)
    (ref[0].sum() + ref[1].sum() + (ref_emb[torch.tensor([0, 3, 5])] ** 2).sum()).backward()
    torch.testing.assert_close(emb.grad, ref_emb.grad, **F64)


def test_inputs_are_left_unchanged_and_no_grad_inference():
    h, w, b, t = _inputs(18)
    tau = torch.rand(t.shape, generator=_gen(19), dtype=torch.float64) + 0.5
    copies = [x.detach().clone() for x in (h, w, b, t, tau)]
    with torch.no_grad():
        out = linear_logprobs(h, w, t, b, temperature=tau, return_entropy=True)
    assert not out.logprobs.requires_grad
    out = linear_logprobs(h, w, t, b, temperature=tau, return_entropy=True)
    torch.autograd.grad(out, (h, w, b), [torch.ones_like(out.logprobs)] * 2)
    for x, c in zip((h, w, b, t, tau), copies):
        assert torch.equal(x.detach(), c)
    # inputs without grad at all
    lp = linear_logprobs(h.detach(), w.detach(), t, b.detach(), temperature=tau)
    torch.testing.assert_close(lp, _reference(h, w, t, b, temperature=tau)[0].detach(), **F64)


def test_torch_func_grad_vmap_and_forward_ad():
    h, w, _, t = _inputs(20, shape=(6,), n_ignored=1)
    up = torch.randn(6, generator=_gen(21), dtype=torch.float64)

    def loss(h, w):
        out = linear_logprobs(h, w, t, temperature=0.7, return_entropy=True, chunk_size=4)
        return (out.logprobs * up).sum() + out.entropy.sum()

    gh, gw = torch.func.grad(loss, argnums=(0, 1))(h.detach(), w.detach())
    ref = _reference(h, w, t, temperature=0.7)
    rh, rw = torch.autograd.grad((ref[0] * up).sum() + ref[1].sum(), (h, w))
    torch.testing.assert_close(gh, rh, **F64)
    torch.testing.assert_close(gw, rw, **F64)
    batch = torch.randn(3, 6, h.shape[1], generator=_gen(22), dtype=torch.float64)
    per = torch.func.vmap(lambda x: linear_logprobs(x, w.detach(), t, chunk_size=4))(batch)
    for i in range(3):
        torch.testing.assert_close(per[i], _reference(batch[i], w.detach(), t)[0], **F64)
    tangent = torch.randn(h.shape, generator=_gen(23), dtype=torch.float64)
    _, jvp = torch.func.jvp(lambda x: linear_logprobs(x, w.detach(), t, return_entropy=True).entropy,
                            (h.detach(),), (tangent,))
    _, ref_jvp = torch.func.jvp(lambda x: _reference(x, w.detach(), t)[1], (h.detach(),), (tangent,))
    torch.testing.assert_close(jvp, ref_jvp, **F64)


@pytest.mark.parametrize("temperature", ["scalar", "per_token"])
def test_torch_compile_fullgraph_aot_eager(temperature):
    h, w, b, t = _inputs(24, shape=(2, 5), dim=8, vocab=20)
    tau = _temperature(temperature, (2, 5), 25)

    def step(h, w, b, t):
        out = linear_logprobs(h, w, t, b, temperature=tau, return_entropy=True, chunk_size=4)
        return out.logprobs, out.entropy

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ours = compiled(h, w, b, t)
    ref = _reference(h, w, t, b, temperature=tau)
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a, e, **F64)
    up = [torch.randn(t.shape, generator=_gen(26), dtype=torch.float64) for _ in range(2)]
    for a, e in zip(_grads(ours, (h, w, b), up), _grads(ref, (h, w, b), up)):
        torch.testing.assert_close(a, e, **F64)


def test_meta_tensors_give_shapes_and_dtypes():
    h = torch.empty(2, 3, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(50, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    t = torch.empty(2, 3, device="meta", dtype=torch.int64)
    tau = torch.empty(2, 1, device="meta")
    out = linear_logprobs(h, w, t, temperature=tau, return_entropy=True)
    assert out.logprobs.shape == (2, 3) and out.entropy.shape == (2, 3)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.device.type == "meta"
    gh, gw = torch.autograd.grad(out.logprobs.sum() + out.entropy.sum(), (h, w))
    assert gh.shape == h.shape and gw.shape == w.shape and gw.dtype == torch.bfloat16


def test_autocast_cpu_bfloat16_runs_the_gemms_in_bfloat16():
    h, w, b, t = _inputs(27, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_logprobs(h, w, t, b, return_entropy=True)
    assert out.logprobs.dtype == torch.float32
    ref = _reference(h.bfloat16(), w.bfloat16(), t, b.bfloat16())
    torch.testing.assert_close(out.logprobs.double(), ref[0], rtol=4e-2, atol=4e-2)
    gw = torch.autograd.grad(out.logprobs.sum(), w)[0]
    assert gw.dtype == torch.float32  # float32 master weights get float32 gradients


def test_validation_names_the_argument():
    h, w, b, t = _inputs(28)
    cases = [
        (TypeError, "hidden", dict(hidden=h.detach().numpy())),
        (TypeError, "hidden", dict(hidden=h.detach().long())),
        (ValueError, "hidden", dict(hidden=h[0, 0])),
        (ValueError, "weight", dict(weight=w[:, :3])),
        (TypeError, "weight", dict(weight=w.float())),
        (ValueError, "bias", dict(bias=b[:4])),
        (TypeError, "bias", dict(bias=[0.0])),
        (ValueError, "target", dict(target=t[:, :2])),
        (TypeError, "target", dict(target=t.double())),
        (ValueError, "temperature must be a finite float > 0", dict(temperature=0.0)),
        (ValueError, "temperature must be a finite float > 0", dict(temperature=-1.0)),
        (ValueError, "temperature must be a finite float > 0", dict(temperature=float("nan"))),
        (TypeError, "temperature", dict(temperature=True)),
        (TypeError, "temperature", dict(temperature="hot")),
        (TypeError, "temperature", dict(temperature=torch.ones(t.shape, dtype=torch.int64))),
        (ValueError, "temperature of shape", dict(temperature=torch.ones(4))),
        (ValueError, "without enlarging", dict(temperature=torch.ones(2, 3, 7))),
        (ValueError, "temperature requires grad", dict(temperature=torch.ones(t.shape, requires_grad=True))),
        (TypeError, "return_entropy", dict(return_entropy=1)),
        (TypeError, "ignore_index", dict(ignore_index=1.5)),
        (ValueError, "chunk_size", dict(chunk_size=0)),
        (ValueError, "chunk_size", dict(chunk_size=True)),
    ]
    for exc, match, override in cases:
        args = dict(hidden=h, weight=w, target=t, bias=b)
        args.update(override)
        kwargs = {k: args.pop(k) for k in list(args) if k not in ("hidden", "weight", "target", "bias")}
        with pytest.raises(exc, match=match):
            linear_logprobs(args["hidden"], args["weight"], args["target"], args["bias"], **kwargs)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="target is on"):
            linear_logprobs(h, w, t.cuda())


def test_value_checks_after_the_forward():
    h, w, b, t = _inputs(29)
    with pytest.raises(ValueError, match="target contains class index 13 outside"):
        linear_logprobs(h, w, torch.full_like(t, 13), b)
    with pytest.raises(ValueError, match="target contains class index -1 outside"):
        linear_logprobs(h, w, torch.full_like(t, -1), b)
    tau = torch.ones(t.shape, dtype=torch.float64)
    tau[t != -100] = 0.0
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0 .* 19 token"):
        linear_logprobs(h, w, t, b, temperature=tau)
    with pytest.raises(ValueError, match="temperature must be finite"):
        linear_logprobs(h, w, t, b, temperature=torch.full((3, 1), float("inf"), dtype=torch.float64))
    bad = h.detach().clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or \+inf in 1 row\(s\) \(first at flattened row 9\)"):
        linear_logprobs(bad, w, t, b)
    with st.use_value_checks(False):  # the checks can be turned off (no host synchronisation)
        out = linear_logprobs(bad, w, t, b)
    assert torch.isnan(out[1, 2]) or t[1, 2] == -100


def test_public_api_exports():
    assert "linear_logprobs" in st.__all__ and "LogprobsOutput" in st.__all__
    assert st.linear_logprobs is linear_logprobs


_MEASURE = """
    import json, sys, torch
    from softgrad.torch import linear_logprobs
    torch.set_num_threads(1)
    variant, n, d, v = sys.argv[1], *map(int, sys.argv[2:5])
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.05).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    def run(h, w, t):
        if variant == "ours":
            out = linear_logprobs(h, w, t, return_entropy=True, chunk_size=64)
            lp, ent = out.logprobs, out.entropy
        else:
            log_p = torch.log_softmax(h @ w.T, dim=-1)
            lp, ent = log_p.gather(1, t[:, None]).squeeze(1), -(log_p.exp() * log_p).sum(1)
        (lp.sum() + 0.01 * ent.sum()).backward()
        return lp.sum()
    run(torch.randn(8, d, requires_grad=True), torch.randn(64, d, requires_grad=True), torch.zeros(8, dtype=torch.long))
    total, peak = peak_extra_kib(lambda: run(h, w, t))
    print(json.dumps({"peak_extra_kib": peak, "total": total.item()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_never_holds_the_logits():
    # N x V float32 = 32 MiB; the unfused path holds log_p, p and their gradients; ours a few buffers
    # of one 64-row chunk (2 MiB each), grad_W (1 MiB) and grad_h
    n, d, v = 1024, 32, 8192
    res = {variant: measure(_MEASURE, variant, n, d, v, timeout=120) for variant in ("ours", "unfused")}
    np.testing.assert_allclose(res["ours"]["total"], res["unfused"]["total"], rtol=1e-5)
    logits_kib = n * v * 4 // 1024
    assert res["unfused"]["peak_extra_kib"] >= logits_kib, res
    assert res["ours"]["peak_extra_kib"] < logits_kib // 3, res
    assert 4 * res["ours"]["peak_extra_kib"] < res["unfused"]["peak_extra_kib"], res


def test_docs_rl_head_example_runs():
    # the README's RL-head example runs and its own assertions hold
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    (block,) = [b for b in blocks if "linear_logprobs(" in b and "GRPO" in b.upper()] or [None]
    assert block is not None, "the README lost its RL-head example"
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["hidden"].grad is not None and namespace["head"].weight.grad is not None


def test_forward_mode_ad_keeps_the_value_checks():
    import torch.autograd.forward_ad as fwad

    h, w, b, t = _inputs(30, shape=(5,), n_ignored=0)
    with fwad.dual_level():
        dual = fwad.make_dual(h.detach(), torch.ones_like(h))
        out = linear_logprobs(dual, w.detach(), t, return_entropy=True)
        assert fwad.unpack_dual(out.entropy).tangent is not None
        with pytest.raises(ValueError, match="target contains class index 13"):
            linear_logprobs(dual, w.detach(), torch.full_like(t, 13))
