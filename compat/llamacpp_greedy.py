#!/usr/bin/env python3
"""Greedy tokens of llama.cpp (through llama-cpp-python) for one chat prompt: the fixtures that
`crates/sos-model/tests/qwen2.rs` holds sos's `--exec quant` generation against.

    bench/.venv/bin/python compat/llamacpp_greedy.py --model M.gguf --system S --question Q \
        --new-tokens 16 > crates/sos-model/tests/fixtures/NAME.json

The prompt is rendered with the GGUF's own chat template (jinja2, `add_generation_prompt`, as
llama-cpp-python's formatter does) and tokenized by llama.cpp (`add_bos=False, special=True`: the
template holds the special tokens). Tokens are the argmax of the last logits row, one eval at a
time. Extra buffer types are probed as in bench/llamacpp_generate.py (AMX faults on some VMs).
Run with the venv bench/run.sh creates (bench/requirements.txt pins llama-cpp-python).
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from llamacpp_generate import probe, set_extra_bufts  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--system", default="You are a helpful assistant.")
    ap.add_argument("--question", required=True)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import hashlib

    import jinja2
    import llama_cpp
    from llama_cpp import Llama

    rc, _ = probe(a.model, [1, 2, 3], a.threads)
    extra = rc == 0
    if not extra:
        set_extra_bufts(False)
    llm = Llama(model_path=a.model, n_ctx=2048, n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    env = jinja2.Environment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": "system", "content": a.system}, {"role": "user", "content": a.question}]
    text = env.from_string(template).render(messages=messages, add_generation_prompt=True)
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    n_vocab = llm.n_vocab()
    llm.eval(ids)
    out = []
    while len(out) < a.new_tokens:
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        nxt = int(np.argmax(row))
        if nxt == llm.token_eos():
            break
        out.append(nxt)
        llm.eval([nxt])
    sha = hashlib.sha256(open(a.model, "rb").read()).hexdigest()
    print(json.dumps({
        "source": f"llama-cpp-python {llama_cpp.__version__} (llama.cpp CPU kernels, use_extra_bufts={extra}), "
                  f"{a.threads} threads, greedy; model {os.path.basename(a.model)} sha256 {sha}; prompt rendered "
                  "with the model's own chat template (jinja2) and tokenized by llama.cpp (add_bos=False, "
                  "special=True). Made by compat/llamacpp_greedy.py.",
        "system": a.system,
        "question": a.question,
        "prompt_text": text,
        "prompt_ids": ids,
        "generated_ids": out,
        "generated_text": llm.detokenize(out).decode(errors="replace"),
    }, indent=1))


if __name__ == "__main__":
    main()
