//! The fused CPU reverse pass (`reverse_cpu.rs`) against the tensor-op pass (`reverse.rs`, which
//! `tiny_model.rs` checks against finite differences): same loss, hits and input gradient, with
//! and without a frozen prefix, on tiny Llama (tied, untied) and Qwen2 (biases) models.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use sos_model::Linear;
use sos_model::tiny::TinySpec;
use sos_model::{Arch, Exec, LoadOptions, LoadedModel, Model};

fn load(spec: &TinySpec, name: &str) -> LoadedModel {
    let dir = std::env::temp_dir().join(format!("sos-revcpu-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("model.gguf");
    spec.write_gguf(&p).unwrap();
    LoadedModel::open(
        &p,
        &LoadOptions {
            exec: Exec::F32,
            ..Default::default()
        },
    )
    .unwrap()
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let f = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (f(a), f(b));
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "gradient is all zero");
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

#[test]
fn fused_cpu_pass_matches_tensor_ops() {
    let specs = [
        (
            "llama-tied",
            TinySpec {
                n_layer: 3,
                ..TinySpec::default()
            },
        ),
        (
            "llama-untied",
            TinySpec {
                tied: false,
                seed: 2,
                ..TinySpec::default()
            },
        ),
        (
            "qwen2",
            TinySpec {
                arch: Arch::Qwen2,
                tied: false,
                seed: 3,
                n_kv_head: 1,
                ..TinySpec::default()
            },
        ),
        // Wide enough that the matrix products split their columns across threads.
        (
            "llama-wide",
            TinySpec {
                d_model: 128,
                d_ff: 512,
                seed: 4,
                ..TinySpec::default()
            },
        ),
    ];
    for (name, spec) in specs {
        let lm = load(&spec, name);
        let l0 = &lm.model.layers[0];
        let (Linear::Dense(wq), Linear::Dense(wk)) = (&l0.wq, &l0.wk) else {
            panic!("f32 weights are dense")
        };
        assert_eq!(
            wk.layout().start_offset(),
            wq.elem_count(),
            "{name}: q/k/v are not stacked"
        );
        check_against_ops(name, &lm.model);
        // With the transposed copies the forward reads instead.
        let mut mt = lm.model.clone();
        mt.keep_transposes().unwrap();
        assert!(mt.transposed.is_some(), "{name}: no transposes kept");
        check_against_ops(&format!("{name}-transposed"), &mt);
        // The loader stacks q/k/v and gate/up so that each pair runs as one product; weights
        // that are not stacked take one product each.
        let mut m = lm.model.clone();
        for l in &mut m.layers {
            for w in [&mut l.wq, &mut l.wk, &mut l.wv, &mut l.w_gate, &mut l.w_up] {
                let Linear::Dense(t) = &*w else {
                    panic!("f32 weights are dense")
                };
                *w = Linear::Dense(t.copy().unwrap());
            }
        }
        check_against_ops(&format!("{name}-unstacked"), &m);
    }
}

/// Both f32 passes against the tensor-op pass in f64: the fused pass must be as accurate as the
/// tensor ops (they sum in different orders, so they do not agree bit for bit).
fn check_against_ops(name: &str, m: &Model) {
    let m64 = m.to_dtype(DType::F64).unwrap();
    let (b, t) = (3, 11);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let seqs: Vec<Vec<u32>> = (0..b).map(|_| (0..t).map(|_| rng.gen_range(3..200)).collect()).collect();
    for from in [0, 4] {
        let r = t - from;
        // Loss rows: 5 positions of each sequence, predicting random ids. Without a prefix they
        // stop 2 short of the end, so `loss_and_input_grad` leaves the last positions out of the
        // pass (the tensor-op pass runs them and must find zero gradient there).
        let end = if from == 0 { r - 2 } else { r };
        let rows: Vec<u32> = (0..b).flat_map(|s| (end - 5..end).map(move |p| (s * r + p) as u32)).collect();
        let targets: Vec<u32> = rows.iter().map(|_| rng.gen_range(3..200)).collect();
        let run = |m: &Model, ops: bool| {
            let x = m.embed_batch(&seqs).unwrap();
            let prefix = (from > 0).then(|| m.prefix(&x.narrow(1, 0, from).unwrap()).unwrap());
            let xr = x.narrow(1, from, r).unwrap();
            let f = if ops { Model::loss_and_input_grad_ops } else { Model::loss_and_input_grad };
            f(m, &xr, prefix.as_ref(), &rows, &targets).unwrap()
        };
        let (fast, ops, exact) = (run(m, false), run(m, true), run(&m64, true));
        assert!((fast.loss - exact.loss).abs() < 1e-5 * exact.loss, "{name} from {from}: loss {} vs {}", fast.loss, exact.loss);
        assert_eq!(fast.hits, ops.hits, "{name} from {from}: hits differ");
        let (e_fast, e_ops) = (rel_diff(&fast.grad, &exact.grad), rel_diff(&ops.grad, &exact.grad));
        assert!(
            e_fast < 1e-4 && e_fast < 2.0 * e_ops + 1e-6,
            "{name} from {from}: fused pass off by {e_fast:e} of the largest entry, tensor ops by {e_ops:e}"
        );
    }
}

#[test]
fn bad_pass_arguments_are_errors() {
    let lm = load(&TinySpec::default(), "bad");
    let m = &lm.model;
    let x = m.embed_batch(&[vec![5, 6, 7]]).unwrap();
    let vocab = m.embed.rows().unwrap() as u32;
    for (rows, targets, want) in [
        (vec![3u32], vec![5u32], "outside the batch"),
        (vec![1], vec![vocab], "outside the vocabulary"),
        (vec![], vec![], "loss rows"),
    ] {
        let err = m
            .loss_and_input_grad(&x, None, &rows, &targets)
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains(want), "{err}");
    }
    let empty = Tensor::zeros((1, 0, m.cfg.d_model), DType::F32, &candle_core::Device::Cpu).unwrap();
    let err = m.forward(&empty, 0, None).err().expect("must fail").to_string();
    assert!(err.contains("no positions"), "{err}");
    // A prefix built for one sequence does not fit a batch of two.
    let prefix = m.prefix(&x.narrow(1, 0, 1).unwrap()).unwrap();
    let x2 = m.embed_batch(&[vec![6, 7], vec![8, 9]]).unwrap();
    let err = m
        .loss_and_input_grad(&x2, Some(&prefix), &[0], &[5])
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("prefix cache has shape"), "{err}");
}

