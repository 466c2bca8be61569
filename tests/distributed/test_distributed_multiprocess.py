"""softgrad.distributed on real process groups: 2 and 3 spawned processes with gloo on CPU (NCCL with >= 2 GPUs).

One spawn per world size runs every check of ``_distributed_checks.py`` on every rank (the
ranks compare their sharded results with the unsharded computation themselves); the tests
below read each check's outcome, so a failure is reported per check with the rank's
traceback. The data-parallel classifier's fitted attributes come back to this process and
are compared here with ``SoftmaxClassifier.fit`` on the concatenated rows.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import _distributed_checks as checks  # noqa: E402

import softgrad  # noqa: E402
from softgrad.distributed._launch import SINGLE_THREAD_ENV, launch  # noqa: E402

WORLDS = [2, 3]
# hard limits: the spawn (imports + all checks) and each collective
SPAWN_TIMEOUT_S = 240
COLLECTIVE_TIMEOUT_S = 60


def _spawn(world, backend):
    env = dict(SINGLE_THREAD_ENV)
    if backend == "gloo":
        env["TRITON_INTERPRET"] = "1"  # the Triton row kernels run in the interpreter on CPU tensors
    device = "cuda" if backend == "nccl" else "cpu"
    results = launch(checks.run_checks, world, device, backend=backend, timeout=SPAWN_TIMEOUT_S,
                     pg_timeout=COLLECTIVE_TIMEOUT_S, env=env)
    failed = [r for r in results if not r.ok]
    if failed:
        pytest.fail("spawned workers failed:\n" + "\n".join(f"rank {r.rank}: {r.error}\n{r.traceback or ''}"
                                                           for r in failed))
    return [r.value for r in results]


_CACHE: dict = {}


def _outcomes(world, backend="gloo"):
    """Every rank's ``{check: (status, data)}``, spawning the world once per session."""
    if (world, backend) not in _CACHE:
        _CACHE[(world, backend)] = _spawn(world, backend)
    return _CACHE[(world, backend)]


def _check(world, name, backend="gloo"):
    """Every rank's data of check ``name``; fails with the ranks' tracebacks if any rank failed it."""
    per_rank = [outcome[name] for outcome in _outcomes(world, backend)]
    bad = [f"rank {rank}:\n{data}" for rank, (status, data) in enumerate(per_rank) if status != "ok"]
    if bad:
        pytest.fail(f"check {name} failed on {len(bad)} of {world} ranks:\n" + "\n".join(bad))
    return [data for _, data in per_rank]


# ----------------------------------------------------------------------------- vocabulary parallel
@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_cross_entropy_equals_unsharded_for_every_option(world):
    cases = _check(world, "ce_index_grid")
    assert cases == [len(checks.SPLITS[world]) * len(checks.CE_GRID)] * world  # every case ran on every rank


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_probability_targets_and_their_gradient(world):
    _check(world, "ce_probability_targets")


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_extremes_infinities_all_ignored_low_precision(world):
    _check(world, "ce_extremes")


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_matches_the_conformance_oracle(world):
    _check(world, "ce_conformance_oracle")


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_same_pass_statistics(world):
    _check(world, "ce_same_pass_statistics")


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_inplace_backward_lse_retain_graph(world):
    _check(world, "ce_inplace_lse_and_retain_graph")


@pytest.mark.parametrize("world", WORLDS)
def test_bad_input_on_one_rank_raises_the_same_error_on_every_rank(world):
    messages = _check(world, "ce_errors_on_every_rank")
    assert all(m == messages[0] for m in messages)  # identical on every rank
    assert "(on rank 0)" in messages[0]["NaN weight on rank 0"]


@pytest.mark.parametrize("world", WORLDS)
def test_communication_is_order_n_and_matches_the_stated_byte_counts(world):
    totals = _check(world, "ce_communication_is_order_n")
    assert all(t == totals[0] for t in totals)


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_linear_head_equals_linear_cross_entropy(world):
    _check(world, "linear_head_grid")


def test_triton_row_kernels_through_the_sharded_path():
    ran = _check(2, "triton_kernels_through_the_interpreter")
    if ran[0] != "ran":
        pytest.skip(ran[0])


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_example_runs_and_checks_itself(world):
    (status, printed), *others = _check(world, "vocab_parallel_example")
    assert status == 0 and all(o[0] == 0 for o in others), printed
    assert "(agree)" in printed and f"{world} rank(s)" in printed and "step    2" in printed


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_logprobs_equals_linear_logprobs(world):
    messages = _check(world, "logprobs_head_grid")
    assert all(m == messages[0] for m in messages)  # the same errors on every rank


# ----------------------------------------------------------------------------- data-parallel classifier
_REFERENCE: dict = {}


def _single_process_fit(name):
    from softgrad import SoftmaxClassifier

    if name not in _REFERENCE:
        from threadpoolctl import threadpool_limits

        softgrad.get_backend()  # load the kernels, so that threadpool_limits reaches them
        X, y, sample_weight = checks.classifier_case_inputs(name)
        # one thread, as in the workers: tiny products on a shared machine pay for idle threads
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore")
            _REFERENCE[name] = SoftmaxClassifier(**checks.CLASSIFIER_CASES[name]).fit(X, y, sample_weight=sample_weight)
    return _REFERENCE[name]


@pytest.mark.parametrize("world, case", [(w, c) for w in WORLDS for c in checks.classifier_cases(w)])
def test_data_parallel_fit_equals_single_process_fit(world, case):
    per_rank = _check(world, "data_parallel_classifier")
    ref = _single_process_fit(case)
    X, y, _ = checks.classifier_case_inputs(case)
    local = [out[case]["local_classes"] for out in per_rank]
    assert any(len(c) < len(ref.classes_) for c in local)  # some rank lacks classes: they were agreed
    for rank, out in enumerate(per_rank):
        got = out[case]
        assert got["classes"] == ref.classes_.tolist()
        np.testing.assert_allclose(got["coef"], ref.coef_, rtol=0, atol=1e-8, err_msg=f"rank {rank} coef_")
        np.testing.assert_allclose(got["intercept"], ref.intercept_, rtol=0, atol=1e-8, err_msg=f"rank {rank}")
        assert got["n_iter"] == ref.n_iter_
        np.testing.assert_allclose(got["objective"], ref.objective_, rtol=1e-12)
        np.testing.assert_allclose(got["loss_curve"], ref.loss_curve_, rtol=1e-10)
        np.testing.assert_allclose(got["callback_values"], ref.loss_curve_, rtol=1e-10)
        assert got["score"] == pytest.approx(ref.score(X, y), abs=1e-12)
        assert got["n_features_in"] == X.shape[1]
        # every rank holds exactly the same model
        np.testing.assert_array_equal(got["coef"], per_rank[0][case]["coef"])


@pytest.mark.parametrize("world", WORLDS)
def test_data_parallel_fit_reports_one_ranks_bad_input_everywhere(world):
    per_rank = _check(world, "data_parallel_classifier")
    for rank, out in enumerate(per_rank):
        if rank == world - 1:
            assert "NaN" in out["error_message"]
        else:
            assert out["error_message"].startswith(f"fit_data_parallel: rank {world - 1} rejected its input")
        assert "solver='sgd' is not supported" in out["sgd_message"]


# ----------------------------------------------------------------------------- NCCL
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL tests need at least two CUDA devices")
def test_every_check_passes_with_nccl_on_two_gpus():
    for name in checks.CHECKS:  # on CUDA the Triton check runs the compiled kernels
        _check(2, name, backend="nccl")
