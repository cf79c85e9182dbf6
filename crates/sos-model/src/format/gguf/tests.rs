//! Reading what the writer wrote, and refusing hostile headers.

use std::path::PathBuf;

use super::*;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sos-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&n_tensors.to_le_bytes());
    b.extend_from_slice(&n_kv.to_le_bytes());
    b
}

fn err_of(bytes: &[u8], name: &str) -> String {
    let p = tmp(name);
    std::fs::write(&p, bytes).unwrap();
    let e = Gguf::open(&p).unwrap_err().to_string();
    assert!(e.contains(name), "error must name the file: {e}");
    e
}

#[test]
fn round_trip() {
    let mut w = Writer::new();
    w.meta("general.architecture", Value::Str("llama".into()))
        .meta("a.list", Value::Array(vec![Value::Str("x".into()), Value::Str("yz".into())]))
        .meta("a.f", Value::F32(1.5))
        .tensor_f32("t0", &[2, 3], &[1., 2., 3., 4., 5., 6.])
        .tensor_f32("t1", &[5], &[7.; 5]);
    let p = tmp("rt.gguf");
    w.write(&p).unwrap();
    let g = Gguf::open(&p).unwrap();
    assert_eq!(g.get_str("general.architecture"), Some("llama"));
    assert_eq!(g.get("a.f").and_then(Value::as_f64), Some(1.5));
    assert_eq!(g.get("a.list").and_then(Value::as_array).map(|a| a.len()), Some(2));
    let t = g.tensor_info("t0").unwrap();
    assert_eq!(t.shape(), vec![2, 3]);
    let q = g.qtensor("t0").unwrap().dequantize(&candle_core::Device::Cpu).unwrap();
    assert_eq!(q.to_vec2::<f32>().unwrap(), vec![vec![1., 2., 3.], vec![4., 5., 6.]]);
    let q1 = g.qtensor("t1").unwrap().dequantize(&candle_core::Device::Cpu).unwrap();
    assert_eq!(q1.to_vec1::<f32>().unwrap(), vec![7.; 5]);
    // Copy with edits: a value replaced in place, one removed, tensors carried over.
    let p2 = tmp("rt2.gguf");
    Writer::copy_of(&g).unwrap().meta("a.f", Value::F32(2.5)).remove_meta("a.list").write(&p2).unwrap();
    let g2 = Gguf::open(&p2).unwrap();
    assert_eq!(g2.metadata.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["general.architecture", "a.f"]);
    assert_eq!(g2.get("a.f").and_then(Value::as_f64), Some(2.5));
    assert_eq!(g2.tensor_bytes(g2.tensor_info("t0").unwrap()), g.tensor_bytes(g.tensor_info("t0").unwrap()));
}

#[test]
fn hostile_headers_are_errors() {
    assert!(err_of(b"GG", "short.gguf").contains("not a GGUF file"));
    assert!(err_of(b"GGML\x03\0\0\0", "magic.gguf").contains("magic"));
    assert!(err_of(&header(1 << 40, 0), "many.gguf").contains("tensor count"));
    assert!(err_of(&header(0, u64::MAX), "kv.gguf").contains("metadata count"));
    // A string claiming 1 TB.
    let mut b = header(0, 1);
    b.extend_from_slice(&(1u64 << 40).to_le_bytes());
    b.extend_from_slice(&[0; 32]);
    assert!(err_of(&b, "str.gguf").contains("metadata key"));
    // An array claiming 2^50 u64s.
    let mut b = header(0, 1);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&10u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 50).to_le_bytes());
    assert!(err_of(&b, "arr.gguf").contains("`k`"));
    // An array of 2^24 u8s that are all there: each would be held as a 32-byte value (512 MB
    // from a 16 MB file); refused by the item budget.
    let mut b = header(0, 1);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 24).to_le_bytes());
    b.resize(b.len() + (1 << 24), 0);
    let e = err_of(&b, "items.gguf");
    assert!(e.contains("items in all") && e.contains("items.gguf"), "{e}");
}

