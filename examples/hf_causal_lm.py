"""Train a tiny random Llama with softgrad's fused head: Hugging Face transformers, no download.

``softgrad.torch.integrations.transformers.apply(model)`` makes the model's training loss
``linear_cross_entropy`` of the final hidden states and the ``lm_head`` weight, so the
``(tokens, vocabulary)`` logits are never formed; in training with ``labels`` the output's
``logits`` is None. This script checks the first loss against the unpatched model, then runs a
few AdamW steps with gradient accumulation (``num_items_in_batch``, as ``Trainer`` passes it)
on one repeated batch, so the loss falls.

    python examples/hf_causal_lm.py --steps 20

Needs ``pip install "softgrad[torch,transformers]"``. Runs on CPU in seconds.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from softgrad.torch.integrations import transformers as sg_hf


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary size")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).train()
    stock = copy.deepcopy(model)
    sg_hf.apply(model)

    # micro-batches of token ids; the first 8 tokens of each row are a prompt: no loss there
    micro = [torch.randint(0, args.vocab, (4, 64)) for _ in range(args.accumulate)]
    labels = [ids.clone() for ids in micro]
    for lab in labels:
        lab[:, :8] = -100
    # tokens that count over the whole step (labels are shifted: position i predicts i + 1)
    num_items = sum(int((lab[:, 1:] != -100).sum()) for lab in labels)

    out = model(micro[0], labels=labels[0])
    ref = stock(micro[0], labels=labels[0])
    assert out.logits is None and ref.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    print(f"first loss {out.loss.item():.6f} (transformers: {ref.loss.item():.6f}); logits: {out.logits}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(args.steps):
        total = 0.0
        for ids, lab in zip(micro, labels):
            loss = model(ids, labels=lab, num_items_in_batch=num_items, use_cache=False).loss
            loss.backward()  # sum of token losses / num_items: the micro-batches add up to the step's mean
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
        print(f"step {step + 1:3d}  loss {total:.4f}")

    model.eval()  # evaluation and generation are transformers' own: logits as usual
    prompt = micro[0][:1, :8]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                               pad_token_id=0)
    print("generated", generated[0, 8:].tolist())
    return losses


if __name__ == "__main__":
    main()
