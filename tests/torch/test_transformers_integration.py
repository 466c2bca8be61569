"""Hugging Face transformers integration: a patched *ForCausalLM gives the unpatched model's
loss and gradients (float64: against an independent float64 loss of the model's own logits;
float32: against transformers' ForCausalLMLoss), never forms logits, and leaves evaluation,
generation and calls without labels untouched. Tiny random models from configs, no downloads."""

from __future__ import annotations

import copy
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest
from _peak_memory import measure

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import torch.nn.functional as F  # noqa: E402

from softgrad.torch.integrations import transformers as sg_hf  # noqa: E402

VOCAB = 97  # not a power of two
F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=2e-5, atol=2e-6)  # transformers' loss vs ours, both float32 (different summation orders)
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, initializer_range=0.2)  # std 0.2: logits of order 1, so softcap bites
# family -> (config class, model class, extra config); every class of SUPPORTED_MODELS
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 1.5}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 1.5}),
}


def _seed(seed):
    return int(np.random.default_rng(seed).integers(2**31))


def _model(family, *, tied, dtype=torch.float64, seed=0, **extra):
    config_name, model_name, family_extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**_COMMON, **family_extra, tie_word_embeddings=tied, **extra)
    torch.manual_seed(_seed(seed))
    model = getattr(transformers, model_name)(config).to(dtype).train()
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    return model


def _batch(seed, batch=3, length=11):
    g = torch.Generator().manual_seed(_seed(seed))
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, torch.rand(length, generator=g) < 0.3] = -100
    return ids, labels


def _reference_loss(model, ids, labels, *, num_items_in_batch=None, logits_to_keep=0):
    """ForCausalLMLoss written out in the model's dtype, from the unpatched model's logits."""
    logits = model(ids, logits_to_keep=logits_to_keep).logits
    target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    total = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100, reduction="sum")
    return total / ((target != -100).sum() if num_items_in_batch is None else num_items_in_batch)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _run(model, call, upstream):
    model.zero_grad(set_to_none=True)
    loss = call(model)
    (loss * upstream).backward()
    return loss.detach(), _grads(model)


def _assert_same(ours, ref, tol):
    torch.testing.assert_close(ours[0], ref[0], **tol)
    assert ours[1].keys() == ref[1].keys()
    for name in ref[1]:
        torch.testing.assert_close(ours[1][name], ref[1][name], **tol, msg=lambda m, n=name: f"grad of {n}: {m}")


# every family untied; tied heads (Gemma's default) for three of them
_HEADS = [(family, False) for family in FAMILIES] + [("llama", True), ("gemma2", True), ("gemma3", True)]


@pytest.mark.parametrize(("family", "tied"), _HEADS, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in _HEADS])
def test_loss_and_every_gradient_match_float64_reference(family, tied):
    ref_model = _model(family, tied=tied, seed=1)
    model = sg_hf.apply(copy.deepcopy(ref_model), chunk_size=7)  # several chunks, the last one partial
    ids, labels = _batch(2)
    n_items = torch.tensor(2 * int((labels[:, 1:] != -100).sum()))  # as if half the tokens were in other micro-batches
    keep = 6
    cases = {
        "mean": (lambda m: m(ids, labels=labels).loss,
                 lambda m: _reference_loss(m, ids, labels)),
        "num_items_in_batch": (lambda m: m(ids, labels=labels, num_items_in_batch=n_items).loss,
                               lambda m: _reference_loss(m, ids, labels, num_items_in_batch=n_items)),
        "int_num_items": (lambda m: m(ids, labels=labels, num_items_in_batch=int(n_items)).loss,
                          lambda m: _reference_loss(m, ids, labels, num_items_in_batch=int(n_items))),
        # logits_to_keep=k with labels for the kept positions only, as ForCausalLMLoss requires
        "logits_to_keep": (lambda m: m(ids, labels=labels[:, -keep:], logits_to_keep=keep).loss,
                           lambda m: _reference_loss(m, ids, labels[:, -keep:], logits_to_keep=keep)),
    }
    for case, (ours_call, ref_call) in cases.items():
        upstream = 1.7  # a non-unit upstream gradient
        ours = _run(model, ours_call, upstream)
        ref = _run(ref_model, ref_call, upstream)
        assert ours[0].dtype == torch.float64, case
        _assert_same(ours, ref, F64)
    assert model(ids, labels=labels).logits is None  # the fused path ran: no logits


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers_own_loss_in_float32(family):
    stock = _model(family, tied=False, dtype=torch.float32, seed=3)
    model = sg_hf.apply(copy.deepcopy(stock))
    ids, labels = _batch(4)
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(40)}):
        ours = _run(model, lambda m, kw=kwargs: m(ids, labels=labels, **kw).loss, 1.0)
        ref = _run(stock, lambda m, kw=kwargs: m(ids, labels=labels, **kw).loss, 1.0)
        _assert_same(ours, ref, F32)


