//! Quantized matrix-vector kernels for GGUF Q4_1, Q5_0, Q8_0, Q4_K and Q6_K weights. candle has
//! no SIMD path for Q4_1 and Q5_0 (its dot products are scalar), and its K-quant products run on
//! its own thread pool, which a decode step split across our threads cannot share.
//!
//! The arithmetic follows ggml's CPU path, so `--exec quant` agrees with llama.cpp: activations
//! are quantized per 32-block to Q8_1 (for Q4_1 weights) or Q8_0 (Q5_0, Q8_0 weights), or per
//! 256-block to Q8_K (K-quants), with round-half-even; integer dot products per block, one f32
//! scale per block pair. For Q5_0, Q8_0, Q4_K and Q6_K every kernel keeps one rule: a block's
//! integer sum is exact, and the blocks meet `d_w * d_x` in order, one fused multiply-add each,
//! per (row, activation). So all kernels give the same bits (`scalar.rs` is the reference), and a
//! batch gives what each activation gives alone. Output rows are split across the rayon pool.
//!
//! Files by job: `act.rs` quantizes activations; `dispatch.rs` picks the kernel for a weight type
//! and CPU (`Isa`); `scalar.rs` holds the reference kernels; `x86.rs` (Q4_1, Q5_0, Q8_0) and
//! `x86/k.rs` (Q4_K, Q6_K) the one-activation SIMD ones; `x86/tiled.rs` the AVX-512 VNNI
//! kernels for batches (prompts), which decode a tile of weight rows once for all activations.

mod act;
mod dispatch;
mod scalar;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::ops::Range;

use rayon::prelude::*;

pub(crate) use act::{ActFormat, Q8Row};
use act::{quantize_q8, QK, QK_K};
use dispatch::{dot, dotn, dotn2, dotn4, quantize_q8_k, Isa, ROWS};

use crate::bytes::SharedBytes;
use crate::error::{Error, Result};
use crate::format::gguf::TensorType;
use crate::kernels::vecmath::{prefetch, PREFETCH_AHEAD};

/// A weight matrix `[rows, cols]` in its ggml blocks, row-major, as stored in the file: decoding
/// is bound by memory bandwidth, so the blocks stay as compact as llama.cpp keeps them and the
/// kernels convert the f16 scales inline.
#[derive(Debug, Clone)]
pub struct QWeight {
    pub ty: TensorType,
    pub rows: usize,
    pub cols: usize,
    /// Shared with the model file's map when loaded from one, so the blocks are never copied.
    data: SharedBytes,
}

impl QWeight {
    /// Types with a kernel here; other types use candle's `QMatMul`.
    pub fn supports(ty: TensorType) -> bool {
        matches!(ty, TensorType::Q4_1 | TensorType::Q5_0 | TensorType::Q8_0 | TensorType::Q4K | TensorType::Q6K)
    }

    /// From raw ggml blocks (`data`, row-major). Block layouts: Q4_1 `{d, m: f16, qs[16]}`,
    /// Q5_0 `{d: f16, qh: u32, qs[16]}`, Q8_0 `{d: f16, qs: [i8; 32]}`, Q4_K `{d, dmin: f16,
    /// scales[12], qs[128]}`, Q6_K `{ql[128], qh[64], scales: [i8; 16], d: f16}`.
    pub fn new(ty: TensorType, rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        Self::shared(ty, rows, cols, SharedBytes::owned(data.to_vec()))
    }

    /// As `new`, reading the blocks where they are (a model file's map) instead of a copy.
    pub(crate) fn shared(ty: TensorType, rows: usize, cols: usize, data: SharedBytes) -> Result<Self> {
        let (bs, bb) = ty.block();
        if !Self::supports(ty) || rows == 0 || cols == 0 || !cols.is_multiple_of(bs as usize) || data.len() != rows * cols / bs as usize * bb as usize {
            return Err(Error::Invalid(format!("bad {} weight: {rows}x{cols} with {} bytes", ty.name(), data.len())));
        }
        Ok(QWeight { ty, rows, cols, data })
    }

