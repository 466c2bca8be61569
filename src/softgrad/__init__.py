"""softgrad: softmax, its losses and their gradients.

Stable softmax / log-softmax / logsumexp, the softmax Jacobian and backward pass,
cross-entropy with PyTorch's options and its fused gradient ``softmax(z) - y``, the
linear softmax classifier, and numerical gradient checking. The core needs NumPy
only; ``softgrad.torch`` (PyTorch, Triton) and the classifier's extras are optional.
"""

from softgrad._backend import available_backends, get_backend, set_backend, use_backend
from softgrad._gradcheck import GradcheckReport, gradcheck, numerical_gradient
from softgrad._linear import (
    linear_softmax_loss,
    linear_svm_loss,
    softmax_layer_cross_entropy_grad,
    softmax_layer_jacobian,
)
from softgrad._losses import (
    cross_entropy,
    cross_entropy_from_probs,
    softmax_cross_entropy,
    softmax_mse,
)
from softgrad._softmax import (
    log_softmax,
    logsumexp,
    softmax,
    softmax_backward,
    softmax_jacobian,
)

__version__ = "0.1.0"

# Imported on first use, so that ``import softgrad`` needs neither scikit-learn nor SciPy.
_LAZY = {"LogisticRegression": "softgrad._logistic", "SoftmaxClassifier": "softgrad._classifier",
         "datasets": "softgrad.datasets"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__.endswith(name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'softgrad' has no attribute {name!r}")

__all__ = [
    "GradcheckReport",
    "LogisticRegression",
    "SoftmaxClassifier",
    "__version__",
    "available_backends",
    "cross_entropy",
    "cross_entropy_from_probs",
    "get_backend",
    "gradcheck",
    "linear_softmax_loss",
    "linear_svm_loss",
    "log_softmax",
    "logsumexp",
    "numerical_gradient",
    "set_backend",
    "softmax",
    "softmax_backward",
    "softmax_cross_entropy",
    "softmax_jacobian",
    "softmax_layer_cross_entropy_grad",
    "softmax_layer_jacobian",
    "softmax_mse",
    "use_backend",
]
