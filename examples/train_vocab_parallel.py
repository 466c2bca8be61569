"""A next-token model whose output layer is split by vocabulary across processes.

The model is an embedding of the previous token followed by one hidden layer (replicated on
every rank) and an output layer of ``V`` rows, of which rank ``k`` holds a contiguous block
(uneven when ``P`` does not divide ``V``). ``softgrad.distributed.vocab_parallel_linear_cross_entropy``
computes the loss of the whole vocabulary with ``O(N)`` communication and gives each rank the
gradient of its block and the summed gradient of the hidden states, so the replicated layers
receive the same gradient on every rank and stay identical without further communication.
The data are sequences from a random Markov chain over ``V`` tokens (seeded, the same on
every rank), so the loss falls from ``log V`` towards the chain's entropy.

Launch::

    torchrun --standalone --nproc_per_node=2 examples/train_vocab_parallel.py
    torchrun --standalone --nproc_per_node=3 examples/train_vocab_parallel.py --vocab 5000 --steps 50 --check

``--check`` gathers the output layer on rank 0 after the first step's forward and compares the
loss with ``softgrad.torch.linear_cross_entropy`` on the full layer (exit status 1 if they differ).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys

import torch
import torch.distributed as dist

from softgrad.distributed import vocab_parallel_linear_cross_entropy
from softgrad.torch import linear_cross_entropy


def markov_batch(transition: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (previous token, next token) pairs drawn from the chain, ``(n,)`` int64 each."""
    prev = torch.randint(0, transition.shape[0], (n,), generator=generator)
    nxt = torch.multinomial(transition[prev], 1, generator=generator)[:, 0]
    return prev, nxt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--batch", type=int, default=512, help="tokens per step")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--timeout", type=float, default=60.0, help="collective timeout, seconds")
    parser.add_argument("--check", action="store_true", help="compare the first loss with the unsharded head")
    args = parser.parse_args(argv)

    timeout = datetime.timedelta(seconds=args.timeout)
    owns_group = not dist.is_initialized()  # a caller (a test harness) may have set the group up already
    if owns_group and "RANK" in os.environ:  # torchrun: rank, world size and rendezvous come from the environment
        dist.init_process_group("gloo", timeout=timeout)
    elif owns_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same data and the same replicated layers on every rank

    V, D = args.vocab, args.dim
    widths = [V // world + (r < V % world) for r in range(world)]
    start = sum(widths[:rank])
    # each token is followed by one of 4 likely successors (a low-entropy chain)
    logits = torch.full((V, V), -8.0)
    logits[torch.arange(V)[:, None], torch.randint(0, V, (V, 4))] = 2.0
    transition = logits.softmax(dim=1)
    entropy = float(-(transition * transition.log()).sum(1).mean())

    embed = torch.nn.Embedding(V, D)                           # replicated
    layer = torch.nn.Linear(D, D)                              # replicated
    head = torch.nn.Parameter(torch.randn(V, D)[start:start + widths[rank]].clone() * D**-0.5)  # (V_k, D) shard
    params = [*embed.parameters(), *layer.parameters(), head]
    opt = torch.optim.Adam(params, lr=args.lr)
    data = torch.Generator().manual_seed(1)

    status = 0
    for step in range(args.steps):
        prev, nxt = markov_batch(transition, args.batch, data)
        hidden = torch.tanh(layer(embed(prev)))                 # (N, D), identical on every rank
        loss = vocab_parallel_linear_cross_entropy(hidden, head, nxt)
        if step == 0 and args.check:
            shards = [None] * world
            dist.all_gather_object(shards, head.detach())
            if rank == 0:
                ref = linear_cross_entropy(hidden.detach(), torch.cat(shards), nxt)
                ok = math.isclose(loss.item(), ref.item(), rel_tol=1e-5)
                print(f"check: sharded loss {loss.item():.6f}, unsharded {ref.item():.6f} "
                      f"({'agree' if ok else 'DISAGREE'})")
                status = 0 if ok else 1
        opt.zero_grad()
        loss.backward()                                         # grad of hidden is summed over the ranks
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}   (log V = {math.log(V):.3f}, chain entropy "
                  f"{entropy:.3f})")
    if rank == 0:
        print(f"{world} rank(s), output rows per rank {widths}")
    if owns_group:
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