def test_shift_labels_and_ignore_index_are_passed_through():
    stock = _model("llama", tied=False, dtype=torch.float32, seed=5)
    model = sg_hf.apply(copy.deepcopy(stock))
    ids, labels = _batch(6)
    shifted = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(_seed(7)))
    shifted[:, -2:] = 7
    sevens = labels.masked_fill(labels == -100, 7)
    # shift_labels replaces the shifted labels; the labels then only need the right count
    cases = [(labels, {"shift_labels": shifted}), (sevens, {"ignore_index": 7}),
             (sevens, {"shift_labels": shifted, "ignore_index": 7})]
    for lab, kwargs in cases:
        ours = _run(model, lambda m, a=lab, kw=kwargs: m(ids, labels=a, **kw).loss, 1.0)
        ref = _run(stock, lambda m, a=lab, kw=kwargs: m(ids, labels=a, **kw).loss, 1.0)
        _assert_same(ours, ref, F32)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_evaluation_and_calls_without_labels_are_unchanged(family):
    stock = _model(family, tied=True, seed=8)
    model = sg_hf.apply(copy.deepcopy(stock))
    ids, labels = _batch(9)
    train = model(ids), stock(ids)  # training mode, no labels
    assert torch.equal(train[0].logits, train[1].logits)
    model.eval(), stock.eval()
    ev = model(ids, labels=labels), stock(ids, labels=labels)  # evaluation with labels: transformers' loss
    assert torch.equal(ev[0].logits, ev[1].logits)
    assert torch.equal(ev[0].loss, ev[1].loss)
    last = model(ids, logits_to_keep=1).logits, stock(ids, logits_to_keep=1).logits
    assert torch.equal(last[0], last[1]) and last[0].shape == (ids.shape[0], 1, VOCAB)


def test_generation_is_unchanged_and_signature_kept():
    stock = _model("qwen3", tied=False, seed=10).eval()
    model = sg_hf.apply(copy.deepcopy(stock))
    # generate() and Trainer read the forward's signature (logits_to_keep, **kwargs)
    assert inspect.signature(model.forward) == inspect.signature(stock.forward)
    ids = _batch(11)[0][:, :4]
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), stock.generate(ids, **kw))


def test_activation_checkpointing():
    stock = _model("qwen2", tied=False, seed=22)
    stock.activation_checkpointing_enable()
    model = sg_hf.apply(copy.deepcopy(stock))
    assert model.is_activation_checkpointing
    ids, labels = _batch(23)
    ours = _run(model, lambda m: m(ids, labels=labels, use_cache=False).loss, 1.0)
    ref = _run(stock, lambda m: _reference_loss(m, ids, labels), 1.0)
    _assert_same(ours, ref, F64)


