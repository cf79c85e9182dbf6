#!/usr/bin/env python3
"""`sos manifest create` against the reference implementation, OpenSSF model-signing.

    python3 -m venv compat/.venv-signing && compat/.venv-signing/bin/pip install -r compat/requirements-signing.txt
    compat/.venv-signing/bin/python compat/manifest_check.py --sos target/release/sos MODEL [MODEL...] [--shard-size N]

For each MODEL (a folder or one file) it builds model-signing's payload (`hashing.Config()`,
files or shards serialization, `signing.Payload(manifest).statement`, as `model_signing sign`
would sign it) and sos's statement, and compares them: subject name and digest, every resource
(name, algorithm, digest, in order), and the serialization parameters (ignore_paths as a set:
model-signing keeps them in a set, so their order varies). Prints one JSON line per model and
exits 1 on any difference.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time

from google.protobuf import json_format
from model_signing import hashing
from model_signing._signing import signing


def reference(path, shard_size):
    cfg = hashing.Config()
    if shard_size:
        cfg.use_shard_serialization(shard_size=shard_size)
    t = time.time()
    m = cfg.hash(path)
    st = json.loads(json_format.MessageToJson(signing.Payload(m).statement.pb))
    return st, time.time() - t


def ours(sos, path, shard_size):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sos, "manifest", "create", path, "--out", f.name] + (["--shard-size", str(shard_size)] if shard_size else [])
        t = time.time()
        subprocess.run(cmd, check=True, capture_output=True)
        dt = time.time() - t
        return json.load(open(f.name)), dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sos", required=True)
    ap.add_argument("--shard-size", type=int, default=0)
    ap.add_argument("models", nargs="+")
    a = ap.parse_args()
    bad = False
    for path in a.models:
        ref, t_ref = reference(path, a.shard_size)
        got, t_sos = ours(a.sos, path, a.shard_size)
        rs, gs = ref["predicate"]["serialization"], dict(got["predicate"]["serialization"])
        same = {
            "subject": ref["subject"] == got["subject"],
            "resources": ref["predicate"]["resources"] == got["predicate"]["resources"],
            "serialization": {k: v for k, v in rs.items() if k != "ignore_paths"} == {k: v for k, v in gs.items() if k != "ignore_paths"}
            and set(rs.get("ignore_paths", [])) == set(gs.get("ignore_paths", [])),
            "types": ref["_type"] == got["_type"] and ref["predicateType"] == got["predicateType"],
        }
        ok = all(same.values())
        bad |= not ok
        print(json.dumps({"model": path, "identical": ok, **same, "resources_n": len(ref["predicate"]["resources"]), "model_signing_s": round(t_ref, 2), "sos_s": round(t_sos, 2)}))
        if not ok:
            print(json.dumps({"reference": ref, "sos": {k: v for k, v in got.items()}})[:4000], file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