    fn row_bytes(&self) -> usize {
        let (bs, bb) = self.ty.block();
        self.cols / bs as usize * bb as usize
    }

    /// Weight row `r`'s blocks.
    fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// How this weight's kernels read activations: Q8_1 for Q4_1, Q8_K for K-quants, Q8_0 otherwise.
    pub(crate) fn act_format(&self) -> ActFormat {
        match self.ty {
            TensorType::Q4_1 => ActFormat::Q8_1,
            TensorType::Q4K | TensorType::Q6K => ActFormat::Q8K,
            _ => ActFormat::Q8_0,
        }
    }

    /// `x` quantized the way this weight's kernels read it (`act_format`).
    pub(crate) fn quantize(&self, x: &[f32]) -> Q8Row {
        assert_eq!(x.len(), self.cols, "activation length");
        match self.act_format() {
            ActFormat::Q8K => quantize_q8_k(x),
            f => quantize_q8(x, f == ActFormat::Q8_1),
        }
    }

    /// Whether `qx` is `quantize`'s output for a vector of this weight's length: the kernels read
    /// its arrays unchecked.
    fn fits(&self, qx: &Q8Row) -> bool {
        let n = self.cols;
        qx.q.len() == n
            && match self.act_format() {
                ActFormat::Q8_1 => qx.d.len() == n / QK && qx.s.len() == n / QK,
                ActFormat::Q8_0 => qx.d.len() == n / QK,
                ActFormat::Q8K => qx.d.len() == n / QK_K && qx.sums.len() == n / 16,
            }
    }

    /// Prefetches the `ROWS` rows' worth of bytes that start `PREFETCH_AHEAD` beyond row `r`.
    #[inline]
    fn prefetch_rows(&self, r: usize) {
        let rb = self.row_bytes();
        let at = (r * rb + PREFETCH_AHEAD).min(self.data.len());
        prefetch(&self.data[at..(at + ROWS * rb).min(self.data.len())]);
    }

    /// Rows `rows` of `W x_s` into `outs[s]`, for each `qxs[s]` from `quantize`: rows in groups
    /// of `ROWS` (independent accumulator chains), the rest one by one. A group's rows are read
    /// from memory once and unpacked once for up to four activations (`group_products`), and
    /// every kernel gives an activation the bits it gets alone, so its results do not depend
    /// on the others.
    pub(crate) fn rows_into(&self, qxs: &[Q8Row], rows: Range<usize>, outs: &mut [&mut [f32]]) {
        assert!(rows.end <= self.rows && qxs.len() == outs.len() && outs.iter().all(|o| o.len() == rows.len()), "rows_into: bad range");
        assert!(qxs.iter().all(|q| self.fits(q)), "rows_into: activations quantized for another type or length");
        let isa = Isa::detect();
        let grouped = rows.len() - rows.len() % ROWS;
        for g in (0..grouped).step_by(ROWS) {
            let r = rows.start + g;
            self.prefetch_rows(r);
            let w = std::array::from_fn(|i| self.row(r + i));
            self.group_products(isa, w, qxs, |j, v| outs[j][g..g + ROWS].copy_from_slice(v));
        }
        for i in grouped..rows.len() {
            for (qx, out) in qxs.iter().zip(outs.iter_mut()) {
                out[i] = dot(isa, self.ty, self.row(rows.start + i), qx);
            }
        }
    }

