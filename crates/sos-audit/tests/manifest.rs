//! `sos manifest`: the statement lists every file (or shard) in model-signing's order and
//! verifies its own model; each kind of tampering is named. (Byte-for-byte agreement with
//! model-signing 1.1.1 itself: compat/manifest_check.py.)

use std::path::{Path, PathBuf};

use sos_audit::manifest::{create, verify, Serialization};
use sos_model::tiny::TinySpec;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sos-manifest-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

fn names(st: &serde_json::Value) -> Vec<String> {
    st["predicate"]["resources"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_string()).collect()
}

#[test]
fn a_folder_in_model_signing_order_verifies_and_tampering_is_named() {
    let d = dir("folder");
    let m = d.join("model");
    TinySpec::default().write_hf(&m).unwrap();
    // Path order is component by component: `a/b` before `a-c` (a plain string sort says otherwise).
    write(&m.join("a/b"), b"x");
    write(&m.join("a-c"), b"y");
    write(&m.join(".git/HEAD"), b"ref");
    write(&m.join(".gitattributes"), b"*");
    let st = create(&m, Serialization::Files, Some("test"), None).unwrap();
    let n = names(&st);
    assert!(n.iter().position(|x| x == "a/b").unwrap() < n.iter().position(|x| x == "a-c").unwrap(), "{n:?}");
    assert!(!n.iter().any(|x| x.starts_with(".git")), "git files are ignored: {n:?}");
    assert_eq!(st["subject"][0]["name"], "model");
    assert_eq!(st["predicate"]["sos"]["source"], "test");
    assert!(st["predicate"]["sos"]["tensors"]["model.safetensors"]["model.embed_tokens.weight"].is_string());
    let path = d.join("m.json");
    std::fs::write(&path, serde_json::to_string(&st).unwrap()).unwrap();
    assert!(verify(&m, &path, None).unwrap().ok());

    // A changed tensor, a new file, a removed file: each named.
    let st_path = m.join("model.safetensors");
    let mut bytes = std::fs::read(&st_path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&st_path, &bytes).unwrap();
    write(&m.join("extra.bin"), b"\x80\x04");
    std::fs::remove_file(m.join("a-c")).unwrap();
    let v = verify(&m, &path, None).unwrap();
    assert!(!v.ok());
    assert_eq!(v.changed, vec!["model.safetensors"]);
    assert_eq!(v.unlisted, vec!["extra.bin"]);
    assert_eq!(v.missing, vec!["a-c"]);
    assert_eq!(v.changed_tensors.len(), 1, "{:?}", v.changed_tensors);
    // The audit's provenance check says the same, as findings.
    let req = sos_audit::AuditRequest { candidate: m.clone(), reference: None, base: None, manifest: Some(path.clone()), key: None, fail_on: sos_audit::Severity::High, behavior: sos_audit::Behavior::Off, endpoint: None, deep: false };
    let r = sos_audit::run_audit(&req).unwrap();
    let ids: Vec<&str> = r.findings.iter().filter(|f| f.check == sos_audit::Check::Provenance).map(|f| f.id.as_str()).collect();
    assert_eq!(ids, vec!["provenance.changed", "provenance.unlisted", "provenance.missing"]);
    assert_eq!(r.verdict, "fail");
    // Tensor digests listed for a file the manifest does not hash (here a path out of the
    // model, to a file that is not a GGUF) are not opened.
    std::fs::write(d.join("outside.gguf"), b"not a gguf").unwrap();
    let mut outside = st.clone();
    outside["predicate"]["sos"]["tensors"]["../outside.gguf"] = serde_json::json!({"t": "00"});
    std::fs::write(&path, serde_json::to_string(&outside).unwrap()).unwrap();
    assert_eq!(verify(&m, &path, None).unwrap().changed, vec!["model.safetensors"]);
    // A resource edited in the manifest itself no longer matches the subject digest.
    let mut forged = st.clone();
    forged["predicate"]["resources"][0]["digest"] = "00".repeat(32).into();
    std::fs::write(&path, serde_json::to_string(&forged).unwrap()).unwrap();
    assert!(verify(&m, &path, None).unwrap().subject_mismatch);
    // A digest that is not hex (a multi-byte character across a byte pair) is refused, naming
    // the manifest, not a panic.
    forged["predicate"]["resources"][0]["digest"] = format!("0é{}", "0".repeat(61)).into();
    std::fs::write(&path, serde_json::to_string(&forged).unwrap()).unwrap();
    let e = verify(&m, &path, None).unwrap_err().to_string();
    assert!(e.contains("m.json") && e.contains("hex"), "{e}");
}

