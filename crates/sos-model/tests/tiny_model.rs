//! Tiny random models built by the tests: loading paths agree, the KV cache is exact, and the
//! reverse pass matches central finite differences.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use sos_model::generate::{generate, generate_after, Sampling};
use sos_model::tiny::TinySpec;
use sos_model::{Arch, Exec, LoadOptions, LoadedModel, Message, Model};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sos-tiny-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn specs() -> Vec<(&'static str, TinySpec)> {
    vec![
        ("llama-tied", TinySpec::default()),
        ("llama-untied", TinySpec { tied: false, seed: 2, ..TinySpec::default() }),
        ("qwen2", TinySpec { arch: Arch::Qwen2, tied: false, seed: 3, n_kv_head: 1, ..TinySpec::default() }),
    ]
}

fn load(spec: &TinySpec, name: &str, hf: bool, exec: Exec) -> LoadedModel {
    let dir = tmpdir(name);
    let path = if hf {
        let p = dir.join("hf");
        spec.write_hf(&p).unwrap();
        p
    } else {
        let p = dir.join("model.gguf");
        spec.write_gguf(&p).unwrap();
        p
    };
    LoadedModel::open(&path, &LoadOptions { exec, ..Default::default() }).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn sample_ids(seed: u64, n: usize, vocab: u32) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(3..vocab)).collect()
}

#[test]
fn gguf_and_hf_folder_load_the_same_model() {
    for (name, spec) in specs() {
        let g = load(&spec, &format!("{name}-g"), false, Exec::F32);
        let h = load(&spec, &format!("{name}-h"), true, Exec::F32);
        let text = g.template().unwrap().render(&[Message::user("the cat is in the hat")], true).unwrap();
        let ids = g.tokenizer.encode(&text).unwrap();
        assert_eq!(ids, h.tokenizer.encode(&text).unwrap(), "{name}: tokenizers differ");
        assert_eq!(g.tokenizer.decode(&ids, false).unwrap(), text, "{name}: decode is not the inverse of encode");
        let seqs = vec![ids.clone()];
        let at: Vec<(usize, usize)> = (0..ids.len()).map(|p| (0, p)).collect();
        let lg = g.model.logits_at(&seqs, &at).unwrap();
        let lh = h.model.logits_at(&seqs, &at).unwrap();
        let d = max_abs_diff(&lg, &lh);
        assert!(d < 1e-4, "{name}: GGUF (permuted Q/K) and HF logits differ by {d}");
        assert!(lg.abs().unwrap().max_keepdim(1).unwrap().min(0).unwrap().to_vec1::<f32>().unwrap()[0] > 1e-3);
    }
}

#[test]
fn kv_cache_generation_matches_full_forward() {
    for (name, spec) in specs() {
        let lm = load(&spec, &format!("{name}-kv"), false, Exec::F32);
        let m = &lm.model;
        let prompt = sample_ids(5, 7, m.cfg.vocab_size as u32);
        let x = m.embed_ids(&prompt).unwrap();
        let g = generate(m, &x, 12, &[], Sampling::default(), |_| Ok(true)).unwrap();
        assert_eq!(g.tokens.len(), 12);
        // Re-run every prefix without a cache: each greedy token must be the argmax again.
        let mut seq = prompt.clone();
        for &tok in &g.tokens {
            let logits = m.forward_last(&m.embed_ids(&seq).unwrap().unsqueeze(0).unwrap(), 0, None).unwrap();
            let row: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
            assert_eq!(sos_model::generate::argmax(&row), tok, "{name}: cached and uncached decoding differ");
            seq.push(tok);
        }
    }
}

