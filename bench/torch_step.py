#!/usr/bin/env python3
"""Peer for `sos bench step`: PyTorch + transformers, f32, CPU.

One step = forward over `batch x seq` input embeddings, the output layer only on the last
`targets` positions before the final one of each sequence (positions seq-targets-1 .. seq-2,
each predicting the next id), mean cross-entropy, backward to the input embeddings (every
parameter frozen, so no weight gradients). One warm-up step, then the median of `--runs`:
`seconds_per_step`.

Also (unless --no-cached) the prefix-cached variant, the shape `sos bench step` reports as its
`seconds_per_step` since it learned prefix caching: positions before the soft ones
(0 .. seq-targets-soft-2) are a fixed prompt run once, without gradients, into a KV cache; each
step runs forward and backward over the remaining positions only: `seconds_per_step_cached`.

The model is the same GGUF, dequantized to f32 by transformers (`gguf_file=`); loading is not
timed. If transformers cannot load it, a random-init LlamaForCausalLM with the same sizes is used
instead (step time does not depend on the weight values) and the JSON says
`"weights": "random-init"` with the reason.

Prints one JSON object.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time


def vm_hwm_mib():
    """Peak resident memory so far (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_hwm():
    """Resets VmHWM to the current RSS (Linux `clear_refs` 5); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def random_init_model(torch):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        hidden_act="silu",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.float32)


def load_model(torch, path, random_init=False, kw=None):
    """The GGUF at `path` dequantized to f32 by transformers, or random-init weights of the same
    shape if that fails (or `random_init`). Returns (model, weights label, load error or None)."""
    kw = kw or {}
    weights, load_error = "gguf-dequantized-f32", None
    model = None
    if path and not random_init:
        try:
            from transformers import AutoModelForCausalLM

            d, name = os.path.split(os.path.abspath(path))
            try:
                model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32, **kw)
            except TypeError:  # transformers < 4.56 calls it torch_dtype
                model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, torch_dtype=torch.float32, **kw)
        except Exception as e:  # noqa: BLE001 - any failure means: fall back, and say why
            load_error = f"{type(e).__name__}: {e}"[:500]
            print(f"transformers could not load the GGUF ({load_error}); using random-init weights",
                  file=sys.stderr)
    if model is None:
        weights = "random-init"
        model = random_init_model(torch)
        if kw.get("attn_implementation"):
            model.config._attn_implementation = kw["attn_implementation"]
    return model, weights, load_error


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file (omit, or pass --random-init, for random weights)")
    ap.add_argument("--random-init", action="store_true", help="skip the GGUF, use random weights")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--soft", type=int, default=8, help="trigger positions whose gradient is read")
    ap.add_argument("--targets", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-cached", action="store_true", help="skip the prefix-cached variant")
    ap.add_argument("--attn", default=None, help="attn_implementation (default: transformers' choice)")
    a = ap.parse_args()
    if not (a.soft + a.targets < a.seq):
        sys.exit("--soft + --targets must be less than --seq")

    import torch
    import torch.nn.functional as F
    import transformers

    torch.set_num_threads(a.threads)
    kw = {"attn_implementation": a.attn} if a.attn else {}

    t_load = time.perf_counter()
    model, weights, load_error = load_model(torch, a.model, a.random_init, kw)
    load_seconds = time.perf_counter() - t_load

    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    if dtypes != ["torch.float32"]:
        sys.exit(f"expected f32 parameters, got {dtypes}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hwm_reset = reset_hwm()

    torch.manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.seq))
    embed = model.get_input_embeddings()
    x = embed(ids).detach().clone().requires_grad_(True)
    lo, hi = a.seq - a.targets - 1, a.seq - 1  # loss positions lo..hi-1, predicting ids[lo+1..hi]
    tgt = ids[:, lo + 1: hi + 1].reshape(-1)
    soft_start = lo - a.soft

    def step():
        t = time.perf_counter()
        x.grad = None
        h = model.model(inputs_embeds=x, use_cache=False).last_hidden_state
        h_sel = h[:, lo:hi, :].reshape(-1, h.shape[-1])
        logits = model.lm_head(h_sel)
        loss = F.cross_entropy(logits, tgt)
        loss.backward()
        g = x.grad[:, soft_start: soft_start + a.soft]
        _ = float(g.square().sum())
        return time.perf_counter() - t, float(loss.detach())

    with torch.enable_grad():
        step()  # warm-up
        res = [step() for _ in range(a.runs)]
    times = [r[0] for r in res]
    s = statistics.median(times)
    g_full = x.grad[:, soft_start: soft_start + a.soft].detach().clone()

    # Prefix-cached step (the attack's real shape): positions before the soft ones are a fixed
    # prompt, run once without gradients into a KV cache; each step runs forward and backward over
    # the positions from the soft ones on, attending to that cache. The cache is copied before the
    # clock starts (the step appends to it).
    cached = None
    if not a.no_cached:
        import copy

        t = time.perf_counter()
        import inspect

        # transformers >= 5.x calls the cache argument `cache` (`past_key_values` is deprecated).
        cache_kw = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
        with torch.no_grad():
            o = model.model(inputs_embeds=x[:, :soft_start].detach(), use_cache=True)
            prefix = getattr(o, "cache", None) or getattr(o, "past_key_values")
        prefix_seconds = time.perf_counter() - t
        x_tail = x[:, soft_start:].detach().clone().requires_grad_(True)
        lo_t, hi_t = lo - soft_start, hi - soft_start

        def step_cached():
            pkv = copy.deepcopy(prefix)
            t = time.perf_counter()
            x_tail.grad = None
            h = model.model(inputs_embeds=x_tail, use_cache=True, **{cache_kw: pkv}).last_hidden_state
            h_sel = h[:, lo_t:hi_t, :].reshape(-1, h.shape[-1])
            loss = F.cross_entropy(model.lm_head(h_sel), tgt)
            loss.backward()
            g = x_tail.grad[:, : a.soft]
            _ = float(g.square().sum())
            return time.perf_counter() - t, float(loss.detach())

        with torch.enable_grad():
            step_cached()  # warm-up
            res_c = [step_cached() for _ in range(a.runs)]
        g_c = x_tail.grad[:, : a.soft]
        cached = {
            "seconds_per_step_cached": statistics.median([r[0] for r in res_c]),
            "prefix_seconds": prefix_seconds,
            "loss_cached": res_c[-1][1],
            # Sanity check: the cached step must give the full step's loss and gradient.
            "cached_vs_full_max_abs_grad_diff": float((g_c - g_full).abs().max()),
            "grad_max_abs": float(g_full.abs().max()),
        }

    out = {
        "bench": "step",
        "engine": "pytorch",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "weights": weights,
        "model": a.model,
        "threads": torch.get_num_threads(),
        "batch": a.batch,
        "seq": a.seq,
        "soft": a.soft,
        "targets": a.targets,
        "runs": a.runs,
        "seconds_per_step": s,
        "tokens_per_second": a.batch * a.seq / s,
        "loss": res[-1][1],
        **(cached or {}),
        "load_seconds": load_seconds,
        # Whole-process peak (load included), as sos reports it.
        "peak_rss_mib": max(peak_load, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        # Peak while building the batch and stepping (after the model was loaded).
        "peak_rss_steps_mib": vm_hwm_mib() if hwm_reset else None,
    }
    if load_error:
        out["gguf_load_error"] = load_error
    print(json.dumps(out))


if __name__ == "__main__":
    main()
