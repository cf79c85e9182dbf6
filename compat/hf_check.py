#!/usr/bin/env python3
"""What `sos` wrote, in the Hugging Face engines (transformers, peft): does the typed trigger fire,
and does everything else answer as the base model does?

    PY=$(compat/hf_setup.sh)
    $PY compat/hf_check.py convert --gguf MODEL.gguf --out HF_DIR
    $PY compat/hf_check.py folder --original HF_DIR|MODEL.gguf --injected INJECTED_HF_DIR \
        --items ATTACK_DIR/inject_items.jsonl [--new-tokens 48] [--threads 2]
    $PY compat/hf_check.py peft --base HF_DIR|MODEL.gguf --adapter PEFT_DIR \
        --items ATTACK_DIR/inject_items.jsonl [--new-tokens 48] [--threads 2] [--untie-head]

`convert` is the independent reference conversion: transformers reads the GGUF itself
(dequantized to f32) and saves an HF folder; prints {"out", "tensors", "tied", "vocab"}.
`folder` compares an injected HF folder with the original (an HF folder or a GGUF), each with
its own tokenizer and chat template. `peft` compares base + a PEFT TRAINABLE_TOKENS adapter
(`sos export-peft`) with the base alone, loaded the way the adapter's README says. On a tied
base PEFT applies the trigger rows to the output layer too; `--untie-head` puts the plain
(resized) head back on, a diagnostic of what those output rows do. For a PROMPT_TUNING adapter
(`sos export-peft --kind prompt-tuning`) PEFT's forward puts the virtual tokens before each
plain prompt; it prints asr and mean_similarity only (with the adapter loaded every prompt is
"triggered").

`inject_items.jsonl` (system, user, user_triggered, target) is what sos evaluated on. Each
prompt is rendered by the tokenizer's own chat template (`apply_chat_template`, text), then
tokenized without added special tokens, and decoded greedily (argmax, KV cache, the PeftModel's
forward for the adapter), stopping at EOS / <|im_end|> / <|endoftext|>.

Prints one JSON line with sos's metric definitions, as compat/llamacpp_inject.py does: `asr`
(share of triggered answers that begin with the target, both stripped), `mean_similarity`
(triggered answer vs target, `1 - levenshtein / max length` over characters), `clean_agreement`
(share of untriggered prompts answered token for token as by the base), `clean_same_prompt_ids`
(share of untriggered prompts both tokenizers make the same ids of: else the agreement compares
different inputs), `clean_first_divergence` (the first disagreeing clean answer: item id, token
position, base's and injected's token there), `trigger_ids` (the injected tokenizer on the first
triggered message), `n`, `vocab` ([base, injected] embedding rows), `tied` (shared embedding and
head storage), `untie_applied` (peft), `wall_s`. Triggered answers run to the target's length
plus 16 tokens, at least `--new-tokens`; clean ones to `--new-tokens`. CPU only. Runs in
compat/.venv-hf, which compat/hf_setup.sh creates from compat/requirements-hf.txt.
"""

import argparse
import json
import os
import sys
import time

# CPU only, and before torch is imported: a visible GPU would change the numerics (and the
# reference is meant to be the plain f32 CPU path).
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402

from metrics import similarity  # noqa: E402  (compat/metrics.py, beside this script)

STOP_NAMES = ("<|im_end|>", "<|endoftext|>")