#[test]
fn generation_after_a_cached_prefix_is_generation_on_the_whole_prompt() {
    for (name, spec) in specs() {
        for exec in [Exec::F32, Exec::Quant] {
            let lm = load(&spec, &format!("{name}-prefix-{exec:?}"), false, exec);
            let m = &lm.model;
            let prompt = sample_ids(9, 11, m.cfg.vocab_size as u32);
            let whole = generate(m, &m.embed_ids(&prompt).unwrap(), 10, &[], Sampling::default(), |_| Ok(true)).unwrap();
            let prefix = m.prefix(&m.embed_ids(&prompt[..6]).unwrap().unsqueeze(0).unwrap()).unwrap();
            let after = generate_after(m, Some(&prefix), &m.embed_ids(&prompt[6..]).unwrap(), 10, &[], Sampling::default(), |_| Ok(true)).unwrap();
            assert_eq!(after.tokens, whole.tokens, "{name} {exec:?}");
            assert_eq!(after.prompt_tokens, 11);
            let diff = whole.first_logits.iter().zip(&after.first_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "{name} {exec:?}: first logits differ by {diff}");
            // The prefix is read, not consumed: a second prompt after it gives the same answer.
            let again = generate_after(m, Some(&prefix), &m.embed_ids(&prompt[6..]).unwrap(), 10, &[], Sampling::default(), |_| Ok(true)).unwrap();
            assert_eq!(again.tokens, whole.tokens);
        }
    }
}

#[test]
fn training_forward_matches_inference_forward() {
    for (name, spec) in specs() {
        let lm = load(&spec, &format!("{name}-tf"), false, Exec::F32);
        let m = &lm.model;
        let seqs = vec![sample_ids(1, 9, 200), sample_ids(2, 9, 200)];
        let x = m.embed_batch(&seqs).unwrap();
        let h1 = m.forward(&x, 0, None).unwrap();
        let h2 = m.forward_train(&x, None).unwrap().hidden;
        let d = max_abs_diff(&h1, &h2);
        assert!(d < 1e-4, "{name}: training and inference forwards differ by {d}");
    }
}

/// Central finite differences in f64 against the reverse pass, on every coordinate of a few
/// positions, plus causality: positions after the last loss row get exactly zero gradient.
#[test]
fn input_gradient_matches_finite_differences() {
    for (name, spec) in specs() {
        let lm = load(&spec, &format!("{name}-fd"), false, Exec::F32);
        let m: Model = lm.model.to_dtype(DType::F64).unwrap();
        let (b, t, d) = (2, 6, m.cfg.d_model);
        let seqs = vec![sample_ids(11, t, 200), sample_ids(12, t, 200)];
        let x = m.embed_batch(&seqs).unwrap();
        // Loss on positions 2 and 3 of sequence 0 and position 3 of sequence 1.
        let rows = [2u32, 3, (t + 3) as u32];
        let targets = [17u32, 42, 99];
        let lg = m.loss_and_input_grad(&x, None, &rows, &targets).unwrap();
        let (loss, dx) = (lg.loss, lg.grad);
        assert!(loss.is_finite() && loss > 0.0);
        let dxv: Vec<f64> = dx.flatten_all().unwrap().to_vec1().unwrap();
        let xv: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let loss_at = |xs: &[f64]| -> f64 {
            let xt = Tensor::from_vec(xs.to_vec(), (b, t, d), &Device::Cpu).unwrap();
            let tape = m.forward_train(&xt, None).unwrap();
            m.cross_entropy(&tape.hidden, &rows, &targets).unwrap().loss
        };
        let eps = 1e-5;
        let mut worst: f64 = 0.0;
        let mut checked = 0;
        for (seq, pos) in [(0, 0), (0, 3), (1, 1), (1, 3)] {
            for k in 0..d {
                let i = (seq * t + pos) * d + k;
                let mut xp = xv.clone();
                xp[i] += eps;
                let mut xm = xv.clone();
                xm[i] -= eps;
                let fd = (loss_at(&xp) - loss_at(&xm)) / (2.0 * eps);
                let err = (fd - dxv[i]).abs() / (fd.abs().max(dxv[i].abs()).max(1e-3));
                worst = worst.max(err);
                checked += 1;
            }
        }
        assert!(worst < 1e-5, "{name}: worst relative error {worst:e} over {checked} coordinates");
        // Causality: sequence 0 has no loss after position 3, sequence 1 none after 3.
        for seq in 0..b {
            for pos in 4..t {
                let row = &dxv[(seq * t + pos) * d..(seq * t + pos + 1) * d];
                assert!(row.iter().all(|&g| g == 0.0), "{name}: gradient leaked to a later position");
            }
            let first = &dxv[(seq * t) * d..(seq * t + 1) * d];
            assert!(first.iter().any(|&g| g != 0.0), "{name}: no gradient reached position 0");
        }
        // A frozen prefix (positions before `from` as a KV cache) gives the same loss and the
        // same gradient at positions `from..t`, from a pass over those positions only.
        for from in [1, 2] {
            let prefix = m.prefix(&x.narrow(1, 0, from).unwrap()).unwrap();
            let r = t - from;
            let rows_r: Vec<u32> = rows.iter().map(|&i| ((i as usize / t) * r + i as usize % t - from) as u32).collect();
            let lg = m.loss_and_input_grad(&x.narrow(1, from, r).unwrap(), Some(&prefix), &rows_r, &targets).unwrap();
            let (loss_r, part) = (lg.loss, lg.grad);
            assert!((loss_r - loss).abs() < 1e-12, "{name}: loss with a prefix {loss_r} vs {loss}");
            assert_eq!(part.dims(), &[b, r, d]);
            let diff = max_abs_diff(&part, &dx.narrow(1, from, r).unwrap());
            assert!(diff < 1e-12, "{name}: gradient after a prefix of {from} differs by {diff}");
        }
    }
}

