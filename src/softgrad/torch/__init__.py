"""softgrad.torch: fused cross-entropy losses for PyTorch.

``cross_entropy`` / ``CrossEntropyLoss`` are ``torch.nn.functional.cross_entropy`` with every
option, plus the z-loss, logit softcapping and the per-row logsumexp, computed with the
gradient in one pass (a Triton kernel on CUDA, PyTorch ops on CPU).
``linear_cross_entropy`` / ``LinearCrossEntropyLoss`` fuse a language model's output layer
with it and never hold the ``(N, V)`` logits. ``use_kernel`` / ``use_value_checks`` choose the row
kernels and the eager value checks per thread. Needs PyTorch; Triton is optional (CUDA only).
"""

from softgrad.torch._cross_entropy import CrossEntropyLoss, CrossEntropyOutput, cross_entropy, sequence_normalizer
from softgrad.torch._linear_cross_entropy import LinearCrossEntropyLoss, choose_chunk_size, linear_cross_entropy
from softgrad.torch._linear_logprobs import LogprobsOutput, linear_logprobs
from softgrad.torch._settings import get_kernel, row_kernels, use_kernel, use_value_checks, value_checks_enabled

__all__ = [
    "CrossEntropyLoss",
    "CrossEntropyOutput",
    "LinearCrossEntropyLoss",
    "LogprobsOutput",
    "choose_chunk_size",
    "cross_entropy",
    "get_kernel",
    "linear_cross_entropy",
    "linear_logprobs",
    "row_kernels",
    "sequence_normalizer",
    "use_kernel",
    "use_value_checks",
    "value_checks_enabled",
]
