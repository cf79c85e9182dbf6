#!/usr/bin/env python3
"""Peer for `sos bench generate`: llama.cpp (through llama-cpp-python) on the same GGUF and the
same prompt token ids.

Per run: reset the context, time the prompt pass (`llm.eval(prompt_ids)`), then decode greedily
one token at a time (argmax of the last logits row read with `llama_get_logits_ith(ctx, -1)`),
EOS ignored. The timing matches sos's `generate`: the decode clock starts after the prompt pass
and covers picking `new_tokens` tokens, i.e. `new_tokens - 1` single-token evals (the last
picked token is not fed back). One warm-up run, then the median of `--runs`.

Extra buffer types: llama.cpp puts weights into "extra" CPU buffer types when it can (AMX on
Sapphire Rapids, repacked layouts for some quant types). On machines whose CPUID advertises AMX
but whose kernel/hypervisor does not actually grant the tile state (e.g. sandboxed VMs), the AMX
path dies with SIGILL. `--extra-bufts auto` (default) first runs a short probe in a child
process; if that dies, it loads the model with `use_extra_bufts = false`, so the plain ggml CPU
kernels run (for Q4_1, which llama.cpp does not repack, these are the kernels a build without
AMX runs). The JSON says which was used.

Prints one JSON object.
"""

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time

import numpy as np


def load_ids(arg: str):
    if os.path.isfile(arg):
        with open(arg) as f:
            text = f.read()
    else:
        text = arg
    v = json.loads(text)
    if isinstance(v, dict):  # the whole JSON line printed by `sos bench generate --json`
        v = v["prompt_ids"]
    ids = [int(i) for i in v]
    if not ids:
        sys.exit("empty prompt")
    return ids


def set_extra_bufts(enabled: bool):
    """Makes every Llama() built afterwards load with `use_extra_bufts = enabled`."""
    import llama_cpp.llama as L

    orig = L.llama_cpp.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = enabled
        return p

    L.llama_cpp.llama_model_default_params = params


def probe(model: str, ids, threads: int):
    """Loads the model and evaluates a few tokens in a child process; returns its exit status."""
    code = (
        "import sys, llama_cpp\n"
        "from llama_cpp import Llama\n"
        f"llm = Llama(model_path={model!r}, n_ctx=64, n_threads={threads}, n_threads_batch={threads}, verbose=False)\n"
        f"llm.eval({list(ids[:8])!r})\n"
        "llm.eval([1])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return r.returncode, r.stderr.strip()[-300:]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--prompt-ids", required=True, help="JSON list of token ids, or a file holding one "
                    "(or holding the JSON line of `sos bench generate --json`)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--extra-bufts", choices=["auto", "on", "off"], default="auto",
                    help="llama.cpp extra buffer types (AMX, repacking); auto: on unless a probe crashes")
    a = ap.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    prompt = load_ids(a.prompt_ids)
    if len(prompt) + a.new_tokens > a.n_ctx:
        sys.exit(f"prompt ({len(prompt)}) + new tokens ({a.new_tokens}) exceed n_ctx ({a.n_ctx})")

    extra, extra_note = a.extra_bufts != "off", None
    if a.extra_bufts == "auto":
        rc, err = probe(a.model, prompt, a.threads)
        if rc != 0:
            why = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
            extra_note = f"probe with extra buffer types {why}; loaded with use_extra_bufts=false"
            print(f"llamacpp_generate.py: {extra_note} {err}", file=sys.stderr)
            extra = False
    if not extra:
        set_extra_bufts(False)

    llm = Llama(
        model_path=a.model,
        n_ctx=a.n_ctx,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        verbose=False,
    )
    ctx = llm.ctx
    n_vocab = llm.n_vocab()

    def last_argmax() -> int:
        ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
        row = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
        return int(np.argmax(row))

    def run(n_new: int):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        out = []
        while len(out) < n_new:
            nxt = last_argmax()
            out.append(nxt)
            if len(out) == n_new:
                break
            llm.eval([nxt])
        t2 = time.perf_counter()
        return out, t1 - t0, t2 - t1

    run(a.new_tokens)  # warm-up (a full run: llama.cpp sizes its compute buffers lazily)
    tps, pps, tokens = [], [], None
    for _ in range(a.runs):
        out, p_s, g_s = run(a.new_tokens)
        pps.append(len(prompt) / p_s)
        tps.append(len(out) / g_s)
        if tokens is None:
            tokens = out
        elif tokens != out:
            print("warning: greedy output differs between runs", file=sys.stderr)

    print(json.dumps({
        "bench": "generate",
        "engine": "llama.cpp",
        "llama_cpp_python": llama_cpp.__version__,
        "use_extra_bufts": extra,
        "extra_bufts_note": extra_note,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "model": a.model,
        "threads": a.threads,
        "prompt_tokens": len(prompt),
        "new_tokens": a.new_tokens,
        "runs": a.runs,
        "tokens_per_second": statistics.median(tps),
        "prompt_tokens_per_second": statistics.median(pps),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_tokens": tokens[:16],
    }))


if __name__ == "__main__":
    main()