#[test]
fn tensor_beyond_end_is_an_error() {
    let mut w = Writer::new();
    w.tensor_f32("t", &[4], &[1.; 4]);
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    // Cut the data section: the tensor now runs past the end.
    bytes.truncate(bytes.len() - 20);
    let e = err_of(&bytes, "cut.gguf");
    assert!(e.contains("beyond the end"), "{e}");
    // Truncated in the middle of the header.
    let e = err_of(&bytes[..50], "cuthdr.gguf");
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn absurd_dims_are_errors() {
    let mut b = header(1, 0);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b't');
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    assert!(err_of(&b, "dims.gguf").contains("invalid dims"));
}

#[test]
fn misaligned_tensor_data_is_an_error() {
    // `general.alignment` 1 let an F32 tensor start at an odd offset, which candle then read
    // as `&[f32]` (undefined behaviour; a panic under debug assertions). Reproduced with the
    // `gguf_header` fuzz target through `Config::from_gguf` (`rope_freqs.weight`).
    let mut b = header(1, 1);
    b.extend_from_slice(&17u64.to_le_bytes());
    b.extend_from_slice(b"general.alignment");
    b.extend_from_slice(&4u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b't');
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&2u64.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    // With alignment 1 the data starts right after the header, at 90: not a multiple of 4.
    assert_eq!(b.len(), 90);
    b.extend_from_slice(&[0; 8]);
    let e = err_of(&b, "align.gguf");
    assert!(e.contains("not 4-byte aligned"), "{e}");
    // In memory too.
    let e = Gguf::from_bytes("align.gguf", b).unwrap_err().to_string();
    assert!(e.contains("not 4-byte aligned"), "{e}");
}

/// A file with tensors `(name, relative offset)`, each 32 bytes of F32 data, and metadata `kv`
/// (key, GGUF type id, the value's bytes).
fn layout(tensors: &[(&str, u64)], kv: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut b = header(tensors.len() as u64, kv.len() as u64);
    let put_str = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    for (k, ty, v) in kv {
        put_str(&mut b, k);
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(v);
    }
    for (name, rel) in tensors {
        put_str(&mut b, name);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&8u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&rel.to_le_bytes());
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    let end = tensors.iter().map(|t| t.1 + 32).max().unwrap_or(0);
    b.resize(b.len() + end as usize, 0);
    b
}

fn rule_error(bytes: &[u8], name: &str) -> String {
    let p = tmp(name);
    std::fs::write(&p, bytes).unwrap();
    let g = Gguf::open(&p).expect("readable leniently");
    let e = g.check_llama_cpp().unwrap_err().to_string();
    assert!(e.contains(name), "error must name the file: {e}");
    e
}

/// What the writer writes passes llama.cpp's rules; each broken layout is refused with the rule.
#[test]
fn llama_cpp_rules_reject_each_broken_layout() {
    let ok = layout(&[("a", 0), ("b", 32)], &[]);
    let p = tmp("rules-ok.gguf");
    std::fs::write(&p, &ok).unwrap();
    Gguf::open(&p).unwrap().check_llama_cpp().unwrap();
    let w = tmp("rules-writer.gguf");
    let mut wr = Writer::new();
    wr.meta("general.alignment", Value::U32(64)).tensor_f32("x", &[3], &[1., 2., 3.]).tensor_f32("y", &[70], &[0.5; 70]);
    wr.write(&w).unwrap();
    Gguf::open(&w).unwrap().check_llama_cpp().unwrap();

    assert!(rule_error(&layout(&[("a", 32), ("b", 0)], &[]), "rules-order.gguf").contains("expected 0"));
    assert!(rule_error(&layout(&[("a", 0), ("b", 64)], &[]), "rules-gap.gguf").contains("back to back"));
    assert!(rule_error(&layout(&[("a", 32)], &[]), "rules-first.gguf").contains("expected 0"));
    let long = "t".repeat(64);
    assert!(rule_error(&layout(&[(&long, 0)], &[]), "rules-name.gguf").contains("at most 63"));
    assert!(rule_error(&layout(&[("a", 0)], &[("general.alignment", 10, &32u64.to_le_bytes())]), "rules-align.gguf").contains("u32"));
}
