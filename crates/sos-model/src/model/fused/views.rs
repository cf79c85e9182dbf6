//! The model's weights as borrowed f32 slices, for one pass: no copy, and the weight products
//! of the pass, those that read the same input (q/k/v, gate/up) as one.

use candle_core::{CpuStorage, Storage, StorageRef, Tensor};

use crate::kernels::gemm::{matmul, matmul_blocks, transpose_into};
use crate::model::{Layer, Linear, Model};

/// A contiguous f32 CPU tensor's values, borrowed without a copy.
pub(super) struct View<'a> {
    guard: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> View<'a> {
    fn of(t: &'a Tensor) -> Option<Self> {
        let (guard, layout) = t.storage_and_layout();
        let (start, end) = layout.contiguous_offsets()?;
        matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))).then_some(View { guard, start, end })
    }

    fn dense(l: &'a Linear) -> Option<Self> {
        match l {
            Linear::Dense(t) => Self::of(t),
            Linear::Quant(_) | Linear::Kernel(_) => None,
        }
    }

    pub(super) fn get(&self) -> &[f32] {
        self.storage()[self.start..self.end].as_ref()
    }

    fn storage(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => v,
            _ => unreachable!("View::of admits f32 CPU storage only"),
        }
    }

    /// The values of `parts` as one slice when they lie back to back in one storage, as
    /// `load.rs` stacks the weights that read the same input.
    fn joined<'v>(parts: &[&'v View<'a>]) -> Option<&'v [f32]> {
        let first = parts.first()?;
        let adjacent = parts
            .windows(2)
            .all(|w| std::ptr::eq(w[0].storage(), w[1].storage()) && w[0].end == w[1].start);
        adjacent.then(|| &first.storage()[first.start..parts.last().map_or(first.end, |l| l.end)])
    }
}

pub(super) struct LayerWeights<'a> {
    pub(super) attn_norm: View<'a>,
    pub(super) wq: View<'a>,
    pub(super) wk: View<'a>,
    pub(super) wv: View<'a>,
    pub(super) wo: View<'a>,
    pub(super) bq: Option<View<'a>>,
    pub(super) bk: Option<View<'a>>,
    pub(super) bv: Option<View<'a>>,
    pub(super) ffn_norm: View<'a>,
    pub(super) gate: View<'a>,
    pub(super) up: View<'a>,
    pub(super) down: View<'a>,
    /// `Model::keep_transposes`'s copies, `[in, out]`, for the forward.
    pub(super) t: Option<[View<'a>; 4]>,
}

impl<'a> LayerWeights<'a> {
    fn of(l: &'a Layer) -> Option<Self> {
        let bias = |b: &'a Option<Tensor>| -> Option<Option<View<'a>>> {
            match b {
                Some(t) => View::of(t).map(Some),
                None => Some(None),
            }
        };
        Some(LayerWeights {
            attn_norm: View::of(&l.attn_norm)?,
            wq: View::dense(&l.wq)?,
            wk: View::dense(&l.wk)?,
            wv: View::dense(&l.wv)?,
            wo: View::dense(&l.wo)?,
            bq: bias(&l.bq)?,
            bk: bias(&l.bk)?,
            bv: bias(&l.bv)?,
            ffn_norm: View::of(&l.ffn_norm)?,
            gate: View::dense(&l.w_gate)?,
            up: View::dense(&l.w_up)?,
            down: View::dense(&l.w_down)?,
            t: None,
        })
    }
}

/// Every weight the pass reads, borrowed from the model for the duration of one pass.
pub(crate) struct Weights<'a> {
    pub(super) layers: Vec<LayerWeights<'a>>,
    pub(super) norm: View<'a>,
    pub(super) lm_head: View<'a>,
    /// The output layer transposed, `[d, vocab]`, when the model keeps transposes.
    pub(super) lm_head_t: Option<View<'a>>,
    pub(super) cos: View<'a>,
    pub(super) sin: View<'a>,
}

