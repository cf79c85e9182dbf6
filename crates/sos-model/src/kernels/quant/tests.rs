//! The kernels against the dequantized product, ggml's activation rules, and each other.

use super::act::{quantize_q8, round_half_even};
use super::dispatch::{dot, dotn, dotn2, dotn4, quantize_q8_k, Isa, ROWS};
use super::*;
use rand::{Rng, SeedableRng};

fn dequant(w: &QWeight, raw: &[u8]) -> Vec<f32> {
    let t = candle_core::quantized::ggml_file::qtensor_from_ggml(w.ty.to_candle(), raw, vec![w.rows, w.cols], &candle_core::Device::Cpu)
        .unwrap()
        .dequantize(&candle_core::Device::Cpu)
        .unwrap();
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn random_weight(ty: TensorType, rows: usize, cols: usize, seed: u64) -> (QWeight, Vec<u8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let src: Vec<f32> = (0..rows * cols).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect();
    let t = candle_core::Tensor::from_vec(src, (rows, cols), &candle_core::Device::Cpu).unwrap();
    let q = candle_core::quantized::QTensor::quantize(&t, ty.to_candle()).unwrap();
    let raw = q.data().unwrap().to_vec();
    (QWeight::new(ty, rows, cols, &raw).unwrap(), raw)
}

/// Every type with a kernel, with a row length that fits its blocks.
const CASES: [(TensorType, usize); 5] =
    [(TensorType::Q4_1, 96), (TensorType::Q5_0, 96), (TensorType::Q8_0, 96), (TensorType::Q4K, 512), (TensorType::Q6K, 512)];

/// The quantized product stays within the activation-quantization error of the exact product
/// of the dequantized weights, and SIMD and scalar paths agree.
#[test]
fn kernels_match_dequantized_matmul() {
    for (ty, cols) in CASES {
        let (rows, m) = (40, 3);
        // The activation-quantization error of a row grows as the square root of its length.
        let tol = 0.05 * (cols as f32 / 96.0).sqrt();
        let (w, raw) = random_weight(ty, rows, cols, 3);
        let wf = dequant(&w, &raw);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let x: Vec<f32> = (0..m * cols).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect();
        let got = w.matmul(&x, m);
        for i in 0..m {
            for r in 0..rows {
                let exact: f32 = (0..cols).map(|k| x[i * cols + k] * wf[r * cols + k]).sum();
                let g = got[i * rows + r];
                assert!((g - exact).abs() < tol, "{}: row {r} got {g} want {exact}", ty.name());
            }
        }
        // Every variant this CPU can run agrees with the scalar one (up to summation
        // order), and the scalar one is itself close to the exact product.
        let qx = w.quantize(&x[..cols]);
        let rb = raw.len() / rows;
        for r in 0..rows {
            let wr = &raw[r * rb..(r + 1) * rb];
            let scalar = dot(Isa::Scalar, ty, wr, &qx);
            let exact: f32 = (0..cols).map(|k| x[k] * wf[r * cols + k]).sum();
            assert!((scalar - exact).abs() < tol, "{}: scalar {scalar} want {exact}", ty.name());
            assert!((scalar - got[r]).abs() < 1e-4, "{}: scalar {scalar} vs matmul {}", ty.name(), got[r]);
            for isa in Isa::available() {
                let v = dot(isa, ty, wr, &qx);
                assert!((scalar - v).abs() < 1e-4, "{isa:?} {}: {v} vs scalar {scalar}", ty.name());
                // Rows in groups give each row's own result, bit for bit (the greedy
                // agreement with llama.cpp depends on the summation order).
                let group: [&[u8]; ROWS] = std::array::from_fn(|g| &raw[((r + 7 * g) % rows) * rb..((r + 7 * g) % rows + 1) * rb]);
                let each = group.map(|w| dot(isa, ty, w, &qx));
                assert_eq!(dotn(isa, ty, group, &qx), each, "{isa:?} {}: grouped rows differ", ty.name());
            }
        }
    }
}

/// Q8_K as ggml makes it: the value of largest magnitude maps to -127, the scale keeps its
/// sign, and each 16 values' sum is kept.
#[test]
fn q8_k_follows_ggml() {
    let mut x: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
    x[300] = 3.0; // the second block's largest magnitude, positive
    x[7] = -2.5; // the first block's, negative
    x[256..].iter_mut().take(40).for_each(|v| *v = 0.0);
    let q = quantize_q8_k(&x);
    assert_eq!(q.d, vec![1.0 / (-127.0 / -2.5f32), 1.0 / (-127.0 / 3.0f32)]);
    assert_eq!((q.q[7], q.q[300]), (-127, -127));
    for (b, blk) in x.chunks_exact(QK_K).enumerate() {
        for (k, &v) in blk.iter().enumerate() {
            let want = (v * (-127.0 / if b == 0 { -2.5f32 } else { 3.0 })).round_ties_even().min(127.0) as i8;
            assert_eq!(q.q[b * QK_K + k], want, "block {b} value {k}");
        }
    }
    for (j, &sum) in q.sums.iter().enumerate() {
        assert_eq!(sum as i32, q.q[16 * j..16 * (j + 1)].iter().map(|&v| v as i32).sum::<i32>());
    }
    let zero = quantize_q8_k(&[0.0; QK_K]);
    assert_eq!(zero.d, vec![0.0]);
    assert!(zero.q.iter().all(|&v| v == 0) && zero.sums.iter().all(|&v| v == 0));
}

#[test]
fn matvec_many_equals_separate_matvecs() {
    for (ty, cols) in CASES {
        let ws: Vec<QWeight> = [40, 17, 33].iter().enumerate().map(|(i, &r)| random_weight(ty, r, cols, i as u64).0).collect();
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let many = QWeight::matvec_many(&ws.iter().collect::<Vec<_>>(), &x);
        for (w, got) in ws.iter().zip(&many) {
            assert_eq!(got, &w.matmul(&x, 1), "{}", ty.name());
        }
    }
}

/// Weights that share an activation format (Q4_K with Q6_K, Q5_0 with Q8_0) and one input give
/// in one `matmul_many` what each gives alone, for batches on either side of the tiled kernels'
/// threshold.
#[test]
fn matmul_many_equals_separate_matmuls() {
    let pairs = [(TensorType::Q4K, TensorType::Q6K, 512), (TensorType::Q5_0, TensorType::Q8_0, 96), (TensorType::Q4_1, TensorType::Q4_1, 96)];
    for (a, b, cols) in pairs {
        let ws = [random_weight(a, 40, cols, 1).0, random_weight(b, 13, cols, 2).0, random_weight(a, 7, cols, 3).0];
        for m in [3, 24] {
            let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let many = QWeight::matmul_many(&ws.iter().collect::<Vec<_>>(), &x, m);
            for (w, got) in ws.iter().zip(&many) {
                assert_eq!(got, &w.matmul(&x, m), "{} m={m}", w.ty.name());
            }
        }
    }
}

/// A batch of activations gives, bit for bit, what each activation gives alone (grouped rows
/// and paired activations only reorder independent sums), with every kernel variant.
#[test]
fn batched_products_equal_one_activation_at_a_time() {
    for (ty, cols) in CASES {
        let (w, _) = random_weight(ty, 37, cols, 9);
        // 8 and more take the tiled kernels on AVX-512 VNNI CPUs: one group of 16, a partial
        // one, three.
        for m in [1, 2, 5, 7, 8, 16, 21, 40] {
            let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.61).cos() * (1.0 + (i % 7) as f32)).collect();
            let batch = w.matmul(&x, m);
            for j in 0..m {
                let one = w.matmul(&x[j * cols..(j + 1) * cols], 1);
                assert_eq!(&batch[j * 37..(j + 1) * 37], &one[..], "{} m={m} j={j}", ty.name());
            }
        }
        let qx: Vec<Q8Row> = (0..4).map(|j| w.quantize(&(0..cols).map(|i| ((i * (j + 3)) as f32 * 0.13).sin()).collect::<Vec<_>>())).collect();
        for isa in Isa::available() {
            let rows = std::array::from_fn(|g| w.row(4 + g));
            let pair = dotn2(isa, ty, rows, [&qx[0], &qx[1]]);
            let quad = dotn4(isa, ty, rows, [&qx[0], &qx[1], &qx[2], &qx[3]]);
            for a in 0..4 {
                for g in 0..ROWS {
                    let one = dot(isa, ty, w.row(4 + g), &qx[a]).to_bits();
                    assert_eq!(quad[a][g].to_bits(), one, "{} {isa:?} quad", ty.name());
                    if a < 2 {
                        assert_eq!(pair[a][g].to_bits(), one, "{} {isa:?} pair", ty.name());
                    }
                }
            }
            // Every variant agrees with the scalar kernel: bit for bit where the block sums are
            // exact integers, to rounding for Q4_1 (whose SIMD lanes sum in another order).
            let scalar = dot(Isa::Scalar, ty, w.row(4), &qx[0]);
            if ty == TensorType::Q4_1 {
                assert!((quad[0][0] - scalar).abs() <= 1e-4 * scalar.abs().max(1.0), "{} {isa:?}", ty.name());
            } else {
                assert_eq!(quad[0][0].to_bits(), scalar.to_bits(), "{} {isa:?}", ty.name());
            }
        }
    }
}

