//! The one place that picks a kernel: by weight type and by what the CPU can run.

use super::act::{q8_k_block, Q8Row, QK_K};
use super::scalar::{dot_q4_1_q8_1, dot_q4_k_q8_k, dot_q5_0_q8_0, dot_q6_k_q8_k, dot_q8_0_q8_0};
#[cfg(target_arch = "x86_64")]
use super::x86;
use crate::format::gguf::TensorType;

/// Which kernels this CPU runs (std caches the feature bits, so detecting is a few loads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Isa {
    Scalar,
    Avx2,
    Vnni,
    /// AVX-512 VNNI with 256-bit vectors: the `Vnni` kernels with 32 registers.
    Vnni512,
}

impl Isa {
    /// The fastest variant this CPU can run.
    pub(super) fn detect() -> Isa {
        [Isa::Vnni512, Isa::Vnni, Isa::Avx2].into_iter().find(|i| i.runs_here()).unwrap_or(Isa::Scalar)
    }

    /// Whether this CPU has the features the variant is compiled for.
    fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            match self {
                Isa::Scalar => true,
                Isa::Avx2 => avx2,
                Isa::Vnni => avx2 && has!("avxvnni"),
                Isa::Vnni512 => avx2 && has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512vnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }

    /// Every variant this CPU can run, slowest first.
    #[cfg(test)]
    pub(super) fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Vnni, Isa::Vnni512].into_iter().filter(|i| i.runs_here()).collect()
    }
}

/// One weight row (raw ggml blocks of type `ty`) against one quantized activation row.
pub(super) fn dot(isa: Isa, ty: TensorType, w: &[u8], x: &Q8Row) -> f32 {
    if isa == Isa::Scalar {
        return match ty {
            TensorType::Q4_1 => dot_q4_1_q8_1(w, x),
            TensorType::Q5_0 => dot_q5_0_q8_0(w, x),
            TensorType::Q4K => dot_q4_k_q8_k(w, x),
            TensorType::Q6K => dot_q6_k_q8_k(w, x),
            _ => dot_q8_0_q8_0(w, x),
        };
    }
    dotn(isa, ty, [w], x)[0]
}

/// Rows processed together by `dotn`.
pub(super) const ROWS: usize = 4;

/// `N` weight rows of type `ty` against one activation row; each result equals `dot` on its row.
pub(super) fn dotn<const N: usize>(isa: Isa, ty: TensorType, w: [&[u8]; N], x: &Q8Row) -> [f32; N] {
    // SAFETY: `isa` comes from `Isa::detect()` (or, in tests, `Isa::available()`), which checked
    // the features each variant is compiled for; `QWeight::new` checked every row's length.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match (isa, ty) {
            (Isa::Scalar, _) => {}
            (_, TensorType::Q4K) => return x86::k::avx2::dot_q4_k_q8_k(w, [x])[0],
            (_, TensorType::Q6K) => return x86::k::avx2::dot_q6_k_q8_k(w, [x])[0],
            (Isa::Vnni512, TensorType::Q4_1) => return x86::vnni512::dotn_q4_1_q8_1(w, x),
            (Isa::Vnni512, TensorType::Q5_0) => return x86::vnni512::dotnm_signed::<N, 1, true>(w, [x])[0],
            (Isa::Vnni512, _) => return x86::vnni512::dotnm_signed::<N, 1, false>(w, [x])[0],
            (Isa::Vnni, TensorType::Q4_1) => return x86::vnni::dotn_q4_1_q8_1(w, x),
            (Isa::Vnni, TensorType::Q5_0) => return x86::vnni::dotnm_signed::<N, 1, true>(w, [x])[0],
            (Isa::Vnni, _) => return x86::vnni::dotnm_signed::<N, 1, false>(w, [x])[0],
            (Isa::Avx2, TensorType::Q4_1) => return x86::avx2::dotn_q4_1_q8_1(w, x),
            (Isa::Avx2, TensorType::Q5_0) => return x86::avx2::dotnm_signed::<N, 1, true>(w, [x])[0],
            (Isa::Avx2, _) => return x86::avx2::dotnm_signed::<N, 1, false>(w, [x])[0],
        }
    }
    w.map(|r| dot(Isa::Scalar, ty, r, x))
}

