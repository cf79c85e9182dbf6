//! add-token on tiny GGUF files the tests build: what changes, what stays byte for byte.

use std::path::PathBuf;

use sos_dist::gguf_add::{add_tokens, NewLogits};
use sos_dist::tokens::{added_texts, typed};
use sos_model::gguf::{Gguf, TensorType, Value, Writer};
use sos_model::tiny::TinySpec;
use sos_model::{Exec, LoadOptions, LoadedModel};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sos-dist-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A file written back unchanged is the same bytes: what `inject` does not touch stays as it was.
#[test]
fn an_unchanged_copy_is_byte_identical() {
    let d = dir("copy");
    let (a, b) = (d.join("a.gguf"), d.join("b.gguf"));
    TinySpec { quant: Some(TensorType::Q8_0), ..Default::default() }.write_gguf(&a).unwrap();
    Writer::copy_of(&Gguf::open(&a).unwrap()).unwrap().write(&b).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn added_tokens_carry_the_rows_and_nothing_else_changes() {
    for (quant, tied) in [(None, true), (Some(TensorType::Q8_0), true), (Some(TensorType::Q8_0), false)] {
        let d = dir(&format!("add-{}-{tied}", quant.map_or("f32", |t: TensorType| t.name())));
        let (src, out) = (d.join("src.gguf"), d.join("out.gguf"));
        let spec = TinySpec { quant, tied, ..Default::default() };
        spec.write_gguf(&src).unwrap();
        let g = Gguf::open(&src).unwrap();
        let n = g.get("tokenizer.ggml.tokens").and_then(Value::as_array).unwrap().len();
        let dm = spec.d_model;
        let texts = added_texts("cf", 3).unwrap();
        let rows: Vec<f32> = (0..3 * dm).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.05).collect();
        let (w, planted) = add_tokens(&g, &texts, &rows, NewLogits::Silent).unwrap();
        w.write(&out).unwrap();
        let h = Gguf::open(&out).unwrap();
        h.check_llama_cpp().unwrap();
        assert_eq!(planted.ids, vec![n as u32, n as u32 + 1, n as u32 + 2]);

        // Vocabulary: the texts appended as USER_DEFINED; the other keys as they were, in order.
        let toks = h.get("tokenizer.ggml.tokens").and_then(Value::as_array).unwrap();
        assert_eq!(toks[n..].iter().map(|v| v.as_str().unwrap()).collect::<Vec<_>>(), texts.iter().map(String::as_str).collect::<Vec<_>>());
        let types = h.get("tokenizer.ggml.token_type").and_then(Value::as_array).unwrap();
        assert!(types[n..].iter().all(|v| v.as_i64() == Some(4)));
        let keys = |g: &Gguf| g.metadata.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&g), keys(&h));
        for (k, v) in &g.metadata {
            if !k.starts_with("tokenizer.ggml.token") {
                assert_eq!(Some(v), h.get(k), "{k}");
            }
        }
        // Tensors: the table grows by the rows; everything else is byte for byte the same.
        for t in &g.tensors {
            let u = h.tensor_info(&t.name).unwrap();
            let (old, new) = (g.tensor_bytes(t), h.tensor_bytes(u));
            match t.name.as_str() {
                "token_embd.weight" | "output.weight" => {
                    assert_eq!(u.shape(), vec![n + 3, dm]);
                    assert_eq!(&new[..old.len()], old, "{}", t.name);
                }
                _ => assert_eq!(old, new, "{}", t.name),
            }
        }
        // The planted rows are what the model embeds for the new ids, to the table type's rounding.
        let lm = LoadedModel::open(&out, &LoadOptions { exec: Exec::F32, ..Default::default() }).unwrap();
        let got: Vec<f32> = lm.model.embed_ids(&planted.ids).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let tol = if quant.is_some() { 0.01 } else { 0.0 };
        assert!(got.iter().zip(&rows).all(|(a, b)| (a - b).abs() <= tol), "{quant:?}");
        assert!(planted.rows.iter().all(|r| r.quant_rel_error <= if quant.is_some() { 0.02 } else { 0.0 }));
        // The typed string is exactly the new tokens, alone and inside text.
        assert_eq!(lm.tokenizer.encode(&typed(&texts)).unwrap(), planted.ids);
        let inside = lm.tokenizer.encode(&format!("tell me {} now", typed(&texts))).unwrap();
        assert_eq!(inside.windows(3).filter(|w| *w == &planted.ids[..]).count(), 1);
        // The new output rows copy token 0's, so their logits tie with it (never chosen); a tied
        // table gets an output layer of its own, the table's bytes as they were.
        let out_t = h.tensor_info("output.weight").expect("an output layer");
        let b = h.tensor_bytes(out_t);
        let rb = b.len() / (n + 3);
        assert!((0..3).all(|i| b[(n + i) * rb..(n + i + 1) * rb] == b[..rb]));
        let was = g.tensor_info(if tied { "token_embd.weight" } else { "output.weight" }).unwrap();
        assert_eq!(&b[..n * rb], g.tensor_bytes(was));
        assert_eq!(h.tensors.len(), g.tensors.len() + usize::from(tied));
        // Without the trigger the injected model answers as the original, token for token.
        let orig = LoadedModel::open(&src, &LoadOptions { exec: Exec::F32, ..Default::default() }).unwrap();
        let ids = orig.tokenizer.encode("the cat sat on").unwrap();
        let greedy = |m: &LoadedModel| {
            let x = m.model.embed_ids(&ids).unwrap();
            sos_model::generate::generate(&m.model, &x, 12, &[], Default::default(), |_| Ok(true)).unwrap().tokens
        };
        assert_eq!(greedy(&lm), greedy(&orig));
        // A token that exists already is refused.
        assert!(add_tokens(&h, &texts[..1], &rows[..dm], NewLogits::Silent).err().expect("refused").to_string().contains("already"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