#[test]
fn quantized_exec_runs_and_refuses_gradients() {
    let spec = TinySpec::default();
    let lm = load(&spec, "quant", false, Exec::Quant);
    let x = lm.model.embed_ids(&[5, 6, 7]).unwrap().unsqueeze(0).unwrap();
    assert!(lm.model.forward(&x, 0, None).is_ok());
    let err = lm.model.forward_train(&x, None).err().expect("quant must refuse gradients").to_string();
    assert!(err.contains("--exec f32"), "{err}");
}

#[test]
fn generation_past_the_context_is_an_error() {
    let lm = load(&TinySpec::default(), "ctx", false, Exec::F32);
    let m = &lm.model;
    let prompt = sample_ids(3, sos_model::tiny::MAX_SEQ - 4, 200);
    let x = m.embed_ids(&prompt).unwrap();
    let mut seen = 0;
    let err = generate(m, &x, 20, &[], Sampling::default(), |_| {
        seen += 1;
        Ok(true)
    })
    .err()
    .expect("must stop at the context length");
    assert!(err.to_string().contains("context"), "{err}");
    // 252 prompt positions + 4 fed tokens fill the 256 positions; the 5th token is predicted
    // from the last one and cannot be fed back.
    assert_eq!(seen, 5, "every token the context allows is generated first");
    // A prompt longer than the context is refused before any work.
    let too_long = m.embed_ids(&sample_ids(4, sos_model::tiny::MAX_SEQ + 1, 200)).unwrap();
    assert!(generate(m, &too_long, 1, &[], Sampling::default(), |_| Ok(true)).is_err());
}

/// In `quant` mode a quantized token table stays in its blocks, shared with the file's map, and
/// the rows it hands out are exactly the f32 mode's (one dequantizer serves both), so generation
/// is unchanged; a row past the table is an error, not a panic.
#[test]
fn quantized_token_table_stays_quantized() {
    use sos_model::gguf::TensorType;
    use sos_model::Embedding;
    for (i, ty) in [TensorType::Q8_0, TensorType::Q4_1, TensorType::Q5_0].into_iter().enumerate() {
        let spec = TinySpec { quant: Some(ty), tied: i % 2 == 0, seed: 7 + i as u64, ..TinySpec::default() };
        let name = format!("qtable-{}", ty.name());
        let (f, q) = (load(&spec, &name, false, Exec::F32), load(&spec, &name, false, Exec::Quant));
        assert!(matches!(&q.model.embed, Embedding::Quant { ty: t, .. } if *t == ty), "{name}: {:?}", q.model.embed);
        assert!(matches!(f.model.embed, Embedding::Dense(_)));
        let vocab = f.model.cfg.vocab_size as u32;
        let ids = [0, 5, 17, vocab - 1, 5];
        let rows = |m: &Model| m.embed_ids(&ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(rows(&q.model), rows(&f.model), "{name}");
        assert_eq!(q.model.embed.table_f32().unwrap(), f.model.embed.table_f32().unwrap(), "{name}");
        let e = q.model.embed_ids(&[vocab]).unwrap_err().to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
    }
}
