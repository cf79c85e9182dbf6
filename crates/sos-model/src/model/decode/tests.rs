//! The decode step against itself: any crew, any batch, gives one thread's bits.

use super::*;
use crate::format::gguf::TensorType;
use crate::tiny::TinySpec;
use crate::{Arch, LoadOptions, LoadedModel};

fn tiny(spec: &TinySpec, name: &str) -> Model {
    let dir = std::env::temp_dir().join(format!("sos-decode-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    spec.write_gguf(&path).unwrap();
    LoadedModel::open(&path, &LoadOptions::default()).unwrap().model
}

/// The model with every dense weight replaced by blocks of the types `tys` (in turn, weight
/// after weight), run by our kernels.
fn quantized(m: &Model, tys: &[TensorType]) -> Model {
    let mut turn = tys.iter().cycle();
    let mut q = |l: &Linear| match l {
        Linear::Dense(w) => {
            let ty = *turn.next().unwrap();
            let (rows, cols) = w.dims2().unwrap();
            let t = candle_core::quantized::QTensor::quantize(&w.contiguous().unwrap(), ty.to_candle()).unwrap();
            Linear::Kernel(QWeight::new(ty, rows, cols, &t.data().unwrap()).unwrap())
        }
        other => other.clone(),
    };
    let mut m = m.clone();
    for l in &mut m.layers {
        for w in [&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.w_gate, &mut l.w_up, &mut l.w_down] {
            *w = q(w);
        }
    }
    m.lm_head = q(&m.lm_head);
    m.exec = Exec::Quant;
    m
}

/// Logits of `steps` greedy decode steps after a short prompt, on `threads` threads.
fn decode(m: &Model, threads: usize, steps: usize) -> Vec<Vec<f32>> {
    decode_backing_off(m, threads, steps, 0).0
}

/// `decode`, the first `backoff` steps alone as after a slow crew step; and the backoff left.
fn decode_backing_off(m: &Model, threads: usize, steps: usize, backoff: usize) -> (Vec<Vec<f32>>, usize) {
    let mut kv = KvCache::new(m.cfg.n_layer);
    let prompt = m.embed_ids(&[5, 9, 14, 3]).unwrap().unsqueeze(0).unwrap();
    m.forward_last(&prompt, 0, Some(&mut kv)).unwrap();
    let mut w = DecodeWeights::new(m).unwrap();
    assert!(w.threads >= 1);
    w.threads = threads;
    // The crew under test, however small the model.
    w.alone = false;
    w.backoff.store(backoff, Ordering::Relaxed);
    let mut cache = DecodeCache::from_prefill(m, &kv, steps).unwrap();
    let mut out = Vec::new();
    let mut next = 7u32;
    for _ in 0..steps {
        let x: Vec<f32> = m.embed_ids(&[next]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let logits = m.decode_step(&w, &mut cache, &x).unwrap();
        next = crate::generate::argmax(&logits);
        out.push(logits);
    }
    (out, w.backoff.load(Ordering::Relaxed))
}

/// Logits of `steps` greedy decode steps after each of `prompts`, all stepped together on
/// `threads` threads, or with `solo` as a model whose weights cannot be split by rows steps
/// (each sequence's products whole on the pool).
fn decode_together(m: &Model, threads: usize, solo: bool, prompts: &[&[u32]], steps: usize) -> Vec<Vec<Vec<f32>>> {
    let mut w = DecodeWeights::new(m).unwrap();
    w.threads = threads;
    w.alone = false;
    w.splits = !solo;
    let mut caches: Vec<DecodeCache> = prompts
        .iter()
        .map(|p| {
            let mut kv = KvCache::new(m.cfg.n_layer);
            m.forward_last(&m.embed_ids(p).unwrap().unsqueeze(0).unwrap(), 0, Some(&mut kv)).unwrap();
            DecodeCache::from_prefill(m, &kv, steps).unwrap()
        })
        .collect();
    let mut next = vec![7u32; prompts.len()];
    let mut out = vec![Vec::new(); prompts.len()];
    for _ in 0..steps {
        let xs: Vec<f32> = m.embed_ids(&next).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let logits = m.decode_steps(&w, &mut caches.iter_mut().collect::<Vec<_>>(), &xs).unwrap();
        for (s, row) in logits.chunks_exact(m.cfg.vocab_size).enumerate() {
            next[s] = crate::generate::argmax(row);
            out[s].push(row.to_vec());
        }
    }
    out
}

/// Sequences of different lengths stepped together get, bit for bit, what each gets alone:
/// every product is the dot product a single sequence's step computes.
#[test]
fn sequences_stepped_together_decode_as_alone() {
    let wide = TinySpec { d_model: 256, d_ff: 512, seed: 6, arch: Arch::Qwen2, tied: false, n_kv_head: 1, ..TinySpec::default() };
    let dense = tiny(&TinySpec::default(), "together");
    let models = [
        ("f32", dense.clone()),
        ("q4_1", quantized(&dense, &[TensorType::Q4_1])),
        ("q4_k/q6_k", quantized(&tiny(&wide, "together-wide"), &[TensorType::Q4K, TensorType::Q6K])),
    ];
    let prompts: [&[u32]; 3] = [&[5, 9, 14, 3], &[2, 8], &[11, 4, 6, 1, 12, 13, 10]];
    for (label, m) in models {
        let alone: Vec<Vec<Vec<f32>>> = prompts.iter().map(|p| decode_together(&m, 1, true, &[p], 5).remove(0)).collect();
        assert_ne!(alone[0], alone[1], "{label}: the prompts should differ");
        for (threads, solo) in [(1, true), (1, false), (2, false), (3, false)] {
            assert_eq!(decode_together(&m, threads, solo, &prompts, 5), alone, "{label}: {threads} threads, solo {solo}");
        }
    }
    // A sequence whose cache is full fails the step, and says which length it reached.
    let m = &dense;
    let w = DecodeWeights::new(m).unwrap();
    let mut kv = KvCache::new(m.cfg.n_layer);
    m.forward_last(&m.embed_ids(&[1, 2]).unwrap().unsqueeze(0).unwrap(), 0, Some(&mut kv)).unwrap();
    let (mut a, mut b) = (DecodeCache::from_prefill(m, &kv, 4).unwrap(), DecodeCache::from_prefill(m, &kv, 0).unwrap());
    let xs = m.embed_ids(&[3, 3]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let err = m.decode_steps(&w, &mut [&mut a, &mut b], &xs).unwrap_err().to_string();
    assert!(err.contains("3 positions"), "{err}");
    assert!(m.decode_steps(&w, &mut [&mut a], &xs).is_err(), "two inputs for one sequence");
}

/// A crew of any size computes exactly what one thread computes: every row and head is the
/// same arithmetic, only placed on another thread.
#[test]
fn crew_decodes_bit_identically_to_one_thread() {
    let specs = [
        ("llama", TinySpec::default()),
        ("qwen2", TinySpec { arch: Arch::Qwen2, tied: false, seed: 3, n_kv_head: 1, ..TinySpec::default() }),
    ];
    // K-quant blocks hold 256 values: rows of 256 and 512. Q4_K and Q6_K weights take turns,
    // so that products of both types share one quantized vector.
    let wide = TinySpec { d_model: 256, d_ff: 512, seed: 6, ..TinySpec::default() };
    let k_mix = [TensorType::Q4K, TensorType::Q6K, TensorType::Q6K];
    for (name, spec) in specs {
        let dense = tiny(&spec, name);
        let k = tiny(&TinySpec { arch: spec.arch, tied: spec.tied, n_kv_head: spec.n_kv_head, ..wide.clone() }, &format!("{name}-wide"));
        let models = [
            ("f32", dense.clone()),
            ("q4_1", quantized(&dense, &[TensorType::Q4_1])),
            ("q8_0", quantized(&dense, &[TensorType::Q8_0])),
            ("q4_k/q6_k", quantized(&k, &k_mix)),
        ];
        for (label, m) in models {
            let w = DecodeWeights::new(&m).unwrap();
            assert_eq!(w.threads, rayon::current_num_threads().min(MAX_CREW), "{name} {label}: crew refused");
            // The narrow models step alone unless told otherwise; the wide ones have 1.3 M weights.
            assert_eq!(w.alone, !label.contains("_k"), "{name} {label}");
            let solo = decode(&m, 1, 6);
            assert!(solo.iter().flatten().all(|v| v.is_finite()));
            for threads in [2, 3, 5] {
                assert_eq!(decode(&m, threads, 6), solo, "{name} {label}: {threads} threads differ from one");
            }
            // Steps that back off from a busy machine run alone, then the crew takes over.
            assert_eq!(decode_backing_off(&m, 2, 6, 4).0, solo, "{name} {label}: backing off changed the logits");
            assert_eq!(decode_backing_off(&m, 2, 3, 4), (solo[..3].to_vec(), 1), "{name} {label}: one step alone per step backed off");
        }
    }
}