    /// `W_i x` for several weights of one activation format that read the same vector (q/k/v,
    /// gate/up): the vector is quantized once and all rows go to the pool as one job.
    pub fn matvec_many(ws: &[&QWeight], x: &[f32]) -> Vec<Vec<f32>> {
        let Some(first) = ws.first() else { return Vec::new() };
        assert!(
            ws.iter().all(|w| w.act_format() == first.act_format() && w.cols == x.len()),
            "matvec_many: mixed activation formats or shapes"
        );
        let qx = [first.quantize(x)];
        let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; w.rows]).collect();
        const ROWS_PER_TASK: usize = 16;
        let tasks: Vec<(&QWeight, usize, &mut [f32])> = ws
            .iter()
            .zip(outs.iter_mut())
            .flat_map(|(w, out)| out.chunks_mut(ROWS_PER_TASK).enumerate().map(move |(i, c)| (*w, i * ROWS_PER_TASK, c)))
            .collect();
        tasks.into_par_iter().for_each(|(w, r0, out)| w.rows_into(&qx, r0..r0 + out.len(), &mut [out]));
        outs
    }

    /// `x: [m, cols]` (row-major) -> `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        Self::matmul_many(&[self], x, m).pop().expect("one weight, one product")
    }

    /// `x W_i^T` (`[m, rows_i]` each) for weights of one activation format and width that read
    /// the same input `x: [m, cols]` (q/k/v, gate/up): `x` is quantized once, and on AVX-512
    /// VNNI CPUs all the products go to the pool as one job.
    pub fn matmul_many(ws: &[&QWeight], x: &[f32], m: usize) -> Vec<Vec<f32>> {
        let Some(first) = ws.first() else { return Vec::new() };
        assert!(
            ws.iter().all(|w| w.act_format() == first.act_format() && w.cols == first.cols),
            "matmul_many: mixed activation formats or widths"
        );
        assert_eq!(x.len(), m * first.cols, "activation shape");
        let qx: Vec<Q8Row> = x.par_chunks(first.cols).map(|r| first.quantize(r)).collect();
        let isa = Isa::detect();
        let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; w.rows * m]).collect();
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Vnni512 && m >= TILED_MIN && first.act_format() != ActFormat::Q8_1 {
            products_tiled(ws, &qx, m, &mut outs);
            return outs;
        }
        // Transposed results [rows, m]: each task owns whole weight rows and reads each once.
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            w.products(isa, &qx, m, out);
        }
        outs.into_iter().zip(ws).map(|(o, w)| transpose(o, w.rows, m)).collect()
    }

    /// `[rows, m]` products of every row against every activation of `qx`, with the
    /// one-activation kernels.
    fn products(&self, isa: Isa, qx: &[Q8Row], m: usize, out_t: &mut [f32]) {
        let rows_per_task = 16;
        out_t.par_chunks_mut(rows_per_task * m).enumerate().for_each(|(task, chunk)| {
            let (r0, rows) = (task * rows_per_task, chunk.len() / m);
            // Rows in groups of `ROWS` (independent accumulator chains), the rest one by one.
            let grouped = rows - rows % ROWS;
            for i in (0..grouped).step_by(ROWS) {
                self.prefetch_rows(r0 + i);
                let w = std::array::from_fn(|g| self.row(r0 + i + g));
                self.group_products(isa, w, qx, |j, v| {
                    for (g, &v) in v.iter().enumerate() {
                        chunk[(i + g) * m + j] = v;
                    }
                });
            }
            for i in grouped..rows {
                for (j, q) in qx.iter().enumerate() {
                    chunk[i * m + j] = dot(isa, self.ty, self.row(r0 + i), q);
                }
            }
        });
    }
}

impl QWeight {
    /// `ROWS` weight rows `w` against every activation of `qx`, four at a time, then a pair,
    /// then one, so that each weight block is unpacked once for several (every variant gives
    /// one activation's bits); `put(j, v)` takes activation `j`'s results.
    fn group_products(&self, isa: Isa, w: [&[u8]; ROWS], qx: &[Q8Row], mut put: impl FnMut(usize, &[f32; ROWS])) {
        let mut quads = qx.chunks_exact(4);
        for (jq, q) in (&mut quads).enumerate() {
            for (a, v) in dotn4(isa, self.ty, w, [&q[0], &q[1], &q[2], &q[3]]).iter().enumerate() {
                put(4 * jq + a, v);
            }
        }
        let rest = quads.remainder();
        let j0 = qx.len() - rest.len();
        let mut pairs = rest.chunks_exact(2);
        for (jp, q) in (&mut pairs).enumerate() {
            for (a, v) in dotn2(isa, self.ty, w, [&q[0], &q[1]]).iter().enumerate() {
                put(j0 + 2 * jp + a, v);
            }
        }
        if let [q] = pairs.remainder() {
            put(qx.len() - 1, &dotn(isa, self.ty, w, q));
        }
    }
}

