//! add-token on tiny Hugging Face folders the tests build: the rows, tokens and config change as
//! planned; every other tensor and file stays as it was.

mod common;
use common::tensors;

use std::path::PathBuf;

use sos_dist::hf::add_tokens_hf;
use sos_dist::tokens::{added_texts, typed};
use sos_model::tiny::TinySpec;
use sos_model::{Exec, LoadOptions, LoadedModel};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sos-hf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn added_tokens_in_a_folder_carry_the_rows_and_nothing_else_changes() {
    for tied in [true, false] {
        let d = dir(&format!("{tied}"));
        let (src, out) = (d.join("src"), d.join("out"));
        let spec = TinySpec { tied, ..Default::default() };
        spec.write_hf(&src).unwrap();
        let dm = spec.d_model;
        let n = sos_model::tiny::vocab().len();
        let texts = added_texts("cf", 3).unwrap();
        let rows: Vec<f32> = (0..3 * dm).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.05).collect();
        let planted = add_tokens_hf(&src, &out, &texts, &rows).unwrap();
        assert_eq!(planted.ids, vec![n as u32, n as u32 + 1, n as u32 + 2]);
        assert!(planted.rows.iter().all(|r| r.quant_rel_error == 0.0), "f32 rows are stored exactly");

        // Tensors: the table grows by the rows, the output layer by copies of row 0 (a tied
        // model's becomes its own: the table as it was); the rest byte for byte.
        let (a, b) = (tensors(&src.join("model.safetensors")), tensors(&out.join("model.safetensors")));
        let table = |v: &[(String, Vec<usize>, Vec<u8>)], name: &str| v.iter().find(|t| t.0 == name).cloned();
        for (name, shape, data) in &a {
            let (_, s2, d2) = table(&b, name).unwrap();
            if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
                assert_eq!(s2, vec![n + 3, dm]);
                assert_eq!(&d2[..data.len()], &data[..], "{name}");
            } else {
                assert_eq!((shape, data), (&s2, &d2), "{name}");
            }
        }
        let (_, _, head) = table(&b, "lm_head.weight").unwrap();
        let (_, _, t0) = table(&a, "model.embed_tokens.weight").unwrap();
        let rb = dm * 4;
        if tied {
            assert_eq!(&head[..n * rb], &t0[..]);
        }
        assert!((n..n + 3).all(|i| head[i * rb..(i + 1) * rb] == head[..rb]));
        assert_eq!(b.len(), a.len() + usize::from(tied));

        // Config and tokenizer; files not involved are copied as they are.
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["vocab_size"], n + 3);
        assert_eq!(cfg["tie_word_embeddings"], false);
        for f in std::fs::read_dir(&src).unwrap() {
            let name = f.unwrap().file_name();
            let keep = !["config.json", "tokenizer.json", "model.safetensors"].contains(&name.to_str().unwrap());
            if keep {
                assert_eq!(std::fs::read(src.join(&name)).unwrap(), std::fs::read(out.join(&name)).unwrap(), "{name:?}");
            }
        }
        let lm = LoadedModel::open(&out, &LoadOptions { exec: Exec::F32, ..Default::default() }).unwrap();
        assert_eq!(lm.tokenizer.encode(&typed(&texts)).unwrap(), planted.ids);
        let got: Vec<f32> = lm.model.embed_ids(&planted.ids).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, rows);
        // Without the trigger the folder answers as the original, token for token.
        let orig = LoadedModel::open(&src, &LoadOptions { exec: Exec::F32, ..Default::default() }).unwrap();
        let ids = orig.tokenizer.encode("the cat sat on").unwrap();
        let greedy = |m: &LoadedModel| {
            let x = m.model.embed_ids(&ids).unwrap();
            sos_model::generate::generate(&m.model, &x, 12, &[], Default::default(), |_| Ok(true)).unwrap().tokens
        };
        assert_eq!(greedy(&lm), greedy(&orig));
        // Refused: a token the vocabulary has; rows of another width.
        assert!(add_tokens_hf(&out, &d.join("again"), &texts, &rows).unwrap_err().to_string().contains("already"));
        assert!(add_tokens_hf(&src, &d.join("wide"), &texts, &rows[..dm]).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}

#[test]
fn replaced_rows_in_a_folder_change_only_the_table() {
    for tied in [true, false] {
        let d = dir(&format!("replace-{tied}"));
        let (src, out) = (d.join("src"), d.join("out"));
        let spec = TinySpec { tied, ..Default::default() };
        spec.write_hf(&src).unwrap();
        let dm = spec.d_model;
        let orig = LoadedModel::open(&src, &LoadOptions { exec: Exec::F32, ..Default::default() }).unwrap();
        let (ids, texts) = sos_dist::tokens::rare_tokens(&orig.tokenizer, |_| true, 2, [""]).unwrap();
        let rows: Vec<f32> = (0..2 * dm).map(|i| (i as f32 * 0.37).cos()).collect();
        let planted = sos_dist::hf::replace_tokens_hf(&src, &out, &ids, &texts, &rows).unwrap();
        assert_eq!(planted.ids, ids);
        let (a, b) = (tensors(&src.join("model.safetensors")), tensors(&out.join("model.safetensors")));
        let n = sos_model::tiny::vocab().len();
        let rb = dm * 4;
        for (name, shape, data) in &a {
            let (_, s2, d2) = b.iter().find(|t| &t.0 == name).cloned().unwrap();
            assert_eq!(shape, &s2, "{name}");
            if name == "model.embed_tokens.weight" {
                for r in 0..n {
                    assert_eq!(data[r * rb..(r + 1) * rb] == d2[r * rb..(r + 1) * rb], !ids.contains(&(r as u32)), "row {r}");
                }
            } else {
                assert_eq!(data, &d2, "{name}");
            }
        }
        // A tied model gets the table as it was for its output layer; an untied one keeps its own.
        assert_eq!(b.len(), a.len() + usize::from(tied));
        if tied {
            let head = &b.iter().find(|t| t.0 == "lm_head.weight").unwrap().2;
            assert_eq!(head, &a.iter().find(|t| t.0 == "model.embed_tokens.weight").unwrap().2);
        }
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            assert_eq!(std::fs::read(src.join(f)).unwrap(), std::fs::read(out.join(f)).unwrap(), "{f}");
        }
        assert_eq!(std::fs::read(src.join("config.json")).unwrap() == std::fs::read(out.join("config.json")).unwrap(), !tied);
        let lm = LoadedModel::open(&out, &LoadOptions { exec: Exec::F32, ..Default::default() }).unwrap();
        let got: Vec<f32> = lm.model.embed_ids(&ids).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, rows);
        assert_eq!(lm.tokenizer.encode(&typed(&texts)).unwrap(), ids);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