def test_tuple_output_without_logits():
    stock = _model("mistral", tied=False, dtype=torch.float32, seed=12)
    model = sg_hf.apply(copy.deepcopy(stock))
    ids, labels = _batch(13)
    ours = model(ids, labels=labels, use_cache=False, return_dict=False)
    ref = stock(ids, labels=labels, use_cache=False, return_dict=False)
    assert len(ours) == 1 and len(ref) == 2  # (loss,) against (loss, logits): None fields are dropped
    torch.testing.assert_close(ours[0], ref[0], **F32)
    positional = model(ids, None, None, None, None, labels, False)  # labels passed by position
    assert positional.logits is None
    torch.testing.assert_close(positional.loss, ref[0], **F32)


def test_half_precision_loss_is_float32_and_close():
    stock = _model("gemma3", tied=True, dtype=torch.bfloat16, seed=14)
    model = sg_hf.apply(copy.deepcopy(stock))
    ids, labels = _batch(15)
    ours, ref = model(ids, labels=labels).loss, stock(ids, labels=labels).loss
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)


def test_apply_unapply_context_manager_and_copies():
    stock = _model("llama", tied=False, seed=16)
    model = copy.deepcopy(stock)
    other = copy.deepcopy(stock)
    ids, labels = _batch(17)
    assert sg_hf.apply(model) is model and sg_hf.is_applied(model)
    assert sg_hf.apply(model, chunk_size=3) is model  # again: new options, one patch
    assert not sg_hf.is_applied(other) and other(ids, labels=labels).logits is not None  # instance-level only
    twin = copy.deepcopy(model)  # the copy's patch runs the copy (reference models of RL trainers are copies)
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
    assert sg_hf.is_applied(twin) and twin(ids, labels=labels).logits is None
    assert not torch.equal(twin(ids, labels=labels).loss, model(ids, labels=labels).loss)
    sg_hf.unapply(model)
    assert not sg_hf.is_applied(model) and "forward" not in model.__dict__
    assert model(ids, labels=labels).logits is not None
    sg_hf.unapply(model)  # not applied: no-op
    with sg_hf.applied(model, chunk_size=5) as inside:
        assert inside is model and model(ids, labels=labels).logits is None
    assert not sg_hf.is_applied(model)
    with sg_hf.applied(twin):
        pass
    assert sg_hf.is_applied(twin)  # applied before the block: left applied


def test_forward_wrapped_after_apply_is_not_clobbered():
    model = sg_hf.apply(_model("llama", tied=False, seed=18))
    inner = model.forward
    model.forward = lambda *a, **k: inner(*a, **k)
    with pytest.raises(RuntimeError, match="replaced after"):
        sg_hf.unapply(model)