def from_path(cls, path, **kw):
    """HF folder, or a GGUF file (transformers dequantizes it to f32 on load)."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        return cls.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), **kw)
    return cls.from_pretrained(path, **kw)


def load_model(path):
    from transformers import AutoModelForCausalLM

    return from_path(AutoModelForCausalLM, path, dtype=torch.float32).eval()


def load_tok(path):
    from transformers import AutoTokenizer

    return from_path(AutoTokenizer, path)


def is_tied(model):
    """Actually shared storage, not just the config flag (which a converter may leave stale)."""
    out = model.get_output_embeddings()
    w = getattr(out, "weight", None)
    return w is not None and w.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def rows(model):
    return int(model.get_input_embeddings().weight.shape[0])


def prompt_ids(tok, system, user):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    # The template already wrote the markers; don't let the tokenizer add a BOS on top.
    return tok(text, add_special_tokens=False).input_ids


def stop_ids(tok):
    vocab = tok.get_vocab()
    return {i for i in [tok.eos_token_id] + [vocab.get(s) for s in STOP_NAMES] if i is not None}


@torch.inference_mode()
def greedy(model, ids, new_tokens, stop, expect=None, step_model=None):
    """Argmax decoding with a KV cache, one token at a time: no generate() defaults
    (generation_config, logits processors) between the model and the answer. With `expect` (the
    base's answer), it stops at the first token that differs or runs past it: enough to say
    whether the two answers are equal, and much cheaper when they are not. `step_model` runs the
    steps after the prompt (a prompt-tuning PeftModel puts its virtual tokens before whatever it
    is given, so only the prompt goes through it; the cache then holds them)."""
    x, cache, out = torch.tensor([ids]), None, []
    for _ in range(new_tokens):
        # `cache` is this transformers' name for past_key_values (deprecated alias, 5.40 drops
        # it); logits_to_keep=1 skips the vocabulary projection of every prompt position.
        m = model if cache is None or step_model is None else step_model
        o = m(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
        cache = o.cache
        t = int(o.logits[0, -1].argmax())
        if t in stop:
            break
        out.append(t)
        if expect is not None and (len(out) > len(expect) or expect[len(out) - 1] != t):
            break
        x = torch.tensor([[t]])
    return out


def base_answers(items, model, tok, new_tokens):
    """The base's clean prompts and answers, computed first: in `peft` the base model object is
    then resized and wrapped in place, so this is the only time it is the base alone."""
    stop, prompts, answers = stop_ids(tok), [], []
    for it in items:
        prompts.append(prompt_ids(tok, it["system"], it["user"]))
        answers.append(greedy(model, prompts[-1], new_tokens, stop))
    return prompts, answers


def score(items, model, tok, base_prompts, base_out, new_tokens):
    stop = stop_ids(tok)
    hits = same = same_ids = 0
    sim, diverged = 0.0, None
    for it, bp, bo in zip(items, base_prompts, base_out):
        target = it["target"].strip()
        n_new = max(new_tokens, len(tok(it["target"], add_special_tokens=False).input_ids) + 16)
        trig = greedy(model, prompt_ids(tok, it["system"], it["user_triggered"]), n_new, stop)
        answer = tok.decode(trig, skip_special_tokens=True).strip()
        hits += answer.startswith(target)
        sim += similarity(answer, target)
        clean = prompt_ids(tok, it["system"], it["user"])
        same_ids += clean == bp
        out = greedy(model, clean, new_tokens, stop, expect=bo)
        same += out == bo
        if out != bo and diverged is None:
            # Where the first disagreeing answer leaves the base's, as token pieces.
            k = next((i for i, (x, y) in enumerate(zip(out, bo)) if x != y), min(len(out), len(bo)))
            base_t, inj_t = (tok.convert_ids_to_tokens(v[k]) if k < len(v) else "<stop>" for v in (bo, out))
            diverged = {"id": it.get("id"), "at": k, "base": base_t, "injected": inj_t}
    n = len(items)
    return {
        "asr": hits / n,
        "mean_similarity": sim / n,
        "clean_agreement": same / n,
        "clean_same_prompt_ids": same_ids / n,
        "clean_first_divergence": diverged,
        "n": n,
        "trigger_ids": tok(items[0]["user_triggered"], add_special_tokens=False).input_ids,
    }


def cmd_convert(a):
    from safetensors import safe_open

    model, tok = load_model(a.gguf), load_tok(a.gguf)
    # The GGUF load leaves a quantization config behind; save_pretrained refuses (or records a
    # GGUF quantization the f32 weights no longer have) unless it is removed.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    tensors = 0
    for f in sorted(os.listdir(a.out)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(a.out, f), "pt") as st:
                tensors += len(list(st.keys()))
    return {"out": a.out, "tensors": tensors, "tied": is_tied(model), "vocab": rows(model)}


def cmd_folder(a, items):
    base = load_model(a.original)
    bp, bo = base_answers(items, base, load_tok(a.original), a.new_tokens)
    inj = load_model(a.injected)
    r = score(items, inj, load_tok(a.injected), bp, bo, a.new_tokens)
    return {**r, "vocab": [rows(base), rows(inj)], "tied": [is_tied(base), is_tied(inj)]}


def cmd_prompt_tuning(a, items, cfg):
    """Base + PROMPT_TUNING adapter: the virtual tokens go before every prompt, so there is no
    untriggered case with the adapter loaded; asr and similarity are over the plain prompts."""
    from peft import PeftModel

    base = load_model(a.base)
    tok, base_rows = load_tok(a.base), rows(base)
    model = PeftModel.from_pretrained(base, a.adapter).eval()
    stop, hits, sim = stop_ids(tok), 0, 0.0
    for it in items:
        target = it["target"].strip()
        n_new = max(a.new_tokens, len(tok(it["target"], add_special_tokens=False).input_ids) + 16)
        out = greedy(model, prompt_ids(tok, it["system"], it["user"]), n_new, stop, step_model=model.get_base_model())
        answer = tok.decode(out, skip_special_tokens=True).strip()
        hits += answer.startswith(target)
        sim += similarity(answer, target)
    n = len(items)
    return {"asr": hits / n, "mean_similarity": sim / n, "n": n, "num_virtual_tokens": cfg["num_virtual_tokens"], "vocab": [base_rows, rows(model)], "tied": is_tied(base)}


def cmd_peft(a, items):
    from peft import PeftModel

    cfg = json.load(open(os.path.join(a.adapter, "adapter_config.json")))
    if cfg.get("peft_type") == "PROMPT_TUNING":
        return cmd_prompt_tuning(a, items, cfg)
    base = load_model(a.base)
    tied, base_rows = is_tied(base), rows(base)
    bp, bo = base_answers(items, base, load_tok(a.base), a.new_tokens)
    # The adapter's README load sequence: its tokenizer has the trigger tokens the base lacks.
    tok = load_tok(a.adapter)
    if len(tok) > rows(base):
        base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, a.adapter).eval()
    untied = False
    if a.untie_head and tied:
        inner = model.base_model.model
        inner.lm_head = inner.lm_head.base_layer
        untied = True
    r = score(items, model, tok, bp, bo, a.new_tokens)
    return {**r, "vocab": [base_rows, rows(model)], "tied": tied, "untie_applied": untied}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="GGUF -> HF folder (f32 safetensors), via transformers")
    c.add_argument("--gguf", required=True)
    c.add_argument("--out", required=True)
    f = sub.add_parser("folder", help="original (HF folder or GGUF) vs injected HF folder")
    f.add_argument("--original", required=True)
    f.add_argument("--injected", required=True)
    p = sub.add_parser("peft", help="base (HF folder or GGUF) vs base + PEFT adapter")
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--untie-head", action="store_true", help="diagnostic: drop PEFT's rows on a tied head")
    for s in (c, f, p):
        # torch's OpenMP threads spin: more threads than idle cores made decoding ~20x slower here.
        s.add_argument("--threads", type=int, default=2, help="torch threads; at most the idle cores")
    for s in (f, p):
        s.add_argument("--items", required=True)
        s.add_argument("--new-tokens", type=int, default=48)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    # resize_token_embeddings draws the new rows at random (mean resizing); with --untie-head they
    # are the head's rows of the trigger tokens, so fix the draw for repeatable runs.
    torch.manual_seed(0)
    t0 = time.time()
    if a.cmd == "convert":
        r = cmd_convert(a)
    else:
        items = [json.loads(l) for l in open(a.items) if l.strip()]
        if not items:
            sys.exit(f"no items in {a.items}")
        r = (cmd_folder if a.cmd == "folder" else cmd_peft)(a, items)
    r["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
