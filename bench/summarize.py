#!/usr/bin/env python3
"""Reads the JSON files written by run.sh and prints a table and, last, one JSON line with ratios.

    summarize.py RESULTS_DIR

RESULTS_DIR holds meta.json and one folder per repeat (r1, r2, ...), each with one JSON file per
measurement (a flat folder of measurement files works too). With several repeats, every number
is the median over repeats, and every ratio is the median of the per-repeat ratios (ours and the
peer were measured back to back in each repeat, so each ratio compares like conditions).
"""

import glob
import json
import os
import statistics
import sys

NAMES = ("sos_generate_quant", "sos_generate_f32", "llamacpp_generate", "sos_step", "torch_step", "sos_attack",
         "torch_attack")


def load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.loads(f.read())


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def metrics(r):
    """Per-repeat numbers from one repeat's measurement objects (None where missing)."""
    sq, sf, lc, ss, ts, sa, ta = (r.get(n) for n in NAMES)
    g = lambda o, k: o.get(k) if o else None  # noqa: E731
    m = {
        "sos_tps": g(sq, "tokens_per_second"), "sos_pps": g(sq, "prompt_tokens_per_second"),
        "sos_gen_rss": g(sq, "peak_rss_mib"),
        "sos_f32_tps": g(sf, "tokens_per_second"), "sos_f32_pps": g(sf, "prompt_tokens_per_second"),
        "sos_f32_rss": g(sf, "peak_rss_mib"),
        "lc_tps": g(lc, "tokens_per_second"), "lc_pps": g(lc, "prompt_tokens_per_second"),
        "lc_rss": g(lc, "peak_rss_mib"),
        # sos prints the prefix-cached step as `seconds_per_step` and the full one as
        # `seconds_per_step_full`; builds from before prefix caching print only the full one.
        "sos_full": ss and ss.get("seconds_per_step_full", ss["seconds_per_step"]),
        "sos_cached": ss["seconds_per_step"] if ss and "seconds_per_step_full" in ss else None,
        "sos_step_rss": g(ss, "peak_rss_mib"),
        "torch_full": g(ts, "seconds_per_step"), "torch_cached": g(ts, "seconds_per_step_cached"),
        "torch_rss": g(ts, "peak_rss_mib"),
        # Time (s) and steps until the train metric first reached 1.0, and mean seconds per step.
        "sos_att": g(sa, "seconds_to_target"), "torch_att": g(ta, "seconds_to_target"),
        "sos_att_steps": g(sa, "steps_to_target"), "torch_att_steps": g(ta, "steps_to_target"),
        "sos_att_sps": g(sa, "seconds_per_step"), "torch_att_sps": g(ta, "seconds_per_step"),
        "sos_att_rss": g(sa, "peak_rss_mib"), "torch_att_rss": g(ta, "peak_rss_mib"),
    }
    div = lambda a, b: a / b if a is not None and b else None  # noqa: E731
    m["generate_ratio"] = div(m["sos_tps"], m["lc_tps"])
    m["generate_f32_ratio"] = div(m["sos_f32_tps"], m["lc_tps"])
    m["prompt_ratio"] = div(m["sos_pps"], m["lc_pps"])
    m["step_ratio"] = div(m["sos_full"], m["torch_full"])
    m["step_ratio_cached"] = div(m["sos_cached"], m["torch_cached"])
    m["attack_ratio"] = div(m["sos_att"], m["torch_att"])
    m["attack_step_ratio"] = div(m["sos_att_sps"], m["torch_att_sps"])
    m["other_cores"] = {n: r[n].get("_other_cores") for n in NAMES if r.get(n)}
    return m


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "."
    reps = sorted((p for p in glob.glob(os.path.join(d, "r*")) if os.path.isdir(p)),
                  key=lambda p: int(os.path.basename(p)[1:]) if os.path.basename(p)[1:].isdigit() else 0)
    reps = reps or [d]
    runs = [{n: load(os.path.join(p, n + ".json")) for n in NAMES} for p in reps]
    per = [metrics(r) for r in runs]
    meta = load(os.path.join(d, "meta.json")) or {}
    first = {n: next((r[n] for r in runs if r[n]), None) for n in NAMES}

    def med(k):
        v = [m[k] for m in per if m[k] is not None]
        return statistics.median(v) if v else None

    def rng(k, nd):
        v = [m[k] for m in per if m[k] is not None]
        return f"{min(v):.{nd}f}..{max(v):.{nd}f}" if len(v) > 1 else "-"

    lc, ts = first["llamacpp_generate"], first["torch_step"] or first["torch_attack"]
    lc_name = f"llama.cpp (llama-cpp-python {lc.get('llama_cpp_python')})" if lc else "llama.cpp"
    t_name = (f"torch {ts.get('torch')} + transformers {ts.get('transformers')}"
              + (" [random-init]" if ts.get("weights") == "random-init" else "")) if ts else "torch"
    maxo = lambda n: max((m["other_cores"].get(n, 0) or 0) for m in per)  # noqa: E731
    spec = [  # bench, engine, metric, key, digits, prompt key, rss key, measurement name
        ("generate", "sos --exec quant", "decode tok/s", "sos_tps", 1, "sos_pps", "sos_gen_rss", "sos_generate_quant"),
        ("generate", "sos --exec f32", "decode tok/s", "sos_f32_tps", 1, "sos_f32_pps", "sos_f32_rss", "sos_generate_f32"),
        ("generate", lc_name, "decode tok/s", "lc_tps", 1, "lc_pps", "lc_rss", "llamacpp_generate"),
        ("step full", "sos (f32)", "s/step", "sos_full", 3, None, "sos_step_rss", "sos_step"),
        ("step full", t_name, "s/step", "torch_full", 3, None, "torch_rss", "torch_step"),
        ("step cached", "sos (f32)", "s/step", "sos_cached", 3, None, "sos_step_rss", "sos_step"),
        ("step cached", t_name, "s/step", "torch_cached", 3, None, "torch_rss", "torch_step"),
        ("attack to 1.0", "sos (f32)", "s", "sos_att", 1, None, "sos_att_rss", "sos_attack"),
        ("attack to 1.0", t_name, "s", "torch_att", 1, None, "torch_att_rss", "torch_attack"),
        ("attack to 1.0", "sos (f32)", "steps", "sos_att_steps", 0, None, None, "sos_attack"),
        ("attack to 1.0", t_name, "steps", "torch_att_steps", 0, None, None, "torch_attack"),
        ("attack step", "sos (f32)", "s/step", "sos_att_sps", 3, None, None, "sos_attack"),
        ("attack step", t_name, "s/step", "torch_att_sps", 3, None, None, "torch_attack"),
    ]
    head = ("bench", "engine", "metric", "median", "range", "prompt tok/s", "peak RSS MiB", "max other cores")
    table = [head]
    for b, e, metric, k, nd, pk, rk, n in spec:
        if med(k) is None:
            continue
        table.append((b, e, metric, fmt(med(k), nd), rng(k, nd), fmt(med(pk), 1) if pk else "-",
                      fmt(med(rk), 0) if rk else "-", fmt(float(maxo(n)), 2)))
    w = [max(len(str(r[i])) for r in table) for i in range(len(head))]
    print(f"{len(per)} repeat(s); {meta.get('threads')} threads; {meta.get('date')}; sos {meta.get('sos_git')}"
          + ("-dirty" if meta.get("sos_git_dirty") else ""))
    for i, r in enumerate(table):
        print("  ".join(str(c).ljust(w[j]) for j, c in enumerate(r)).rstrip())
        if i == 0:
            print("  ".join("-" * x for x in w))

    out = {"threads": meta.get("threads"), "date": meta.get("date"), "repeats": len(per),
           "sos_git": (meta.get("sos_git") or "?") + ("-dirty" if meta.get("sos_git_dirty") else "")}
    if any(first[n] for n in NAMES[:3]):
        out.update({
            "sos_tokens_per_second": med("sos_tps"), "sos_f32_tokens_per_second": med("sos_f32_tps"),
            "llamacpp_tokens_per_second": med("lc_tps"),
            "generate_ratio": med("generate_ratio"), "generate_f32_ratio": med("generate_f32_ratio"),
            "sos_prompt_tokens_per_second": med("sos_pps"), "llamacpp_prompt_tokens_per_second": med("lc_pps"),
            "prompt_ratio": med("prompt_ratio"),
            "sos_generate_peak_rss_mib": med("sos_gen_rss"), "sos_f32_generate_peak_rss_mib": med("sos_f32_rss"),
            "llamacpp_peak_rss_mib": med("lc_rss"),
            "llamacpp_use_extra_bufts": lc and lc.get("use_extra_bufts"),
        })
    if first["sos_step"] or first["torch_step"]:
        out.update({
            "sos_seconds_per_step": med("sos_full"), "torch_seconds_per_step": med("torch_full"),
            "step_ratio": med("step_ratio"),
            "sos_seconds_per_step_cached": med("sos_cached"), "torch_seconds_per_step_cached": med("torch_cached"),
            "step_ratio_cached": med("step_ratio_cached"),
            "sos_step_peak_rss_mib": med("sos_step_rss"), "torch_peak_rss_mib": med("torch_rss"),
            "torch_weights": first["torch_step"] and first["torch_step"].get("weights"),
        })
    if first["sos_attack"] or first["torch_attack"]:
        out.update({
            "sos_seconds_to_target": med("sos_att"), "torch_seconds_to_target": med("torch_att"),
            "sos_steps_to_target": med("sos_att_steps"), "torch_steps_to_target": med("torch_att_steps"),
            "attack_ratio": med("attack_ratio"),
            "sos_attack_seconds_per_step": med("sos_att_sps"), "torch_attack_seconds_per_step": med("torch_att_sps"),
            "attack_step_ratio": med("attack_step_ratio"),
            "sos_attack_peak_rss_mib": med("sos_att_rss"), "torch_attack_peak_rss_mib": med("torch_att_rss"),
        })
    disturbed = sorted({n for r in runs for n in NAMES if r[n] and r[n].get("_disturbed")})
    if disturbed:
        out["disturbed"] = disturbed
    print()
    if out.get("generate_ratio") is not None:
        print(f"generate_ratio    (sos/llama.cpp decode tok/s, goal >= 1.0):       {out['generate_ratio']:.3f}"
              + (f"   per repeat {rng('generate_ratio', 3)}" if len(per) > 1 else ""))
    if out.get("step_ratio") is not None:
        print(f"step_ratio        (sos/torch seconds per full step, goal <= 1.0):  {out['step_ratio']:.3f}"
              + (f"   per repeat {rng('step_ratio', 3)}" if len(per) > 1 else ""))
    if out.get("step_ratio_cached") is not None:
        print(f"step_ratio_cached (same, prefix-cached step, goal <= 1.0):         {out['step_ratio_cached']:.3f}"
              + (f"   per repeat {rng('step_ratio_cached', 3)}" if len(per) > 1 else ""))
    if out.get("attack_ratio") is not None:
        print(f"attack_ratio      (sos/torch seconds to train metric 1.0, goal <= 1.0): {out['attack_ratio']:.3f}"
              + (f"   per repeat {rng('attack_ratio', 3)}" if len(per) > 1 else ""))
    if out.get("attack_step_ratio") is not None:
        print(f"attack_step_ratio (sos/torch mean seconds per attack step):          {out['attack_step_ratio']:.3f}")
    if disturbed:
        print(f"WARNING: still disturbed after a rerun (other processes busy): {', '.join(disturbed)}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
