"""softgrad: softmax, its losses and their gradients.

Stable softmax / log-softmax / logsumexp, the softmax Jacobian and backward pass,
cross-entropy with PyTorch's options and its fused gradient ``softmax(z) - y``, the
linear softmax classifier, and numerical gradient checking. The core needs NumPy
only; ``softgrad.torch`` (PyTorch, Triton) and the classifier's extras are optional.
"""

from softgrad._backend import available_backends, get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
]
