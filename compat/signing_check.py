#!/usr/bin/env python3
"""Signed manifests both ways between `sos manifest sign|verify` and model-signing's key mode.

    compat/.venv-signing/bin/python compat/signing_check.py --sos target/release/sos MODEL [MODEL...]

For each MODEL (copied into a temporary folder first, since the check then alters a byte) with a
fresh ECDSA P-256 key pair: sos signs and `model_signing verify key` checks; `model_signing sign
key` signs and `sos manifest verify --key` checks; then one byte of the copy changes and both
verifiers must refuse both bundles. Prints one JSON line per model; exit 1 on any surprise.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

MS = os.path.join(os.path.dirname(sys.executable), "model_signing")


def ok(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    # model_signing prints its verdict and exits 0 or 1; sos exits 0, 1 (mismatch) or 2.
    return p.returncode == 0 and "failed" not in (p.stdout + p.stderr).lower()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sos", required=True)
    ap.add_argument("models", nargs="+")
    a = ap.parse_args()
    bad = False
    for src in a.models:
        with tempfile.TemporaryDirectory() as t:
            key = ec.generate_private_key(ec.SECP256R1())
            sk, pk = os.path.join(t, "key.pem"), os.path.join(t, "pub.pem")
            open(sk, "wb").write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            open(pk, "wb").write(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
            model = os.path.join(t, os.path.basename(src.rstrip("/")))
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, model)
            ours, theirs = os.path.join(t, "sos.sig"), os.path.join(t, "ms.sig")
            subprocess.run([a.sos, "manifest", "sign", model, "--key", sk, "--out", ours], check=True, capture_output=True)
            subprocess.run([MS, "sign", "key", "--private_key", sk, "--signature", theirs, model], check=True, capture_output=True)
            verify_ms = lambda sig: ok([MS, "verify", "key", "--public_key", pk, "--signature", sig, model])
            verify_sos = lambda sig: ok([a.sos, "manifest", "verify", model, sig, "--key", pk])
            r = {"model": src, "model_signing_accepts_sos": verify_ms(ours), "sos_accepts_model_signing": verify_sos(theirs), "sos_accepts_sos": verify_sos(ours)}
            # A file both tools hash (not git metadata, which both ignore).
            victim = model if os.path.isfile(model) else next(os.path.join(d, f) for d, _, fs in sorted(os.walk(model)) for f in sorted(fs) if ".git" not in os.path.relpath(os.path.join(d, f), model))
            with open(victim, "r+b") as f:
                f.seek(os.path.getsize(victim) - 1)
                b = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([b[0] ^ 1]))
            r["after_one_byte"] = {"model_signing_refuses_sos": not verify_ms(ours), "model_signing_refuses_own": not verify_ms(theirs), "sos_refuses_model_signing": not verify_sos(theirs), "sos_refuses_own": not verify_sos(ours)}
            good = all([r["model_signing_accepts_sos"], r["sos_accepts_model_signing"], r["sos_accepts_sos"], *r["after_one_byte"].values()])
            bad |= not good
            print(json.dumps({**r, "all_as_expected": good}))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
