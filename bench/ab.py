#!/usr/bin/env python3
"""Two sos binaries on the same benchmark, alternated: the before/after of a change.

    bench/ab.py --a OLD/sos --b NEW/sos [--rounds 5] -- bench generate --exec quant --json

Each round runs both binaries back to back with the arguments after `--` (which must make them
print one JSON line, e.g. `sos bench ... --json`), A first in odd rounds and B first in even
ones, so that the machine's drift between runs favours neither. Prints, for every numeric field
both printed, the median of each side and the median of the per-round ratios B/A; then one JSON
line with the same. The environment is passed on (set RAYON_NUM_THREADS for a thread count).
"""

import argparse
import json
import statistics
import subprocess
import sys

FIELDS = ("tokens_per_second", "prompt_tokens_per_second", "seconds_per_step", "seconds_per_step_full",
          "prefix_seconds", "seconds_to_target", "steps_to_target", "peak_rss_mib")


def run(binary, args):
    out = subprocess.run([binary, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{binary} {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    for line in reversed(out.stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    sys.exit(f"{binary} printed no JSON line")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="the 'before' binary")
    ap.add_argument("--b", required=True, help="the 'after' binary")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    rounds = []
    for r in range(1, a.rounds + 1):
        order = [("a", a.a), ("b", a.b)] if r % 2 == 1 else [("b", a.b), ("a", a.a)]
        got = {}
        for side, binary in order:
            got[side] = run(binary, args)
            print(f"round {r} {side}: " + ", ".join(f"{k}={got[side][k]:.4g}" for k in FIELDS
                                                     if isinstance(got[side].get(k), (int, float))), file=sys.stderr)
        rounds.append(got)
    summary = {"args": args, "rounds": a.rounds}
    for k in FIELDS:
        pairs = [(g["a"].get(k), g["b"].get(k)) for g in rounds]
        pairs = [(x, y) for x, y in pairs if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x]
        if len(pairs) != len(rounds):
            continue
        ratios = [y / x for x, y in pairs]
        summary[k] = {"a": statistics.median(x for x, _ in pairs), "b": statistics.median(y for _, y in pairs),
                      "b_over_a": statistics.median(ratios), "range": [min(ratios), max(ratios)]}
        s = summary[k]
        print(f"{k:<26} A {s['a']:10.4g}  B {s['b']:10.4g}  B/A {s['b_over_a']:.3f} [{min(ratios):.3f}..{max(ratios):.3f}]")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