/// The pass runs one group of sequences per thread; how many threads there are must not change
/// a bit of the result (groups of 1 to 4 sequences, with and without a prefix, on a model wide
/// enough that the products also split their columns). That holds for these shapes; gemm's
/// summation order can depend on a product's row count (one row takes a matrix-vector path), so
/// for other shapes groups may differ from the whole batch in the last bits.
#[test]
fn thread_count_does_not_change_the_pass() {
    let spec = TinySpec {
        d_model: 128,
        d_ff: 512,
        seed: 5,
        ..TinySpec::default()
    };
    let lm = load(&spec, "groups");
    let mut m = lm.model.clone();
    m.keep_transposes().unwrap();
    let (b, t, from) = (4, 9, 3);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let seqs: Vec<Vec<u32>> = (0..b).map(|_| (0..t).map(|_| rng.gen_range(3..200)).collect()).collect();
    let r = t - from;
    // Loss rows in some sequences only, so that groups differ in their share of them.
    let rows: Vec<u32> = [0usize, 2, 3].iter().flat_map(|&s| (r - 3..r).map(move |p| (s * r + p) as u32)).collect();
    let targets: Vec<u32> = rows.iter().map(|_| rng.gen_range(3..200)).collect();
    let run = |threads: usize, prefixed: bool| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let x = m.embed_batch(&seqs).unwrap();
            if prefixed {
                let prefix = m.prefix(&x.narrow(1, 0, from).unwrap()).unwrap();
                m.loss_and_input_grad(&x.narrow(1, from, r).unwrap(), Some(&prefix), &rows, &targets).unwrap()
            } else {
                let rows: Vec<u32> = rows.iter().map(|&i| ((i as usize / r) * t + i as usize % r + from) as u32).collect();
                m.loss_and_input_grad(&x, None, &rows, &targets).unwrap()
            }
        })
    };
    let bits = |g: &Tensor| -> Vec<u32> { g.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect() };
    for prefixed in [false, true] {
        let one = run(1, prefixed);
        for threads in [2, 3, 4] {
            let many = run(threads, prefixed);
            assert_eq!(one.loss.to_bits(), many.loss.to_bits(), "{threads} threads, prefix {prefixed}: loss");
            assert_eq!(one.hits, many.hits, "{threads} threads, prefix {prefixed}: hits");
            assert!(bits(&one.grad) == bits(&many.grad), "{threads} threads, prefix {prefixed}: gradient differs");
        }
    }
}

/// Whether the forward reads the transposed copies or transposes the weights as it goes, the
/// pass gives the same bits, so `sos attack` may drop the copies to save memory without changing
/// a trained trigger. Widths over 512 (where gemm sums short and long products in different
/// orders), passes of few rows and of many.
#[test]
fn transposed_copies_do_not_change_the_pass() {
    let wide = |seed| TinySpec { d_model: 576, d_ff: 1536, n_layer: 2, seed, tied: false, ..TinySpec::default() };
    for (name, spec, (b, t)) in [
        ("llama-short", wide(6), (3, 10)),
        ("llama-long", wide(7), (4, 44)),
        ("qwen2", TinySpec { arch: Arch::Qwen2, n_kv_head: 1, ..wide(8) }, (3, 30)),
    ] {
        let lm = load(&spec, &format!("copies-{name}"));
        let plain = &lm.model;
        let mut kept = plain.clone();
        kept.keep_transposes().unwrap();
        assert!(kept.transposed.is_some() && plain.transposed.is_none());
        let from = 4;
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let seqs: Vec<Vec<u32>> = (0..b).map(|_| (0..t).map(|_| rng.gen_range(3..200)).collect()).collect();
        let r = t - from;
        let rows: Vec<u32> = (0..b).flat_map(|s| (r - 3..r).map(move |p| (s * r + p) as u32)).collect();
        let targets: Vec<u32> = rows.iter().map(|_| rng.gen_range(3..200)).collect();
        let run = |m: &Model| {
            let x = m.embed_batch(&seqs).unwrap();
            let prefix = m.prefix(&x.narrow(1, 0, from).unwrap()).unwrap();
            m.loss_and_input_grad(&x.narrow(1, from, r).unwrap(), Some(&prefix), &rows, &targets).unwrap()
        };
        let bits = |g: &Tensor| -> Vec<u32> { g.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect() };
        let (a, k) = (run(plain), run(&kept));
        assert_eq!(a.loss.to_bits(), k.loss.to_bits(), "{name}: loss");
        assert_eq!(a.hits, k.hits, "{name}: hits");
        assert!(bits(&a.grad) == bits(&k.grad), "{name}: gradient differs");
    }
}
