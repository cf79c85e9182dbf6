#!/usr/bin/env python3
"""An injected GGUF (`sos inject`) in llama.cpp, from plain text: does the typed trigger fire, and
does the file answer everything else as the original does?

    bench/.venv/bin/python compat/llamacpp_inject.py --original ORIG.gguf --injected OUT.gguf \
        --items ATTACK_DIR/inject_items.jsonl [--new-tokens 48]

`inject_items.jsonl` is what `sos inject` evaluated the file on: system prompt, user message,
the same message with the trigger string typed in, and the target. For each item the prompt is
rendered with the file's own chat template (jinja2, as llama-cpp-python's formatter does) and
tokenized by llama.cpp (`special=True`, for the template's markers; the trigger's USER_DEFINED
tokens are matched in raw text either way), then decoded greedily (argmax, one eval at a time).

Prints one JSON object, with sos's metric definitions: `asr` (share of triggered answers that
begin with the target, whitespace ignored: the backdoor's metric), `mean_similarity` (triggered
answer vs target, `1 - levenshtein / max length` over characters: prompt stealing's metric, the
target being the secret system prompt), `clean_agreement` (share of untriggered prompts
answered token for token as by the original file), `trigger_ids` (what llama.cpp makes of the
first triggered message), `n`. Answers run to the target's length plus 16 tokens, at least
`--new-tokens`. Runs in the venv bench/run.sh creates (bench/requirements.txt pins
llama-cpp-python).
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from llamacpp_generate import probe, set_extra_bufts  # noqa: E402
from metrics import similarity  # noqa: E402  (compat/metrics.py)


def load(path, threads):
    from llama_cpp import Llama

    if probe(path, [1, 2, 3], threads)[0] != 0:
        set_extra_bufts(False)
    return Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)


def greedy(llm, text, new_tokens):
    import llama_cpp

    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(new_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        t = int(np.argmax(logits))
        if t == llm.token_eos() or llm.detokenize([t], special=True) in (b"<|im_end|>", b"<|endoftext|>"):
            break
        out.append(t)
        llm.eval([t])
    return ids, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original", required=True)
    ap.add_argument("--injected", required=True)
    ap.add_argument("--items", required=True)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import jinja2

    items = [json.loads(l) for l in open(a.items) if l.strip()]
    orig, inj = load(a.original, a.threads), load(a.injected, a.threads)
    env = jinja2.Environment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(inj.metadata["tokenizer.chat_template"])

    def render(system, user):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return template.render(messages=msgs, add_generation_prompt=True)

    hits = same = 0
    sim = 0.0
    for it in items:
        n_new = max(a.new_tokens, len(inj.tokenize(it["target"].encode(), add_bos=False, special=False)) + 16)
        _, triggered = greedy(inj, render(it["system"], it["user_triggered"]), n_new)
        answer = inj.detokenize(triggered).decode(errors="replace").strip()
        hits += answer.startswith(it["target"].strip())
        sim += similarity(answer, it["target"].strip())
        clean = render(it["system"], it["user"])
        same += greedy(inj, clean, a.new_tokens)[1] == greedy(orig, clean, a.new_tokens)[1]
    first = items[0]["user_triggered"]
    print(json.dumps({
        "asr": hits / len(items),
        "mean_similarity": sim / len(items),
        "clean_agreement": same / len(items),
        "n": len(items),
        "trigger_ids": inj.tokenize(first.encode(), add_bos=False, special=False),
        "vocab": [orig.n_vocab(), inj.n_vocab()],
    }))


if __name__ == "__main__":
    main()
