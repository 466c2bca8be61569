"""Hugging Face transformers: a causal LM's training loss without its ``(N, V)`` logits.

``apply(model)`` makes a ``*ForCausalLM`` model of transformers compute its training loss with
:func:`softgrad.torch.linear_cross_entropy` from the final hidden states and the ``lm_head``
weight, so neither the logits nor their gradient (``tokens x vocabulary`` floats each, plus
the float32 copy ``ForCausalLMLoss`` makes) ever exist::

    from softgrad.torch.integrations import transformers as sg_hf
    model = AutoModelForCausalLM.from_pretrained(...)
    sg_hf.apply(model)
    out = model(input_ids, labels=labels)       # model.train(): out.loss, out.logits is None
    out.loss.backward()

The patched loss is transformers' ``ForCausalLMLoss`` (``loss/loss_utils.py``), computed
without logits. With ``z = softcap(h W^T)`` for the hidden states ``h`` that ``lm_head`` sees
(after ``logits_to_keep``) and next-token targets ``t_i = labels[i + 1]`` (the last position
of each row gets ``ignore_index``; ``shift_labels=`` replaces the shifted labels)::

    loss = sum_{i: t_i != ignore_index} (lse(z_i) - z_{i, t_i}) / D
    D    = num_items_in_batch          if given (gradient accumulation: Trainer counts the
                                                 target tokens of all micro-batches)
         = #{i: t_i != ignore_index}   otherwise

``softcap(z) = c tanh(z / c)`` with ``c = config.final_logit_softcapping`` for Gemma 2 and
Gemma 3, the identity for the others. ``ignore_index`` defaults to -100, as in transformers.

When the patch is active: the model is in training mode (``model.train()``) and ``labels`` is
given. Then the output's ``logits`` is None (a tuple output, ``return_dict=False``, lacks them,
as ``ModelOutput.to_tuple`` drops None fields) and everything else -- ``loss``, ``cache``,
``hidden_states``, ``attentions``, a mixture-of-experts auxiliary loss added by the model --
is the model's own. Otherwise (``model.eval()``, generation, no ``labels``) the model's forward
runs untouched and returns its logits.

How: the model's own ``forward`` runs, with two stand-ins for the length of the call.
``lm_head`` records the hidden states it is given and returns an empty ``(..., 0)`` tensor in
place of the logits (the softcap of Gemma's forward passes over it), and the model's
``loss_function`` computes the fused loss from the recorded hidden states. So the model's
argument handling, ``logits_to_keep`` slicing and outputs stay transformers' own. That is
exact only for a forward that feeds ``lm_head``'s output, softcapped or not, straight into
``loss_function``; :data:`SUPPORTED_MODELS` lists the classes whose forward does (read from
the transformers 5.x sources), and ``apply`` refuses every other model.

Precision: the loss is computed in float32 for float32/bfloat16/float16 models (like
``ForCausalLMLoss``, which upcasts the logits) and in float64 for float64 models (where
``ForCausalLMLoss`` computes in float32). The loss tensor is float32 for half-precision models
and in the model's dtype otherwise.

Limits: a ``compute_loss_func`` of ``Trainer`` that reads ``outputs.logits`` gets None in
training; the ``lm_head`` weight is read directly, so a wrapper that shards it or gathers it in
``lm_head``'s own forward (FSDP with ``lm_head`` in its own unit, tensor-parallel plans) is not
supported; a PEFT model is patched through its base model (``apply(peft_model.get_base_model())``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from softgrad.torch._linear_cross_entropy import linear_cross_entropy

__all__ = ["SUPPORTED_MODELS", "applied", "apply", "causal_lm_loss", "is_applied", "unapply"]

# class name -> the config attribute holding its final-logit softcap (None: no softcap).
# Each class's forward is ``h = slice_logits_to_keep(last_hidden_state); logits = lm_head(h);``
# ``[logits = c * tanh(logits / c)]; loss = loss_function(logits, labels, vocab_size, **kwargs)``.
SUPPORTED_MODELS: dict[str, str | None] = {
    "LlamaForCausalLM": None,
    "MistralForCausalLM": None,
    "Qwen2ForCausalLM": None,
    "Qwen3ForCausalLM": None,
    "GemmaForCausalLM": None,
    "Gemma2ForCausalLM": "final_logit_softcapping",
    "Gemma3ForCausalLM": "final_logit_softcapping",
}

_STATE = "_softgrad_linear_cross_entropy"  # model attribute holding the _Patch


@dataclass
class _Patch:
    """What ``apply`` installed, and the caller's options."""

    softcap_attr: str | None
    chunk_size: int | None
    previous_forward: Any  # an instance-level ``forward`` that was there before, or None
    forward: Any  # the bound method ``apply`` installed