#[test]
fn shards_and_single_files() {
    let d = dir("shards");
    let f = d.join("tiny.gguf");
    TinySpec::default().write_gguf(&f).unwrap();
    let size = std::fs::metadata(&f).unwrap().len();
    // One file: one resource named `.`, as model-signing names it.
    let st = create(&f, Serialization::Files, None, None).unwrap();
    assert_eq!(names(&st), vec!["."]);
    assert_eq!(st["subject"][0]["name"], "tiny.gguf");
    // Shards of 1000 bytes: `path:start:end`, the last one short, digests that verify.
    let st = create(&f, Serialization::Shards(1000), None, None).unwrap();
    let n = names(&st);
    assert_eq!(n.len() as u64, size.div_ceil(1000));
    assert_eq!(n[0], ".:0:1000");
    assert_eq!(n.last().unwrap(), &format!(".:{}:{size}", (size - 1) / 1000 * 1000));
    assert_eq!(st["predicate"]["resources"][0]["algorithm"], "sha256-sharded-1000");
    assert_eq!(st["predicate"]["serialization"]["shard_size"], 1000);
    let path = d.join("m.json");
    std::fs::write(&path, serde_json::to_string(&st).unwrap()).unwrap();
    assert!(verify(&f, &path, None).unwrap().ok());
    assert_eq!(st["subject"][0]["digest"]["sha256"].as_str().unwrap().len(), 64);
    // 1-byte shards (a manifest sets the size) would make a job per byte: refused, naming the
    // file.
    let big = d.join("big.bin");
    std::fs::write(&big, vec![0u8; (1 << 20) + 1]).unwrap();
    let e = create(&big, Serialization::Shards(1), None, None).unwrap_err().to_string();
    assert!(e.contains("big.bin") && e.contains("pieces"), "{e}");
    // Not a statement: refused, naming the file.
    std::fs::write(&path, "{\"_type\": \"other\"}").unwrap();
    let e = verify(&f, &path, None).unwrap_err().to_string();
    assert!(e.contains("m.json") && e.contains("model-signing"), "{e}");
    // A symbolic link in the model is refused (model-signing's default).
    #[cfg(unix)]
    {
        let m = d.join("linked");
        std::fs::create_dir_all(&m).unwrap();
        std::os::unix::fs::symlink(&f, m.join("link.gguf")).unwrap();
        assert!(create(&m, Serialization::Files, None, None).unwrap_err().to_string().contains("symbolic link"));
    }
}

/// A signed manifest: verifies with the signer's key, not with another; a bundle written inside
/// the model is not part of it; a tampered payload fails.
#[test]
fn signed_bundles_verify_with_their_key_only() {
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    use sos_audit::signature::sign;
    let d = dir("signed");
    let m = d.join("model");
    TinySpec::default().write_hf(&m).unwrap();
    let keys: Vec<(PathBuf, PathBuf)> = [7u8, 9]
        .iter()
        .map(|&seed| {
            let k = p256::ecdsa::SigningKey::from_bytes(&[seed; 32].into()).unwrap();
            let (sk, pk) = (d.join(format!("k{seed}.pem")), d.join(format!("p{seed}.pem")));
            std::fs::write(&sk, k.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
            std::fs::write(&pk, k.verifying_key().to_public_key_pem(LineEnding::LF).unwrap()).unwrap();
            (sk, pk)
        })
        .collect();
    let bundle_path = m.join("model.sig");
    let st = create(&m, Serialization::Files, None, Some(&bundle_path)).unwrap();
    assert!(st["predicate"]["serialization"]["ignore_paths"].as_array().unwrap().iter().any(|p| p == "model.sig"));
    let bundle = sign(&st, &keys[0].0).unwrap();
    std::fs::write(&bundle_path, serde_json::to_string(&bundle).unwrap()).unwrap();
    assert!(verify(&m, &bundle_path, Some(&keys[0].1)).unwrap().ok());
    let e = verify(&m, &bundle_path, Some(&keys[1].1)).unwrap_err().to_string();
    assert!(e.contains("another key"), "{e}");
    assert!(verify(&m, &bundle_path, None).unwrap_err().to_string().contains("--key"));
    // The payload edited after signing: the signature no longer verifies.
    let mut forged = bundle.clone();
    let mut p: serde_json::Value = serde_json::from_slice(&base64_decode(forged["dsseEnvelope"]["payload"].as_str().unwrap())).unwrap();
    p["predicate"]["resources"][0]["digest"] = "00".repeat(32).into();
    forged["dsseEnvelope"]["payload"] = base64_encode(&serde_json::to_vec(&p).unwrap()).into();
    std::fs::write(&bundle_path, serde_json::to_string(&forged).unwrap()).unwrap();
    let e = verify(&m, &bundle_path, Some(&keys[0].1)).unwrap_err().to_string();
    assert!(e.contains("does not verify"), "{e}");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}