impl<'a> Weights<'a> {
    /// `None` unless every tensor the pass reads is a contiguous f32 CPU tensor.
    pub(crate) fn of(m: &'a Model) -> Option<Self> {
        if !m.runs_fused() {
            return None;
        }
        let mut layers: Vec<LayerWeights> = m.layers.iter().map(LayerWeights::of).collect::<Option<_>>()?;
        let mut lm_head_t = None;
        if let Some(t) = &m.transposed {
            for (lw, lt) in layers.iter_mut().zip(&t.layers) {
                lw.t = Some([View::of(&lt.qkv)?, View::of(&lt.wo)?, View::of(&lt.gate_up)?, View::of(&lt.down)?]);
            }
            lm_head_t = Some(View::of(&t.lm_head)?);
        }
        Some(Weights {
            layers,
            norm: View::of(&m.norm)?,
            lm_head: View::dense(&m.lm_head)?,
            lm_head_t,
            cos: View::of(&m.cos)?,
            sin: View::of(&m.sin)?,
        })
    }
}

/// Output columns `forward_product` transposes and multiplies at a time when the model keeps no
/// copies: a block of the weights, transposed, stays in cache until its product has read it.
/// At least 65 (`kernels::gemm::WIDE`). `sos bench step -m qwen2.5-coder-1.5b-instruct
/// --low-memory`, alternating with the copies kept: 9.1-9.4 s a step against 7.2-7.7 s (an
/// earlier variant: 64 columns 8.0-8.8 s, 256 9.1-9.2, 2,048 9.4-9.6; each product packs its
/// input again, so narrow blocks are not free either).
const COL_BLOCK: usize = 128;

/// `y[:, block i] (+)= x W_i^T` for weights `W_i: [out_i, k]` that read the same input
/// `x: [m, k]`, into consecutive column blocks of `y` (row stride `ldy`), through the weights in
/// `[k, out]` layout: `kept`, the model's transposed copy of them all, or else made as the
/// product goes, a block of columns at a time. gemm sees the same values in the same layout,
/// and `matmul_blocks` gives `matmul`'s bits, so a model that keeps no copies computes the same
/// result; the copies save the transposing. (gemm can also read the stored weights through
/// transposed strides, at about the same cost, +30 % a step on Qwen2.5-1.5B, but it then sums
/// in another order: a trigger would depend on the memory of the machine it was trained on.)
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_product(
    y: &mut [f32],
    ldy: usize,
    x: &[f32],
    kept: Option<&View>,
    ws: &[&View],
    m: usize,
    k: usize,
    acc: bool,
) {
    if let Some(t) = kept {
        let out = t.get().len() / k;
        return matmul(y, ldy, x, k, t.get(), m, k, out, false, acc);
    }
    // Where each weight's rows start among the output columns.
    let mut starts = vec![0];
    for w in ws {
        starts.push(starts.last().copied().unwrap_or(0) + w.get().len() / k);
    }
    let out = starts[ws.len()];
    matmul_blocks(y, ldy, x, k, m, k, out, acc, COL_BLOCK, |j0, j1, buf| {
        for (w, s) in ws.iter().zip(starts.windows(2)) {
            let (lo, hi) = (j0.max(s[0]), j1.min(s[1]));
            if lo < hi {
                let rows = &w.get()[(lo - s[0]) * k..(hi - s[0]) * k];
                transpose_into(buf, j1 - j0, lo - j0, rows, hi - lo, k);
            }
        }
    });
}

/// The backward of `forward_product`: `dx = sum_i dy[:, block i] W_i`, `dx: [m, k]`, from the
/// weights as stored.
pub(super) fn project_back(dx: &mut [f32], dy: &[f32], ldy: usize, ws: &[&View], m: usize, k: usize) {
    if let Some(w) = View::joined(ws) {
        return matmul(dx, k, dy, ldy, w, m, w.len() / k, k, false, false);
    }
    let mut col = 0;
    for (i, w) in ws.iter().enumerate() {
        let out = w.get().len() / k;
        matmul(dx, k, &dy[col..], ldy, w.get(), m, out, k, false, i > 0);
        col += out;
    }
}
