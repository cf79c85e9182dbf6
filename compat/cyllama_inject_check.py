#!/usr/bin/env python3
"""llama.cpp's view of an injected GGUF, through the ready-built `cyllama` wheel (no compiler):
the test `crates/sos-dist/tests/llamacpp.rs` runs it in CI on tiny models it builds.

    python compat/cyllama_inject_check.py --original A.gguf --injected B.gguf --typed TEXT \
        --prompt TEXT [--new-tokens 8]

Loads both files (llama.cpp's own loader: a file that breaks its rules fails here), tokenizes
`--typed` in the injected file without parsing special tokens (USER_DEFINED tokens are still
matched in raw text), and decodes `--prompt` greedily in both files. Prints one JSON object:
`n_vocab` of both, `typed_ids`, and the greedy `tokens` of each.
"""

import argparse
import json


def greedy(cy, path, prompt, new_tokens):
    params = cy.LlamaModelParams()
    params.n_gpu_layers = 0
    model = cy.LlamaModel(path, params)
    vocab = model.get_vocab()
    ids = vocab.tokenize(prompt, add_special=False, parse_special=True)
    cparams = cy.LlamaContextParams()
    cparams.n_ctx = len(ids) + new_tokens + 8
    cparams.n_batch = len(ids)
    ctx = cy.LlamaContext(model, cparams)
    sampler = cy.LlamaSampler(cy.LlamaSamplerChainParams())
    sampler.add_greedy()
    batch, pos, out = cy.llama_batch_get_one(ids), len(ids), []
    for _ in range(new_tokens):
        ctx.decode(batch)
        t = sampler.sample(ctx, -1)
        out.append(t)
        batch = cy.llama_batch_get_one([t], pos)
        pos += 1
    return model, vocab, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original", required=True)
    ap.add_argument("--injected", required=True)
    ap.add_argument("--typed", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--new-tokens", type=int, default=8)
    a = ap.parse_args()

    import cyllama.llama.llama_cpp as cy

    cy.ggml_backend_load_all()
    _, v0, t0 = greedy(cy, a.original, a.prompt, a.new_tokens)
    _, v1, t1 = greedy(cy, a.injected, a.prompt, a.new_tokens)
    print(json.dumps({
        "n_vocab": [v0.n_vocab, v1.n_vocab],
        "typed_ids": list(v1.tokenize(a.typed, add_special=False, parse_special=False)),
        "tokens": [t0, t1],
    }))


if __name__ == "__main__":
    main()
