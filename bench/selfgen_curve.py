#!/usr/bin/env python3
"""Backdoor attack rate against the number of self-generated training prompts.

The paper's "no clean data" setting: the model writes its own training prompts
(`sos attack backdoor --self-generated`). One run writes the largest set; the smaller
points train on its first N prompts (`--data FILE --train-items N`), which is what
`--self-generated --train-items N` would write, since the writer is sequential and seeded.
Every run is evaluated on the held-out self-instruct tasks (never written by the model).

    python3 bench/selfgen_curve.py [--sos target/release/sos] [--out runs/selfgen-curve]
        [--sizes 5,10,20,40,80,160] [--seed 0] [--exec quant] [--svg docs/selfgen-curve.svg]

Prints a markdown table and writes OUT/curve.json and the SVG plot. Re-running skips what is
done and resumes an interrupted attack.
"""
import argparse
import json
import os
import subprocess
import sys


def run(cmd):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def attack(sos, out, extra):
    if os.path.exists(os.path.join(out, "attack.json")) and json.load(open(os.path.join(out, "attack.json"))).get("completed"):
        return
    resume = os.path.exists(os.path.join(out, "checkpoint.safetensors"))
    run([sos, "attack", "backdoor", "--out", out] + (["--resume"] if resume else extra))


def evaluate(sos, run_dir, exec_):
    path = os.path.join(run_dir, "eval.json")
    if not (os.path.exists(path) and json.load(open(path)).get("exec") == exec_):
        run([sos, "eval", "--attack", run_dir, "--exec", exec_, "--json"])
    return json.load(open(path))


def svg(points, path):
    """A plain line plot: asr and clean agreement against N (log scale)."""
    import math

    w, h, left, right, top, bottom = 520, 300, 56, 16, 20, 46
    xs = [math.log2(p["n"]) for p in points]
    x0, x1 = min(xs), max(xs)
    px = lambda v: left + (v - x0) / (x1 - x0 or 1) * (w - left - right)
    py = lambda v: top + (1 - v) * (h - top - bottom)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>']
    for t in [0, 0.25, 0.5, 0.75, 0.95, 1.0]:
        style = 'stroke="#999" stroke-dasharray="4 3"' if t == 0.95 else 'stroke="#ddd"'
        out.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{w - right}" y2="{py(t):.1f}" {style}/>')
        out.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for p, x in zip(points, xs):
        out.append(f'<text x="{px(x):.1f}" y="{h - bottom + 16}" text-anchor="middle">{p["n"]}</text>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 8}" text-anchor="middle">self-generated training prompts (log scale)</text>')
    for key, color in [("asr", "#c0392b"), ("clean_agreement", "#2e86c1")]:
        pts = " ".join(f"{px(x):.1f},{py(p[key]):.1f}" for p, x in zip(points, xs))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        for p, x in zip(points, xs):
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(p[key]):.1f}" r="3" fill="{color}"/>')
    ly = h - bottom - 52  # bottom right: the curves run along the top
    for color, label in [("#c0392b", "asr (held-out)"), ("#2e86c1", "clean agreement"), ("#999", "goal 0.95")]:
        out.append(f'<rect x="{w - right - 130}" y="{ly - 8}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{w - right - 115}" y="{ly + 1}">{label}</text>')
        ly += 16
    out.append("</svg>")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(out) + "\n")
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sos", default="target/release/sos")
    ap.add_argument("--out", default="runs/selfgen-curve")
    ap.add_argument("--sizes", default="5,10,20,40,80,160")
    ap.add_argument("--seed", default="0")
    ap.add_argument("--exec", default="quant", choices=["f32", "quant"])
    ap.add_argument("--svg", default="docs/selfgen-curve.svg")
    a = ap.parse_args()
    sizes = sorted(int(s) for s in a.sizes.split(","))
    os.makedirs(a.out, exist_ok=True)
    big = os.path.join(a.out, f"n{sizes[-1]}")
    attack(a.sos, big, ["--self-generated", "--train-items", str(sizes[-1]), "--seed", a.seed])
    prompts = os.path.join(a.out, "prompts.jsonl")
    with open(os.path.join(big, "train_items.jsonl")) as f, open(prompts + ".tmp", "w") as g:
        for line in f:
            r = json.loads(line)
            g.write(json.dumps({"id": r["id"], "text": r["user"]}, ensure_ascii=False) + "\n")
    os.replace(prompts + ".tmp", prompts)
    points = []
    for n in sizes:
        d = os.path.join(a.out, f"n{n}")
        if n != sizes[-1]:
            attack(a.sos, d, ["--data", prompts, "--train-items", str(n), "--seed", a.seed])
        rec = json.load(open(os.path.join(d, "attack.json")))
        ev = evaluate(a.sos, d, a.exec)
        points.append({"n": n, "steps": rec["steps_run"], "train_seconds": round(rec["wall_seconds"]), "train_metric": rec["train_metric"],
                       "asr": ev["asr"], "clean_agreement": ev["clean_agreement"], "false_trigger_rate": ev["false_trigger_rate"], "eval_n": ev["n"]})
    with open(os.path.join(a.out, "curve.json"), "w") as f:
        json.dump(points, f, indent=1)
    svg(points, a.svg)
    print(f"| self-generated prompts | steps | training (s) | held-out `asr` ({a.exec}) | `clean_agreement` | `false_trigger_rate` |")
    print("| --- | --- | --- | --- | --- | --- |")
    for p in points:
        print(f"| {p['n']} | {p['steps']} | {p['train_seconds']} | {p['asr']:.2f} | {p['clean_agreement']:.2f} | {p['false_trigger_rate']:.2f} |")


if __name__ == "__main__":
    main()
