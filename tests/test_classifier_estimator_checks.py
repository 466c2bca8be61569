"""scikit-learn's own estimator test suite on SoftmaxClassifier (each solver) and LogisticRegression, no checks skipped.

The checks come from ``estimator_checks_generator`` (what ``parametrize_with_checks``
uses), with no expected failures. ``check_array_api_input`` runs in a subprocess with
``SCIPY_ARRAY_API=1`` (in this process it would skip itself). The pandas checks need
pandas, which is in the ``test`` extra.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sklearn.utils.estimator_checks import estimator_checks_generator

from softgrad import LogisticRegression, SoftmaxClassifier


ESTIMATORS = [
    SoftmaxClassifier(),
    SoftmaxClassifier(solver="gd", max_iter=100),
    SoftmaxClassifier(solver="sgd", random_state=0, max_iter=20),
    LogisticRegression(),
    LogisticRegression(solver="gd", max_iter=100),
]
# check_array_api_input skips itself unless SCIPY_ARRAY_API=1 was set before SciPy was
# imported; it runs in a subprocess below instead, so nothing here is skipped.
_SUBPROCESS_CHECKS = {"check_array_api_input"}


def _check_name(check):
    return getattr(check, "func", check).__name__


CHECKS = [
    pytest.param(estimator, check, id=f"{estimator!r}-{_check_name(check)}")
    for estimator in ESTIMATORS
    for estimator, check in estimator_checks_generator(estimator, expected_failed_checks={})
    if _check_name(check) not in _SUBPROCESS_CHECKS
]


@pytest.mark.parametrize("estimator, check", CHECKS)
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # gd/sgd at small max_iter
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_array_api_check_with_scipy_array_api_enabled():
    """``check_array_api_input`` (numpy namespace) skips itself unless SCIPY_ARRAY_API=1 was set
    before SciPy was imported; run it in a fresh interpreter where it is set, so it is not skipped."""
    code = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "from sklearn.utils.estimator_checks import check_array_api_input\n"
        "from softgrad import LogisticRegression, SoftmaxClassifier\n"
        "for est in (SoftmaxClassifier(), SoftmaxClassifier(solver='gd', max_iter=100),\n"
        "            SoftmaxClassifier(solver='sgd', random_state=0, max_iter=20), LogisticRegression()):\n"
        "    check_array_api_input('SoftmaxClassifier', est, array_namespace='numpy')\n"
        "print('passed')\n"
    )
    env = {**os.environ, "SCIPY_ARRAY_API": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("passed"), out.stderr[-3000:]
