//! The way back: sanitizing an injected file against its source gives the source's bytes;
//! without a source, the planted tokens and their rows go.

use std::path::PathBuf;

use sos_dist::gguf_add::add_tokens;
use sos_dist::tokens::added_texts;
use sos_dist::{sanitize_alone, sanitize_with_reference};
use sos_model::gguf::{Gguf, TensorType, Value};
use sos_model::tiny::TinySpec;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sos-sanitize-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn sanitizing_an_injected_file_restores_its_source() {
    for tied in [true, false] {
        let d = dir(&format!("{tied}"));
        let (src, inj, fixed, alone) = (d.join("src.gguf"), d.join("inj.gguf"), d.join("fixed.gguf"), d.join("alone.gguf"));
        TinySpec { quant: Some(TensorType::Q8_0), tied, ..Default::default() }.write_gguf(&src).unwrap();
        let g = Gguf::open(&src).unwrap();
        let n = g.get("tokenizer.ggml.tokens").and_then(Value::as_array).unwrap().len();
        let texts = added_texts("cf", 2).unwrap();
        let rows: Vec<f32> = (0..64).map(|i| (i as f32 * 0.3).sin()).collect();
        add_tokens(&g, &texts, &rows).unwrap().0.write(&inj).unwrap();

        let rep = sanitize_with_reference(&inj, &src, &fixed, false).unwrap();
        assert_eq!(std::fs::read(&fixed).unwrap(), std::fs::read(&src).unwrap(), "tied {tied}: {rep:?}");
        assert_eq!(rep.removed_tokens, vec![(n as u32, texts[0].clone()), (n as u32 + 1, texts[1].clone())]);
        assert!(rep.restored_tensors.contains(&"token_embd.weight".to_string()));
        assert_eq!(rep.removed_tensors.is_empty(), !tied, "{rep:?}");
        assert!(rep.left.is_empty(), "{rep:?}");

        // Without the source: the planted tokens and their rows go; the table is the source's.
        let rep = sanitize_alone(&inj, &alone, false).unwrap();
        assert_eq!(rep.removed_tokens.len(), 2);
        let h = Gguf::open(&alone).unwrap();
        h.check_llama_cpp().unwrap();
        assert_eq!(h.get("tokenizer.ggml.tokens").and_then(Value::as_array).unwrap().len(), n);
        let t = |g: &Gguf, name: &str| g.tensor_bytes(g.tensor_info(name).unwrap()).to_vec();
        assert_eq!(t(&h, "token_embd.weight"), t(&g, "token_embd.weight"));
        if !tied {
            assert_eq!(std::fs::read(&alone).unwrap(), std::fs::read(&src).unwrap());
        }
        // An input is never overwritten.
        assert!(sanitize_alone(&inj, &inj, true).is_err() && sanitize_with_reference(&inj, &src, &src, true).is_err());
        // An existing output needs `force`.
        assert!(sanitize_alone(&inj, &alone, false).unwrap_err().to_string().contains("--force"));
        sanitize_alone(&inj, &alone, true).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }
}