/// `matmul_many`'s products with the tiled kernels (`x86/tiled.rs`), into `outs` (`[m, rows]`
/// per weight): each task decodes `TILE` rows of one weight once, runs them against every
/// group of 16 activations and writes their columns; the activations are laid out once for all
/// weights.
#[cfg(target_arch = "x86_64")]
fn products_tiled(ws: &[&QWeight], qx: &[Q8Row], m: usize, outs: &mut [Vec<f32>]) {
    use x86::tiled::{run, Panel, Tile, TILE};

    /// Column `r0` of one weight's output `[m, rows]`.
    #[derive(Clone, Copy)]
    struct Columns(*mut f32);
    // SAFETY: each task writes only the `TILE` columns from its own `r0`, which no other task
    // writes or reads, and `for_each_init` returns only after every task has finished.
    unsafe impl Send for Columns {}
    // SAFETY: as for `Send`.
    unsafe impl Sync for Columns {}

    let panel = Panel::new(qx, ws[0].ty, ws[0].cols);
    let tasks: Vec<(&QWeight, usize, Columns)> = ws
        .iter()
        .zip(outs.iter_mut())
        .flat_map(|(w, out)| {
            let base = out.as_mut_ptr();
            // SAFETY: `r0 < w.rows`, so the column lies inside the `m * rows` buffer.
            (0..w.rows).step_by(TILE).map(move |r0| (*w, r0, Columns(unsafe { base.add(r0) })))
        })
        .collect();
    tasks.into_par_iter().for_each_init(
        || None::<Tile>,
        |tile, (w, r0, out)| {
            let tile = match tile {
                Some(t) if t.decodes(w.ty) => t,
                _ => tile.insert(Tile::new(w.ty, w.cols)),
            };
            let n = TILE.min(w.rows - r0);
            // The pool hands each thread consecutive tasks: ask for the next tile's rows now, so
            // that they arrive from memory while this tile's products run.
            let rb = w.row_bytes();
            let next = ((r0 + TILE) * rb).min(w.data.len())..((r0 + 2 * TILE) * rb).min(w.data.len());
            prefetch(&w.data[next]);
            let mut rows: [&[u8]; TILE] = [&[]; TILE];
            for (i, row) in rows.iter_mut().take(n).enumerate() {
                *row = w.row(r0 + i);
            }
            // SAFETY: the caller checked `Isa::Vnni512`, whose features these kernels are
            // compiled for; the rows are whole (`QWeight::shared`), the panel and tile were
            // sized from this width and type, and `out` is column `r0` of an `[m, w.rows]`
            // buffer of which this task alone touches columns `r0..r0 + n`.
            unsafe { run(tile, &panel, &rows[..n], m, out.0, w.rows) };
        },
    );
}

/// Activations from which `matmul` takes the tiled kernels on AVX-512 VNNI CPUs: from here
/// on, decoding a weight tile once for 16 activations beats decoding each block for four.
#[cfg(target_arch = "x86_64")]
const TILED_MIN: usize = 8;

/// `[rows, m]` -> `[m, rows]`.
fn transpose(out_t: Vec<f32>, rows: usize, m: usize) -> Vec<f32> {
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * rows];
    out.par_chunks_mut(rows).enumerate().for_each(|(j, row)| {
        for (r, o) in row.iter_mut().enumerate() {
            *o = out_t[r * m + j];
        }
    });
    out
}
