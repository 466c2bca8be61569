"""softgrad.torch.integrations: softgrad's losses inside other libraries' models.

* :mod:`softgrad.torch.integrations.transformers` -- ``apply(model)`` makes a Hugging Face
  ``*ForCausalLM`` model compute its training loss with
  :func:`softgrad.torch.linear_cross_entropy`, from the final hidden states and the
  ``lm_head`` weight, so the ``(tokens, vocabulary)`` logits are never formed.

Each integration imports its library only when called, so these modules import without it.
"""

__all__ = ["transformers"]
