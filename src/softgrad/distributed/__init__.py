"""softgrad.distributed: several processes on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

* Vocabulary parallelism -- the classes of a language model's output are split across
  ranks: :func:`vocab_parallel_cross_entropy` (each rank holds a block of columns of the
  logits) and :func:`vocab_parallel_linear_cross_entropy` (each rank holds a block of rows of
  the output layer's weight; the logits are never materialised). Communication is ``O(N)``
  per step (per-row statistics), never ``O(N * V)``. :func:`vocab_parallel_linear_logprobs`
  is the RL head in the same layout (per-token log-probabilities and entropy).
* Data parallelism for :class:`softgrad.SoftmaxClassifier`: :func:`fit_data_parallel` fits
  on rows split across ranks and gives every rank the model that one process would fit on
  all rows.

Needs PyTorch with ``torch.distributed`` and an initialised process group
(``torch.distributed.init_process_group``, e.g. under ``torchrun``). A failed peer makes
the collectives raise :class:`CollectiveError` within the group's timeout.
"""

from softgrad.distributed._comm import CollectiveError
from softgrad.distributed._data_parallel import fit_data_parallel
from softgrad.distributed._vocab_parallel import vocab_parallel_cross_entropy
from softgrad.distributed._vocab_parallel_linear import vocab_parallel_linear_cross_entropy
from softgrad.distributed._vocab_parallel_logprobs import vocab_parallel_linear_logprobs

__all__ = [
    "CollectiveError",
    "fit_data_parallel",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_linear_logprobs",
]