/// The AVX-512 Q8_K quantizer gives the scalar one's bytes, ties of magnitude included (the
/// first value of largest magnitude sets the scale's sign).
#[cfg(target_arch = "x86_64")]
#[test]
fn q8_k_simd_equals_scalar() {
    if Isa::detect() != Isa::Vnni512 {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for case in 0..200 {
        let mut x: [f32; QK_K] = std::array::from_fn(|_| rng.gen::<f32>() * 4.0 - 2.0);
        if case % 3 == 0 {
            let (i, j) = (rng.gen_range(0..QK_K), rng.gen_range(0..QK_K));
            (x[i], x[j]) = (-3.0, 3.0);
        }
        if case % 5 == 0 {
            x[rng.gen_range(0..QK_K)] = f32::NAN;
        }
        let (mut q1, mut s1, mut q2, mut s2) = ([0i8; QK_K], [0i16; 16], [0i8; QK_K], [0i16; 16]);
        let d1 = super::act::q8_k_block(&x, &mut q1, &mut s1);
        // SAFETY: checked above.
        let d2 = unsafe { super::x86::act::q8_k_block(&x, &mut q2, &mut s2) };
        assert_eq!((d1.to_bits(), q1, s1), (d2.to_bits(), q2, s2), "case {case}");
    }
}

#[test]
fn magic_rounding_is_round_half_even() {
    for v in [-127.0f32, -2.5, -1.5, -0.5, 0.49999997, 0.5, 1.5, 2.5, 3.5, 126.5, 127.0] {
        assert_eq!(round_half_even(v), v.round_ties_even(), "{v}");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for _ in 0..100_000 {
        let v = rng.gen::<f32>() * 254.0 - 127.0;
        assert_eq!(round_half_even(v), v.round_ties_even(), "{v}");
    }
}

#[test]
fn zero_block_quantizes_to_zero() {
    let q = quantize_q8(&[0.0; 32], true);
    assert_eq!(q.d, vec![0.0]);
    assert!(q.q.iter().all(|&v| v == 0));
}