def _supported_class(model: nn.Module) -> type:
    """The supported transformers class whose ``forward`` ``model`` runs, or raise."""
    names = ", ".join(SUPPORTED_MODELS)
    cls = type(model)
    for base in cls.__mro__:
        if base.__name__ in SUPPORTED_MODELS and base.__module__.startswith("transformers.models."):
            if cls.forward is not base.forward:
                raise TypeError(
                    f"model: {cls.__name__} overrides the forward of {base.__name__}; softgrad's transformers "
                    f"integration patches only the forward of these transformers classes: {names}"
                )
            return base
    hint = " (for a PEFT model, pass model.get_base_model())" if hasattr(model, "get_base_model") else ""
    raise TypeError(
        f"model: {cls.__module__}.{cls.__name__} is not supported by softgrad's transformers integration{hint}; "
        f"supported classes: {names}"
    )


def apply(model: nn.Module, *, chunk_size: int | None = None) -> nn.Module:
    """Make ``model`` compute its training loss with :func:`softgrad.torch.linear_cross_entropy`.

    Patches this model instance only (its class and other instances are untouched); calling it
    again replaces the options. See the module docstring for the loss, when the patch is active
    and what changes in the output (``logits`` is None in training with ``labels``).

    Args:
        model: a transformers model of a class in :data:`SUPPORTED_MODELS` (e.g.
            ``LlamaForCausalLM``, or a subclass that keeps its ``forward``) whose ``lm_head`` is a
            ``torch.nn.Linear``.
        chunk_size: rows per chunk for :func:`softgrad.torch.linear_cross_entropy`; default from
            :func:`softgrad.torch.choose_chunk_size`.

    Returns:
        nn.Module: ``model`` itself.

    Raises:
        TypeError: ``model`` is not one of the supported classes, overrides their ``forward``, or
            its ``lm_head`` is not exactly a floating-point ``torch.nn.Linear``; ``chunk_size`` is not
            an int.
        ValueError: ``chunk_size < 1``.
        RuntimeError: ``model.forward`` was replaced by someone else after an earlier ``apply``.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    family = _supported_class(model)
    head = getattr(model, "lm_head", None)
    # exactly nn.Linear: subclasses (quantised layers, float8 or LoRA-style wrappers) compute something else
    if type(head) is not nn.Linear:
        raise TypeError(
            "model.lm_head must be a torch.nn.Linear for softgrad's transformers integration, "
            f"got {type(head).__name__}"
        )
    if not head.weight.dtype.is_floating_point:
        raise TypeError(f"model.lm_head.weight must be floating point, got {head.weight.dtype}")
    state = model.__dict__.get(_STATE)
    if state is not None:
        _check_own_forward(model, state)
        state.chunk_size = chunk_size
        return model
    previous = model.__dict__.get("forward")
    bound = types.MethodType(_wrapped_forward(family), model)
    object.__setattr__(model, _STATE, _Patch(SUPPORTED_MODELS[family.__name__], chunk_size, previous, bound))
    object.__setattr__(model, "forward", bound)
    return model


def unapply(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: ``model`` computes its loss from logits again. No-op if not applied.

    Raises:
        RuntimeError: ``model.forward`` was replaced by someone else after ``apply`` (restoring
            it would drop their wrapper).
    """
    state = model.__dict__.get(_STATE)
    if state is None:
        return model
    _check_own_forward(model, state)
    del model.__dict__[_STATE]
    if state.previous_forward is None:
        del model.__dict__["forward"]
    else:
        object.__setattr__(model, "forward", state.previous_forward)
    return model


def is_applied(model: nn.Module) -> bool:
    """Whether :func:`apply` is in effect on ``model``."""
    return _STATE in model.__dict__


@contextlib.contextmanager
def applied(model: nn.Module, *, chunk_size: int | None = None) -> Iterator[nn.Module]:
    """Context manager: :func:`apply` on entry, :func:`unapply` on exit (unless it was applied before)."""
    was = is_applied(model)
    apply(model, chunk_size=chunk_size)
    try:
        yield model
    finally:
        if not was:
            unapply(model)


def _check_own_forward(model, state: _Patch) -> None:
    current = model.__dict__.get("forward")
    ours = isinstance(current, types.MethodType) and current.__func__ is state.forward.__func__
    if not (ours and current.__self__ is model):
        raise RuntimeError(
            "model.forward was replaced after softgrad's transformers integration patched it; "
            "undo that wrapper first"
        )


@functools.cache
def _wrapped_forward(family: type):
    """The instance ``forward`` for models of ``family``; carries ``family.forward``'s signature.

    transformers reads the signature (``generate`` looks for ``logits_to_keep``, ``Trainer`` for
    ``**kwargs`` to pass ``num_items_in_batch``), so it must stay the original's.
    """
    signature = inspect.signature(family.forward)

    def forward(self, *args, **kwargs):
        state = self.__dict__[_STATE]
        original = state.previous_forward or types.MethodType(type(self).forward, self)
        if not self.training:
            return original(*args, **kwargs)
        try:
            labels = signature.bind(self, *args, **kwargs).arguments.get("labels")
        except TypeError:
            return original(*args, **kwargs)  # the model's own forward reports the bad call
        if labels is None:
            return original(*args, **kwargs)
        return _fused_forward(self, state, original, args, kwargs)

    functools.update_wrapper(forward, family.forward)
    return forward


