"""Train a SoftmaxClassifier on the built-in digits with its rows split across processes.

Each process (rank) holds a shard of the training rows; ``softgrad.distributed.fit_data_parallel``
sums the objective and its gradient over the ranks at every iteration (one float64
all-reduce), so every rank ends with the model one process would fit on all the rows.

Launch (two processes on this machine, gloo on CPU)::

    torchrun --standalone --nproc_per_node=2 examples/train_data_parallel.py
    torchrun --standalone --nproc_per_node=3 examples/train_data_parallel.py --solver gd --check

Without torchrun it runs as a world of one process. ``--check`` also fits on all rows in one
process (rank 0) and exits with status 1 unless the two models agree to 1e-8.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings

import numpy as np
import torch.distributed as dist

from softgrad import SoftmaxClassifier
from softgrad.datasets import digits, prepare
from softgrad.distributed import fit_data_parallel


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--solver", choices=["lbfgs", "gd"], default="lbfgs")
    parser.add_argument("--alpha", type=float, default=1e-3, help="L2 strength (SoftmaxClassifier's alpha)")
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation/test split")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds a collective may wait for a peer before every rank fails")
    parser.add_argument("--check", action="store_true", help="compare with a one-process fit on rank 0")
    args = parser.parse_args(argv)

    # ---------------------------------------------------------------- the process group
    timeout = datetime.timedelta(seconds=args.timeout)
    owns_group = not dist.is_initialized()  # a caller (a test harness) may have set the group up already
    if owns_group and "RANK" in os.environ:  # torchrun: rank, world size and rendezvous come from the environment
        dist.init_process_group("gloo", timeout=timeout)
    elif owns_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()

    # ---------------------------------------------------------------- this rank's rows
    # The digits are tiny and ship with scikit-learn, so every rank reads them and makes the
    # same seeded split; each then keeps every world-th training row (uneven when the
    # count does not divide). A job whose data does not fit one machine reads only its shard.
    data = prepare(digits(), seed=args.seed)
    X_shard, y_shard = data.X_train[rank::world], data.y_train[rank::world]  # (N_k, 64), (N_k,)

    # ---------------------------------------------------------------- fit
    clf = SoftmaxClassifier(alpha=args.alpha, solver=args.solver, max_iter=args.max_iter, tol=args.tol)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a ConvergenceWarning would print once per rank
        fit_data_parallel(clf, X_shard, y_shard)
    seconds = time.perf_counter() - start

    rows = [None] * world
    dist.all_gather_object(rows, int(X_shard.shape[0]))
    status = 0
    if rank == 0:
        print(f"{world} rank(s), training rows per rank {rows}, solver {args.solver}, alpha {args.alpha:g}")
        print(f"fit: {clf.n_iter_} iterations, objective {clf.objective_:.8f}, {seconds:.2f} s")
        for name, X, y in (("train", data.X_train, data.y_train), ("validation", data.X_val, data.y_val),
                           ("test", data.X_test, data.y_test)):
            print(f"{name:>10} accuracy {clf.score(X, y):.4f}")
        if args.check:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = SoftmaxClassifier(alpha=args.alpha, solver=args.solver, max_iter=args.max_iter,
                                        tol=args.tol).fit(data.X_train, data.y_train)
            diff = max(float(np.max(np.abs(clf.coef_ - ref.coef_))),
                       float(np.max(np.abs(clf.intercept_ - ref.intercept_))))
            same = diff <= 1e-8 and clf.n_iter_ == ref.n_iter_
            print(f"one-process fit: {ref.n_iter_} iterations, max |difference| of the weights {diff:.2e} "
                  f"({'agrees' if same else 'DISAGREES'} to 1e-8)")
            status = 0 if same else 1
    if owns_group:
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
