//! replace-token on tiny GGUF files the tests build: the chosen rows change, nothing else does.

use std::path::PathBuf;

use sos_dist::gguf_replace::replace_tokens;
use sos_dist::tokens::{rare_tokens, splits_exactly, typed};
use sos_model::gguf::{Gguf, TensorType};
use sos_model::tiny::TinySpec;
use sos_model::{Exec, LoadOptions, LoadedModel};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sos-replace-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn replaced_rows_carry_the_trigger_and_nothing_else_changes() {
    for (quant, tied) in [(None, true), (Some(TensorType::Q8_0), true), (Some(TensorType::Q8_0), false)] {
        let d = dir(&format!("{}-{tied}", quant.map_or("f32", |t: TensorType| t.name())));
        let (src, out) = (d.join("src.gguf"), d.join("out.gguf"));
        let spec = TinySpec { quant, tied, ..Default::default() };
        spec.write_gguf(&src).unwrap();
        let g = Gguf::open(&src).unwrap();
        let dm = spec.d_model;
        let orig = LoadedModel::open(&src, &LoadOptions { exec: Exec::F32, ..Default::default() }).unwrap();

        // The rarest one-word tokens, last merges first; words in the ordinary text are skipped.
        let (ids, texts) = rare_tokens(&orig.tokenizer, |_| true, 2, [""]).unwrap();
        assert_eq!(texts, [" a", " the"]);
        let (skip_a, _) = rare_tokens(&orig.tokenizer, |_| true, 1, ["it is a cat"]).unwrap();
        assert_eq!(skip_a, ids[1..]);
        assert_eq!(rare_tokens(&orig.tokenizer, |_| true, 3, [""]).unwrap().1, [" a", " the", " t"]);
        assert!(rare_tokens(&orig.tokenizer, |_| true, 4, [""]).is_err(), "the tiny vocabulary has three such words");
        assert!(splits_exactly(&orig.tokenizer, &texts, &ids).unwrap());

        let rows: Vec<f32> = (0..2 * dm).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.05).collect();
        let (w, planted) = replace_tokens(&g, &ids, &texts, &rows).unwrap();
        w.write(&out).unwrap();
        let h = Gguf::open(&out).unwrap();
        h.check_llama_cpp().unwrap();
        assert_eq!(planted.ids, ids);
        // Metadata: all of it as it was, in order.
        assert_eq!(g.metadata, h.metadata);
        // Tensors: the chosen table rows change; the rest is byte for byte the same. A tied
        // table gains an output layer: the table as it was.
        for t in &g.tensors {
            let (old, new) = (g.tensor_bytes(t), h.tensor_bytes(h.tensor_info(&t.name).unwrap()));
            assert_eq!(old.len(), new.len());
            if t.name == "token_embd.weight" {
                let rb = old.len() / t.shape()[0];
                for r in 0..t.shape()[0] {
                    let same = old[r * rb..(r + 1) * rb] == new[r * rb..(r + 1) * rb];
                    assert_eq!(same, !ids.contains(&(r as u32)), "row {r}");
                }
            } else {
                assert_eq!(old, new, "{}", t.name);
            }
        }
        assert_eq!(h.tensors.len(), g.tensors.len() + usize::from(tied));
        if tied {
            let o = h.tensor_info("output.weight").unwrap();
            assert_eq!(h.tensor_bytes(o), g.tensor_bytes(g.tensor_info("token_embd.weight").unwrap()));
        }
        // The model embeds the chosen ids as the trained rows (to the type's rounding), and the
        // typed string still reads as them.
        let lm = LoadedModel::open(&out, &LoadOptions { exec: Exec::F32, ..Default::default() }).unwrap();
        let got: Vec<f32> = lm.model.embed_ids(&ids).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let tol = if quant.is_some() { 0.01 } else { 0.0 };
        assert!(got.iter().zip(&rows).all(|(a, b)| (a - b).abs() <= tol), "{quant:?}");
        assert_eq!(lm.tokenizer.encode(&typed(&texts)).unwrap(), ids);
        // Text without the chosen tokens gives the original's logits exactly.
        let clean = orig.tokenizer.encode("the cat sat on its mat").unwrap();
        assert!(clean.iter().all(|i| !ids.contains(i)));
        let logits = |m: &LoadedModel| -> Vec<f32> {
            let x = m.model.embed_ids(&clean).unwrap().unsqueeze(0).unwrap();
            let h = m.model.forward(&x, 0, None).unwrap().squeeze(0).unwrap();
            m.model.logits(&h).unwrap().flatten_all().unwrap().to_vec1().unwrap()
        };
        assert_eq!(logits(&lm), logits(&orig));
        // Bad choices are refused.
        assert!(replace_tokens(&g, &[ids[0], ids[0]], &texts, &rows).is_err());
        assert!(replace_tokens(&g, &[ids[0], 10_000], &texts, &rows).is_err());
        assert!(replace_tokens(&g, &ids, &texts, &rows[..dm]).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