def _fused_forward(model, state: _Patch, original, args, kwargs):
    """Run the model's forward with ``lm_head`` recording its input and the fused loss."""
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:  # as transformers' can_return_tuple decides
        return_dict = getattr(model.config, "return_dict", True)
    head = model.lm_head
    if type(head) is not nn.Linear:  # replaced since apply()
        raise TypeError(f"model.lm_head must be a torch.nn.Linear, got {type(head).__name__}")
    seen: list[torch.Tensor] = []

    def head_forward(hidden):
        seen.append(hidden)
        return hidden.new_empty((*hidden.shape[:-1], 0))

    def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **_unused):
        if len(seen) != 1:
            raise RuntimeError(f"{type(model).__name__}.lm_head was called {len(seen)} times in one forward; "
                               "softgrad's transformers integration expects exactly one call")
        softcap = getattr(model.config, state.softcap_attr, None) if state.softcap_attr else None
        if head.weight.device.type == "meta":
            raise RuntimeError("model.lm_head.weight is on the meta device (offloaded); softgrad's transformers "
                               "integration needs it in memory")
        # a model split over devices (device_map) may hand lm_head hidden states from another device
        hidden = seen[0].to(head.weight.device)
        return causal_lm_loss(hidden, head.weight, labels, head.bias, num_items_in_batch=num_items_in_batch,
                              ignore_index=ignore_index, shift_labels=shift_labels, softcap=softcap,
                              chunk_size=state.chunk_size)

    with _instance_attr(head, "forward", head_forward), _instance_attr(model, "_loss_function", loss_function):
        out = original(*args, return_dict=True, **kwargs)
    if out.get("loss") is None:
        raise RuntimeError(f"{type(model).__name__}.forward returned no loss although labels were given")
    out = type(out)(**{key: value for key, value in out.items() if key != "logits"})
    return out if return_dict else out.to_tuple()


@contextlib.contextmanager
def _instance_attr(obj, name: str, value):
    """Set ``obj.<name>`` in the instance ``__dict__`` for the block, then restore what was there."""
    missing = object()
    before = obj.__dict__.get(name, missing)
    object.__setattr__(obj, name, value)
    try:
        yield
    finally:
        if before is missing:
            del obj.__dict__[name]
        else:
            object.__setattr__(obj, name, before)


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` of ``softcap(hidden @ weight.T + bias)``, without the logits.

    Args:
        hidden: ``(..., D)`` hidden states, as ``lm_head`` gets them.
        weight: ``(V, D)`` ``lm_head`` weight; ``bias``: optional ``(V,)``.
        labels: token ids of shape ``hidden.shape[:-1]``; the target of position ``i`` is
            ``labels[..., i + 1]`` and the last position of each row is ignored. Unused (may be
            None) when ``shift_labels`` is given.
        num_items_in_batch: divide the summed token losses by this (int or tensor) instead of
            taking the mean over the non-ignored targets.
        ignore_index: label value that contributes nothing.
        shift_labels: targets already aligned with ``hidden`` (shape ``hidden.shape[:-1]``).
        softcap: ``c`` of ``c tanh(z / c)`` on the logits, or None.
        chunk_size: rows per chunk of :func:`softgrad.torch.linear_cross_entropy`.

    Returns:
        Tensor: the scalar loss; float32 for bfloat16/float16 ``hidden``, else ``hidden``'s dtype.

    Raises:
        ValueError: the targets' element count differs from the number of hidden rows.
        TypeError, ValueError: as :func:`softgrad.torch.linear_cross_entropy`.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("labels: needed when shift_labels is not given")
        # next-token targets: position i predicts labels[i + 1]; the last position has none
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if target.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"labels: {target.shape[0]} targets for {hidden.shape[0]} hidden rows (with logits_to_keep, "
            "labels must cover only the kept positions)"
        )
    return _normalized_loss(hidden, weight, target, bias, num_items_in_batch, ignore_index, softcap, chunk_size)


def _normalized_loss(hidden, weight, target, bias, num_items_in_batch, ignore_index, softcap, chunk_size):
    """The one call of :func:`linear_cross_entropy`: the mean, or the sum over ``num_items_in_batch``.

    ``num_items_in_batch`` goes in as the rule's ``normalizer``, so the division happens in
    float32 inside the fused pass (its gradient factor too), not after a bf16 sum.
    """
    normalizer = None
    if num_items_in_batch is not None:
        normalizer = num_items_in_batch.to(hidden.device) if torch.is_tensor(num_items_in_batch) \
            else float(num_items_in_batch)
    loss = linear_cross_entropy(hidden, weight, target, bias, ignore_index=ignore_index, normalizer=normalizer,
                                softcap=softcap, chunk_size=chunk_size)
    if loss.dtype in (torch.float16, torch.bfloat16):
        loss = loss.float()  # ForCausalLMLoss returns float32 for half-precision models
    return loss