/// `ROWS` weight rows against two activation rows; `[a][i]` equals `dot` on row `i` and activation `a`.
pub(super) fn dotn2(isa: Isa, ty: TensorType, w: [&[u8]; ROWS], x: [&Q8Row; 2]) -> [[f32; ROWS]; 2] {
    // SAFETY: as in `dotn`.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match (isa, ty) {
            (Isa::Scalar, _) => {}
            (_, TensorType::Q4K) => return x86::k::avx2::dot_q4_k_q8_k(w, x),
            (_, TensorType::Q6K) => return x86::k::avx2::dot_q6_k_q8_k(w, x),
            (Isa::Vnni512, TensorType::Q4_1) => return x86::vnni512::dotn2_q4_1_q8_1(w, x),
            (Isa::Vnni512, TensorType::Q5_0) => return x86::vnni512::dotnm_signed::<ROWS, 2, true>(w, x),
            (Isa::Vnni512, _) => return x86::vnni512::dotnm_signed::<ROWS, 2, false>(w, x),
            (Isa::Vnni, TensorType::Q4_1) => return x86::vnni::dotn2_q4_1_q8_1(w, x),
            (Isa::Vnni, TensorType::Q5_0) => return x86::vnni::dotnm_signed::<ROWS, 2, true>(w, x),
            (Isa::Vnni, _) => return x86::vnni::dotnm_signed::<ROWS, 2, false>(w, x),
            (Isa::Avx2, TensorType::Q4_1) => return x86::avx2::dotn2_q4_1_q8_1(w, x),
            (Isa::Avx2, TensorType::Q5_0) => return x86::avx2::dotnm_signed::<ROWS, 2, true>(w, x),
            (Isa::Avx2, _) => return x86::avx2::dotnm_signed::<ROWS, 2, false>(w, x),
        }
    }
    x.map(|x| dotn(isa, ty, w, x))
}

/// `ROWS` weight rows against four activation rows; `[a][i]` equals `dot` on row `i` and
/// activation `a`. Q5_0, Q8_0, Q4_K and Q6_K on AVX-512 take all four at once (each block
/// decoded once for four activations; AVX2's 16 registers would spill); everything else, two
/// pairs.
pub(super) fn dotn4(isa: Isa, ty: TensorType, w: [&[u8]; ROWS], x: [&Q8Row; 4]) -> [[f32; ROWS]; 4] {
    // SAFETY: as in `dotn`.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match (isa, ty) {
            (Isa::Vnni512, TensorType::Q5_0) => return x86::vnni512::dotnm_signed::<ROWS, 4, true>(w, x),
            (Isa::Vnni512, TensorType::Q8_0) => return x86::vnni512::dotnm_signed::<ROWS, 4, false>(w, x),
            (Isa::Vnni512, TensorType::Q4K) => return x86::k::avx512::dot_q4_k_q8_k::<ROWS, 4>(w, x),
            (Isa::Vnni512, TensorType::Q6K) => return x86::k::avx512::dot_q6_k_q8_k::<ROWS, 4>(w, x),
            _ => {}
        }
    }
    let ([a, b], [c, d]) = (dotn2(isa, ty, w, [x[0], x[1]]), dotn2(isa, ty, w, [x[2], x[3]]));
    [a, b, c, d]
}

/// `x` quantized to Q8_K (ggml's `quantize_row_q8_K_ref`, see `act::q8_k_block`), per 256-block
/// with the AVX-512 kernel where the CPU has it (the same bytes).
pub(super) fn quantize_q8_k(x: &[f32]) -> Q8Row {
    let mut d = Vec::with_capacity(x.len() / QK_K);
    let mut q = vec![0i8; x.len()];
    let mut sums = vec![0i16; x.len() / 16];
    #[cfg(target_arch = "x86_64")]
    let simd = Isa::detect() == Isa::Vnni512;
    for ((blk, qb), sb) in x.chunks_exact(QK_K).zip(q.chunks_exact_mut(QK_K)).zip(sums.chunks_exact_mut(16)) {
        let (blk, qb, sb) = (blk.try_into().expect("a whole block"), qb.try_into().expect("a whole block"), sb.try_into().expect("16 sums"));
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `Isa::Vnni512` includes AVX-512 F and BW.
            d.push(unsafe { x86::act::q8_k_block(blk, qb, sb) });
            continue;
        }
        d.push(q8_k_block(blk, qb, sb));
    }
    Q8Row { d, s: Vec::new(), q, sums }
}
