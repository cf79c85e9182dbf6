//! Broken and hostile model files: each must give exit code 2 and a one-line error that names the
//! file and the problem, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use sos_model::gguf::{Gguf, Value, Writer};
use sos_model::tiny::TinySpec;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sos-bad-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `sos model info --model PATH` and checks the error contract; returns the message.
fn expect_error(path: &Path, needle: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sos"))
        .args(["model", "info", "--model"])
        .arg(path)
        .env("SOS_HOME", tmpdir("home"))
        .output()
        .unwrap();
    check_error(path, needle, &out)
}

/// The same contract for `sos audit PATH` (exit 2: the audit could not run), and `model info`'s.
fn expect_both(path: &Path, needle: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_sos")).arg("audit").arg(path).output().unwrap();
    check_error(path, needle, &out);
    expect_error(path, needle);
}

fn check_error(path: &Path, needle: &str, out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{}: expected exit 2, stderr: {stderr}", path.display());
    assert!(!stderr.contains("panicked"), "panic on {}: {stderr}", path.display());
    let line = stderr.trim();
    assert_eq!(line.lines().count(), 1, "error must be one line: {stderr}");
    assert!(line.starts_with("error: "), "{line}");
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(line.contains(&*name), "error must name {name}: {line}");
    assert!(line.contains(needle), "error must say `{needle}`: {line}");
    line.to_string()
}

fn tiny_gguf(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.gguf");
    TinySpec::default().write_gguf(&p).unwrap();
    p
}

/// Copies a GGUF, letting `edit` change its metadata.
fn rewrite(src: &Path, dst: &Path, edit: impl Fn(&str, &Value) -> Value) {
    let g = Gguf::open(src).unwrap();
    let mut w = Writer::copy_of(&g).unwrap();
    for (k, v) in &g.metadata {
        w.meta(k, edit(k, v));
    }
    w.write(dst).unwrap();
}

#[test]
fn the_tiny_model_itself_loads() {
    let dir = tmpdir("ok");
    let out = Command::new(env!("CARGO_BIN_EXE_sos")).args(["model", "info", "--json", "--model"]).arg(tiny_gguf(&dir)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["chat_template"], true);
}

#[test]
fn missing_file() {
    expect_both(&tmpdir("missing").join("nope.gguf"), "no such file");
}

#[test]
fn truncated_gguf() {
    let dir = tmpdir("trunc");
    let bytes = std::fs::read(tiny_gguf(&dir)).unwrap();
    let p = dir.join("truncated.gguf");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    expect_both(&p, "beyond the end of the file");
    let p = dir.join("header-cut.gguf");
    std::fs::write(&p, &bytes[..1000]).unwrap();
    expect_both(&p, "truncated or corrupt GGUF header");
}

#[test]
fn header_claiming_2_pow_40_tensors() {
    let dir = tmpdir("many");
    let mut bytes = std::fs::read(tiny_gguf(&dir)).unwrap();
    bytes[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let p = dir.join("many-tensors.gguf");
    std::fs::write(&p, &bytes).unwrap();
    expect_both(&p, "tensor count is 1099511627776");
}

#[test]
fn tensor_beyond_end_of_file() {
    let dir = tmpdir("beyond");
    let src = tiny_gguf(&dir);
    let g = Gguf::open(&src).unwrap();
    let p = dir.join("beyond.gguf");
    Writer::copy_of(&g).unwrap().write(&p).unwrap();
    // Point the last tensor's offset far past the end (the offset is the last 8 bytes of its
    // directory entry, found by searching for its name).
    let mut bytes = std::fs::read(&p).unwrap();
    let name = g.tensors.last().unwrap().name.as_bytes().to_vec();
    let at = bytes.windows(name.len()).rposition(|w| w == name.as_slice()).unwrap();
    let off = at + name.len() + 4 + 8 * g.tensors.last().unwrap().dims.len() + 4;
    bytes[off..off + 8].copy_from_slice(&(1u64 << 30).to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    expect_both(&p, "beyond the end of the file");
}

#[test]
fn unknown_architecture() {
    let dir = tmpdir("arch");
    let p = dir.join("mamba.gguf");
    rewrite(&tiny_gguf(&dir), &p, |k, v| if k == "general.architecture" { Value::Str("mamba".into()) } else { v.clone() });
    expect_error(&p, "unsupported architecture `mamba`");
}

#[test]
fn tokenizer_that_does_not_fit_the_model() {
    let dir = tmpdir("tok");
    let p = dir.join("bigvocab.gguf");
    rewrite(&tiny_gguf(&dir), &p, |k, v| match (k, v) {
        ("tokenizer.ggml.tokens" | "tokenizer.ggml.token_type", Value::Array(a)) => {
            let mut a = a.clone();
            for i in 0..100 {
                a.push(if k.ends_with("tokens") { Value::Str(format!("extra{i}")) } else { Value::I32(1) });
            }
            Value::Array(a)
        }
        _ => v.clone(),
    });
    expect_error(&p, "do not fit");
}

#[test]
fn safetensors_header_of_absurd_length() {
    let dir = tmpdir("st");
    let hf = dir.join("hf-absurd");
    TinySpec::default().write_hf(&hf).unwrap();
    let st = hf.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&st, &bytes).unwrap();
    expect_error(&hf, "invalid safetensors header");
}

#[test]
fn not_a_model_at_all() {
    let dir = tmpdir("junk");
    let p = dir.join("notes.txt");
    std::fs::write(&p, "hello, this is not a model").unwrap();
    expect_both(&p, "not a GGUF file");
    // A zip archive and a pickle (what torch.save writes) renamed to .gguf: refused, never unpacked.
    let p = dir.join("archive.gguf");
    std::fs::write(&p, b"PK\x03\x04\x14\x00\x00\x00\x08\x00rest of a zip").unwrap();
    expect_both(&p, "not a GGUF file");
    let p = dir.join("pickle.gguf");
    std::fs::write(&p, b"\x80\x02}q\x00(X\x05\x00\x00\x00torchq\x01.").unwrap();
    expect_both(&p, "not a GGUF file");
}

/// `sos manifest verify`: exit 0 verified, 1 on a mismatch, 2 on a manifest it cannot read.
#[test]
fn manifest_verify_exit_codes() {
    let dir = tmpdir("manifest");
    let model = tiny_gguf(&dir);
    let m = dir.join("m.json");
    let sos = |args: &[&std::ffi::OsStr]| Command::new(env!("CARGO_BIN_EXE_sos")).args(args).output().unwrap();
    let out = sos(&["manifest".as_ref(), "create".as_ref(), model.as_os_str(), "--out".as_ref(), m.as_os_str()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sos(&["manifest".as_ref(), "verify".as_ref(), model.as_os_str(), m.as_os_str()]).status.code(), Some(0));
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&model, &bytes).unwrap();
    let out = sos(&["manifest".as_ref(), "verify".as_ref(), model.as_os_str(), m.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("changed: ."), "{}", String::from_utf8_lossy(&out.stdout));
    std::fs::write(&m, "not json").unwrap();
    check_error(&m, "invalid JSON", &sos(&["manifest".as_ref(), "verify".as_ref(), model.as_os_str(), m.as_os_str()]));
}
