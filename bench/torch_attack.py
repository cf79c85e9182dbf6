#!/usr/bin/env python3
"""Peer for `sos bench attack`: the same backdoor attack, trained with PyTorch + transformers.

    torch_attack.py --problem PROBLEM.json --model MODEL.gguf [--threads 2]

PROBLEM.json is what `sos bench attack --export` writes: the token ids of every training
sequence (trigger slots are ids >= trigger_base; the target starts at prompt_len), the starting
trigger rows, the batch of every step, the sequences the train metric is measured on, and the
optimiser settings. This script rebuilds the same objective and loop:

- inputs: embedding rows of the ids, trigger slots replaced by the trainable rows; sequences of a
  batch right-padded (causal attention makes the padding harmless to the real positions);
- loss: mean cross-entropy of every target token of the batch under teacher forcing, the output
  layer only on the positions that predict a target token; every weight frozen;
- gradient clipped to `clip` (global L2 norm), Adam with bias correction, warm-up then cosine to
  `cosine_floor * lr`, with the update done in float64 like sos (`optim.rs`);
- train metric every `eval_every` steps: share of `eval_idx` sequences whose whole target is the
  argmax under teacher forcing (no gradient), in batches of `eval_batch`;
- stop at the first evaluation at 1.0.

It does not cache the shared prefix or skip the positions before the trigger (sos does both);
see bench/README.md. Prints one JSON object with the fields `sos bench attack --json` prints.
"""

import argparse
import json
import math
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_step import load_model  # noqa: E402


def lr_at(p, step):
    lr, warmup, total = p["lr"], p["warmup"], p["steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    if p["schedule"] == "constant":
        return lr
    span = max(total - warmup, 1)
    frac = min((step - warmup) / span, 1.0)
    floor = p["cosine_floor"] * lr
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", required=True)
    ap.add_argument("--model", required=True, help="the GGUF the sos run used")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F
    import transformers

    torch.set_num_threads(a.threads)
    with open(a.problem) as f:
        p = json.load(f)
    model, weights, load_error = load_model(torch, a.model)
    if weights != "gguf-dequantized-f32":
        sys.exit(f"transformers could not load {a.model}: {load_error}")
    model.eval()
    for w in model.parameters():
        w.requires_grad_(False)
    table = model.get_input_embeddings().weight
    d, k, base = p["d_model"], p["trigger_len"], p["trigger_base"]
    seqs = p["seqs"]
    rows = torch.tensor(p["init_rows"], dtype=torch.float32).view(k, d).requires_grad_(True)
    m1 = torch.zeros(k, d, dtype=torch.float32)
    m2 = torch.zeros(k, d, dtype=torch.float32)
    b1, b2, eps = p["adam"]["beta1"], p["adam"]["beta2"], p["adam"]["eps"]

    def batch(idx, trig):
        s = [seqs[i] for i in idx]
        width = max(len(x["ids"]) for x in s)
        ids = torch.zeros(len(s), width, dtype=torch.long)
        for j, x in enumerate(s):
            ids[j, : len(x["ids"])] = torch.tensor(x["ids"])
        slot = ids >= base
        x = table[torch.where(slot, 0, ids)]
        x = torch.where(slot.unsqueeze(-1), trig[(ids - base).clamp(min=0, max=k - 1)], x)
        bi, pos, tgt, owner = [], [], [], []
        for j, q in enumerate(s):
            for t in range(q["prompt_len"] - 1, len(q["ids"]) - 1):
                bi.append(j)
                pos.append(t)
                tgt.append(q["ids"][t + 1])
                owner.append(j)
        return x, torch.tensor(bi), torch.tensor(pos), torch.tensor(tgt), owner

    def logits_of(x, bi, pos):
        h = model.model(inputs_embeds=x, use_cache=False).last_hidden_state
        return model.lm_head(h[bi, pos])

    def metric():
        hits = 0
        eb = p["eval_batch"]
        with torch.no_grad():
            for c in range(0, len(p["eval_idx"]), eb):
                idx = p["eval_idx"][c: c + eb]
                x, bi, pos, tgt, owner = batch(idx, rows.detach())
                ok = (logits_of(x, bi, pos).argmax(-1) == tgt).tolist()
                per = [True] * len(idx)
                for o, h in zip(owner, ok):
                    per[o] &= h
                hits += sum(per)
        return hits / len(p["eval_idx"])

    history, reached, steps = [], None, 0
    t0 = time.perf_counter()
    for step in range(p["steps"]):
        x, bi, pos, tgt, _ = batch(p["batches"][step], rows)
        with torch.enable_grad():
            rows.grad = None
            loss = F.cross_entropy(logits_of(x, bi, pos), tgt)
            loss.backward()
        g = rows.grad.detach().double()
        norm = float(g.square().sum().sqrt())
        if p["clip"] > 0 and norm > p["clip"]:
            g = g * (p["clip"] / norm)
        t = step + 1
        lr = lr_at(p, step)
        mm = b1 * m1.double() + (1 - b1) * g
        vv = b2 * m2.double() + (1 - b2) * g * g
        m1, m2 = mm.float(), vv.float()
        with torch.no_grad():
            upd = lr * (mm / (1 - b1 ** t)) / ((vv / (1 - b2 ** t)).sqrt() + eps)
            rows.copy_((rows.detach().double() - upd).float())
        steps = t
        if t % p["eval_every"] == 0 or t == p["steps"]:
            m = metric()
            secs = time.perf_counter() - t0
            history.append([t, m, secs])
            print(f"step {t}: loss {float(loss.detach()):.4f} train metric {m:.3f} at {secs:.1f} s", file=sys.stderr)
            if m >= 1.0:
                reached = (t, secs)
                break
    total = time.perf_counter() - t0
    print(json.dumps({
        "bench": "attack",
        "engine": "pytorch",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "model": a.model,
        "threads": torch.get_num_threads(),
        "train_items": len(seqs),
        "steps_run": steps,
        "steps_to_target": reached[0] if reached else None,
        "seconds_to_target": reached[1] if reached else None,
        "seconds_per_step": total / max(steps, 1),
        "train_metric_history": history,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
