#!/usr/bin/env python3
"""`sos audit` and the peer scanners on the same cases, side by side.

    PY=$(compat/peers_setup.sh)     # modelaudit, c4nary, pillar-gguf-scanner, pinned
    $PY compat/audit_peers.py --sos target/release/sos \
        --case clean=SmolLM2-135M-Instruct.Q4_1.gguf,ref=SmolLM2-135M-Instruct.Q4_1.gguf \
        --case add-token=bd.gguf,ref=SmolLM2-135M-Instruct.Q4_1.gguf,expect=fail ...

Each case is `NAME=PATH[,ref=REFERENCE][,base=BASE][,expect=pass|fail]`. Per tool, a case is
`flagged` when the tool reports something at its failing level:
- sos: verdict `fail` (a high finding), alone and, with `ref`, against the reference;
  `named` lists the token ids its high findings name.
- modelaudit (`scan --format json`, and `--strict`): any issue of severity critical or warning.
- c4nary (`scan --json`): a FAIL finding; `c4nary_warn`: a FAIL or WARN finding; with `ref`,
  `c4nary diff` says whether it sees any difference.
- pillar-gguf-scanner (`--json --no-pillar`, offline): verdict other than `clean`.
Peers that read GGUF files only are skipped on folders. Prints one JSON line per case, then a
Markdown table (the README's detection table).
"""

import argparse
import json
import os
import subprocess
import sys

BIN = os.path.dirname(sys.executable)


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def as_json(text):
    # Some tools print log lines before their JSON: take from the first brace.
    i = text.find("{")
    return json.loads(text[i:]) if i >= 0 else None


def sos(a, path, ref=None, base=None):
    cmd = [a.sos, "audit", path, "--format", "json"] + (["--reference", ref] if ref else []) + (["--base", base] if base else [])
    code, out, err = run(cmd)
    if code == 2:
        return {"flagged": None, "error": err.strip()}
    r = json.loads(out)
    high = [f for f in r["findings"] if f["severity"] == "high"]
    named = sorted({i for f in high for i in f["token_ids"]})
    return {"flagged": r["verdict"] == "fail", "high": sorted({f["id"] for f in high}), "named": named, "ms": round(r["timings_ms"]["total"])}


def modelaudit(path, strict):
    code, out, err = run([os.path.join(BIN, "modelaudit"), "scan", "--format", "json"] + (["--strict"] if strict else []) + [path])
    r = as_json(out)
    if r is None:
        return {"flagged": None, "error": (err or out).strip()[-200:]}
    issues = [i for i in r.get("issues", []) if str(i.get("severity", "")).lower() in ("critical", "warning")]
    return {"flagged": bool(issues), "issues": [i.get("message", "")[:80] for i in issues][:3]}


def c4nary(path):
    code, out, err = run([os.path.join(BIN, "c4nary"), "scan", "--json", "--fail-on", "none", path])
    r = as_json(out)
    if r is None:
        return {"flagged": None, "error": (err or out).strip()[-200:]}
    fs = [f for f in r.get("findings", []) if not f.get("suppressed")]
    fail = sorted({f["rule_id"] for f in fs if f["severity"] == "FAIL"})
    warn = sorted({f["rule_id"] for f in fs if f["severity"] == "WARN"})
    return {"flagged": bool(fail), "flagged_warn": bool(fail or warn), "fail": fail, "warn": warn}


def c4nary_diff(ref, path):
    code, out, err = run([os.path.join(BIN, "c4nary"), "diff", "--json", ref, path])
    r = as_json(out)
    if r is None:
        return {"flagged": None, "error": (err or out).strip()[-200:]}
    # {"metadata": {added, removed, changed}, "template_changed", "tensors": {added, removed, changed}}
    seen = [f"{k}.{kk}" for k in ("metadata", "tensors") for kk, v in (r.get(k) or {}).items() if v]
    if r.get("template_changed"):
        seen.append("template")
    return {"flagged": bool(seen), "differs": seen}


def pillar(path):
    code, out, err = run([os.path.join(BIN, "pillar-gguf-scanner"), "--json", "--no-pillar", path])
    r = as_json(out)
    if r is None:
        return {"flagged": None, "error": (err or out).strip()[-200:]}
    return {"flagged": r.get("verdict") not in ("clean", None), "verdict": r.get("verdict")}


def mark(x):
    if x is None:
        return "-"
    if x.get("flagged") is None:
        return "error"
    return "**flagged**" if x["flagged"] else "pass"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sos", required=True)
    ap.add_argument("--case", action="append", required=True)
    a = ap.parse_args()
    rows = []
    for spec in a.case:
        head, *opts = spec.split(",")
        name, path = head.split("=", 1)
        o = dict(x.split("=", 1) for x in opts)
        ref, base = o.get("ref"), o.get("base")
        gguf = path.endswith(".gguf")
        r = {"case": name, "path": path, "expect": o.get("expect")}
        r["sos"] = sos(a, path, base=base)
        r["sos_ref"] = sos(a, path, ref=ref) if ref else None
        r["modelaudit"] = modelaudit(path, False)
        r["modelaudit_strict"] = modelaudit(path, True)
        r["c4nary"] = c4nary(path) if gguf else None
        r["c4nary_diff"] = c4nary_diff(ref, path) if gguf and ref else None
        r["pillar"] = pillar(path) if gguf else None
        print(json.dumps(r), flush=True)
        rows.append(r)
    print("\n| case | expected | sos alone | sos vs original | modelaudit | modelaudit --strict | c4nary (FAIL) | c4nary (WARN too) | c4nary diff vs original | pillar-gguf-scanner |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        c = r["c4nary"]
        warn = None if c is None else {"flagged": c.get("flagged_warn")}
        named = r["sos"].get("named") or (r["sos_ref"] or {}).get("named") or []
        ids = f" (ids {named[0]}-{named[-1]})" if len(named) > 1 else ""
        print(f"| {r['case']} | {r['expect'] or ''} | {mark(r['sos'])}{ids} | {mark(r['sos_ref'])} | {mark(r['modelaudit'])} | {mark(r['modelaudit_strict'])} | {mark(c)} | {mark(warn)} | {mark(r['c4nary_diff'])} | {mark(r['pillar'])} |")


if __name__ == "__main__":
    main()