def test_unsupported_models_raise_naming_supported_classes():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(TypeError, match=r"GPT2LMHeadModel is not supported.*LlamaForCausalLM.*Gemma3ForCausalLM"):
        sg_hf.apply(gpt2)
    with pytest.raises(TypeError, match="not supported"):
        sg_hf.apply(torch.nn.Linear(3, 4))

    class Custom(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    custom = Custom(_model("llama", tied=False).config)
    with pytest.raises(TypeError, match="Custom overrides the forward of LlamaForCausalLM"):
        sg_hf.apply(custom)

    class Plain(transformers.Qwen2ForCausalLM):  # a subclass keeping the forward is fine
        pass

    assert sg_hf.is_applied(sg_hf.apply(Plain(_model("qwen2", tied=False).config)))
    odd_head = _model("llama", tied=False)
    odd_head.lm_head = torch.nn.Sequential(odd_head.lm_head)
    with pytest.raises(TypeError, match="lm_head must be a torch.nn.Linear"):
        sg_hf.apply(odd_head)
    with pytest.raises(TypeError, match="chunk_size"):
        sg_hf.apply(_model("llama", tied=False), chunk_size=2.0)
    with pytest.raises(ValueError, match="chunk_size"):
        sg_hf.apply(_model("llama", tied=False), chunk_size=0)


def test_bad_labels_raise():
    model = sg_hf.apply(_model("llama", tied=False, seed=19))
    ids, labels = _batch(20)
    with pytest.raises(ValueError, match="labels: .* targets for .* hidden rows"):
        model(ids, labels=labels, logits_to_keep=4)  # full-length labels, 4 kept positions
    bad = labels.clone()
    bad[2, 3] = VOCAB  # out of range
    with pytest.raises(ValueError, match="target"):
        model(ids, labels=bad)


def test_causal_lm_loss_function_matches_for_causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(_seed(21))
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = (torch.randn(VOCAB, 16, generator=g) * 0.3).requires_grad_()
    bias = torch.randn(VOCAB, generator=g, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels[1, :3] = -100
    for n_items in (None, 11):
        ours = sg_hf.causal_lm_loss(hidden, weight, labels, bias, num_items_in_batch=n_items, softcap=2.0)
        logits = 2.0 * torch.tanh(F.linear(hidden, weight, bias) / 2.0)
        ref = ForCausalLMLoss(logits, labels, VOCAB, num_items_in_batch=n_items)
        got = torch.autograd.grad(ours, (hidden, weight, bias))
        want = torch.autograd.grad(ref, (hidden, weight, bias))
        torch.testing.assert_close(ours, ref, **F32)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **F32)
    with pytest.raises(ValueError, match="labels: needed"):
        sg_hf.causal_lm_loss(hidden, weight, None)


def test_example_script_runs():
    import runpy

    script = Path(__file__).resolve().parents[2] / "examples" / "hf_causal_lm.py"
    losses = runpy.run_path(str(script))["main"](["--steps", "3", "--vocab", "1000"])
    assert len(losses) == 3 and all(np.isfinite(losses))


_MEASURE = """
    import json, sys, torch, transformers
    from softgrad.torch.integrations import transformers as sg_hf
    torch.set_num_threads(1)
    vocab, batch, length = map(int, sys.argv[1:4])
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    def step(ids):
        model.zero_grad(set_to_none=False)  # gradient buffers exist from the warm-up: not counted
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        return out.loss.item()
    res = {}
    for variant in ("softgrad", "transformers"):
        if variant == "softgrad":
            sg_hf.apply(model)
        else:
            sg_hf.unapply(model)
        step(ids[:, :8])  # warm-up: lazy initialisation, gradient buffers
        loss, peak = peak_extra_kib(lambda: step(ids))
        res[variant] = {"peak_extra_kib": peak, "loss": loss}
    print(json.dumps(res))
"""


@pytest.mark.slow  # a fresh interpreter importing transformers: ~15 s
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_lower_than_unpatched():
    # N x V float32 = 2 x 256 x 32000 x 4 B = 62.5 MiB; transformers holds the logits, their
    # log-softmax and their gradient; softgrad one chunk of rows at a time
    vocab, batch, length = 32000, 2, 256
    res = measure(_MEASURE, vocab, batch, length, timeout=180)
    np.testing.assert_allclose(res["softgrad"]["loss"], res["transformers"]["loss"], rtol=1e-5)
    logits_kib = batch * length * vocab * 4 // 1024
    assert res["transformers"]["peak_extra_kib"] >= logits_kib, res  # the reference really holds N x V
    assert res["softgrad"]["peak_extra_kib"] < logits_kib, res
    assert 3 * res["softgrad"]["peak_extra_kib"] < res["transformers"]["peak_extra_kib"], res


def test_docs_recipe_runs():
    doc = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```python\n")[1:]]
    (code,) = [b for b in blocks if "sg_hf.apply(model)" in b]  # the README's Hugging Face recipe
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].logits is None and torch.isfinite(scope["out"].loss)


def test_imports_and_refuses_models_without_transformers(monkeypatch):
    # the module imports transformers nowhere: a fresh copy loads with the package blocked
    import importlib.util

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    spec = importlib.util.spec_from_file_location("_softgrad_hf_probe", sg_hf.__file__)
    probe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, probe)  # dataclasses look their module up there
    spec.loader.exec_module(probe)
    with pytest.raises(TypeError, match="Linear is not supported"):
        probe.apply(torch.nn.Linear(2, 2))
