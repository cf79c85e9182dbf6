//! The forward and reverse pass on plain f32 buffers: the CPU path of an f32 model, for
//! inference (`Model::forward`) and for training (`Model::loss_and_input_grad`).
//!
//! `reference.rs` states the same pass as candle tensor ops, which run on any device and dtype
//! (the finite-difference tests use f64). On the CPU those ops cost nearly as much as the
//! arithmetic: each of ~30 ops per layer allocates its output and makes one more pass over
//! memory, and candle's elementwise ops wake a spinning thread pool that, on 2 cores, competes
//! with the matmul threads. A profile of a batch 8 x 64 step put ~45 % of the time outside the
//! matmul kernels. Here the same arithmetic runs as fused loops over flat buffers split across
//! rayon's pool, and the weight products go straight to `gemm`. `tests/reverse_cpu.rs` checks it
//! against `reference.rs`.
//!
//! Files: `views.rs` borrows the weights; `layer.rs` runs one layer forward and backward; this
//! file runs the layers over a batch and the loss at the output layer.
//!
//! Layouts: activations are token-major `[n = b*r, width]`; keys and values `[b, kvh, t, hd]`
//! (prefix first); attention probabilities `[b, h, r, t]`.

mod layer;
mod views;

use std::ops::Range;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use layer::{layer_backward, layer_forward, Dims, LayerTape, Scratch};
pub(crate) use views::Weights;

use crate::kernels::gemm::{matmul, matmul_blocks, transpose_into};
use crate::kernels::ops::{rms_norm_backward_rows, rms_norm_rows, zeros};
use crate::kernels::vecmath::{axpy, exp, simd, sum};
use crate::model::{KvCache, LossGrad, Model};
use crate::error::Result;


/// Output-layer rows `output_logits` transposes at once when the model keeps no transposed
/// copy: 48 MB at Qwen2.5-1.5B's width.
const LM_BLOCK: usize = 8192;

/// The output layer's logits `[m, vocab]` of normed hidden rows `hn: [m, d]`. Without the
/// transposed copy, the output layer is transposed `block` rows at a time as the product goes:
/// whole, it would be as large as the copy the model did not keep. The bits are the same either
/// way (`kernels::gemm::matmul_blocks`).
fn output_logits(w: &Weights, hn: &[f32], d: usize, block: usize) -> Vec<f32> {
    let lm = w.lm_head.get();
    let (m, vocab) = (hn.len() / d, lm.len() / d);
    let mut logits = zeros(m * vocab);
    match &w.lm_head_t {
        Some(t) => matmul(&mut logits, vocab, hn, d, t.get(), m, d, vocab, false, false),
        None => matmul_blocks(&mut logits, vocab, hn, d, m, d, vocab, false, block, |j0, j1, buf| {
            transpose_into(buf, j1 - j0, 0, &lm[j0 * d..j1 * d], j1 - j0, d)
        }),
    }
    logits
}

/// Mean cross-entropy of `targets` at hidden rows `rows` of `hidden: [n, d]`, its gradient with
/// respect to `hidden`, and per row whether the target is the argmax (ties to the lower id).
fn cross_entropy(
    w: &Weights,
    hidden: &[f32],
    d: usize,
    eps: f32,
    rows: &[u32],
    targets: &[u32],
) -> (f64, Vec<f32>, Vec<bool>) {
    let nr = rows.len();
    let mut hs = vec![0f32; nr * d];
    for (dst, &row) in hs.chunks_exact_mut(d).zip(rows) {
        dst.copy_from_slice(&hidden[row as usize * d..(row as usize + 1) * d]);
    }
    let (hn, rr) = rms_norm_rows(&hs, w.norm.get(), eps);
    let lm = w.lm_head.get();
    let vocab = lm.len() / d;
    let mut logits = output_logits(w, &hn, d, LM_BLOCK);
    drop(hn);
    // In place: logits -> d loss / d logits = (softmax - onehot) / nr.
    let per_row: Vec<(f64, bool)> = logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(l, &tgt)| {
            simd(|| {
                let (best, &max) = l
                    .iter()
                    .enumerate()
                    .fold(
                        (0, &f32::NEG_INFINITY),
                        |acc, x| if x.1 > acc.1 { x } else { acc },
                    );
                let picked = l[tgt as usize] - max;
                l.iter_mut().for_each(|v| *v = exp(*v - max));
                let total = sum(l);
                let inv = 1.0 / (total * nr as f32);
                l.iter_mut().for_each(|v| *v *= inv);
                l[tgt as usize] -= 1.0 / nr as f32;
                (picked as f64 - (total as f64).ln(), best == tgt as usize)
            })
        })
        .collect();
    let loss = -per_row.iter().map(|p| p.0).sum::<f64>() / nr as f64;
    let mut dhn = vec![0f32; nr * d];
    matmul(&mut dhn, d, &logits, vocab, lm, nr, vocab, d, false, false);
    drop(logits);
    let mut dhs = vec![0f32; nr * d];
    rms_norm_backward_rows(&mut dhs, &hs, &rr, w.norm.get(), &dhn);
    let mut dh = zeros(hidden.len());
    for (src, &row) in dhs.chunks_exact(d).zip(rows) {
        axpy(&mut dh[row as usize * d..(row as usize + 1) * d], 1.0, src);
    }
    (loss, dh, per_row.into_iter().map(|p| p.1).collect())
}

/// `Model::loss_and_input_grad` on plain buffers; the caller has checked the shapes and ids.
fn dims(m: &Model, b: usize, r: usize, from: usize) -> Dims {
    let c = &m.cfg;
    Dims {
        b,
        r,
        from,
        t: from + r,
        d: c.d_model,
        h: c.n_head,
        kvh: c.n_kv_head,
        hd: c.head_dim,
        ff: c.d_ff,
        eps: c.rms_eps as f32,
        qblock: layer::QUERY_BLOCK,
    }
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Layer `i`'s cached keys and values of the sequences `seqs`, as flat `[seqs, kvh, len, hd]`.
fn prefix_kv(prefix: Option<&KvCache>, i: usize, seqs: &Range<usize>) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
    let part = |t: &Tensor| flat(&t.narrow(0, seqs.start, seqs.len())?);
    match prefix.map(|p| &p.layers()[i]) {
        Some(Some((pk, pv))) => Ok(Some((part(pk)?, part(pv)?))),
        Some(None) if prefix.is_some_and(|p| p.is_empty()) => Ok(None),
        Some(None) => Err(crate::Error::Invalid("prefix cache is missing a layer".into())),
        None => Ok(None),
    }
}

/// `Model::forward` on plain buffers: hidden states `[b, t, d]` before the final norm, with the
/// cache (if any) extended by `x`'s positions. The caller has checked the shapes.
pub(crate) fn forward(m: &Model, w: &Weights, x: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
    let (b, r, d) = x.dims3()?;
    let from = cache.as_deref().map_or(0, |c| c.len());
    let dm = dims(m, b, r, from);
    let mut h = flat(x)?;
    let mut kvs = Vec::with_capacity(w.layers.len());
    for (i, lw) in w.layers.iter().enumerate() {
        let kv = prefix_kv(cache.as_deref(), i, &(0..b))?;
        let (tape, out) = layer_forward(w, lw, dm, h, kv.as_ref().map(|(k, v)| (&k[..], &v[..])));
        if cache.is_some() {
            let shape = (b, dm.kvh, dm.t, dm.hd);
            kvs.push((Tensor::from_vec(tape.k, shape, &Device::Cpu)?, Tensor::from_vec(tape.v, shape, &Device::Cpu)?));
        }
        h = out;
    }
    if let Some(c) = cache {
        c.set(kvs, dm.t);
    }
    Ok(Tensor::from_vec(h, (b, r, d), &Device::Cpu)?)
}

pub(crate) fn loss_and_input_grad(
    m: &Model,
    w: &Weights,
    x: &Tensor,
    prefix: Option<&KvCache>,
    rows: &[u32],
    targets: &[u32],
) -> Result<LossGrad> {
    let (b, r, d) = x.dims3()?;
    let from = prefix.map_or(0, |p| p.len());
    let dm = dims(m, b, r, from);
    let h = flat(x)?;
    let groups = groups(b);
    // Values of sequences `g` in a batch-major buffer of `per` values per sequence.
    let part = |v: &[f32], g: &Range<usize>, per: usize| v[g.start * per..g.end * per].to_vec();
    let forwards: Vec<(Vec<LayerTape>, Vec<f32>)> = groups
        .par_iter()
        .map(|g| forward_group(w, dims(m, g.len(), r, from), part(&h, g, r * d), prefix, g))
        .collect::<Result<_>>()?;
    drop(h);
    let (tapes, outs): (Vec<_>, Vec<_>) = forwards.into_iter().unzip();
    let (loss, g, hits) = cross_entropy(w, &outs.concat(), d, dm.eps, rows, targets);
    drop(outs);
    let grads: Vec<Vec<f32>> = groups
        .par_iter()
        .zip(tapes)
        .map(|(grp, tapes)| backward_group(w, dims(m, grp.len(), r, from), tapes, part(&g, grp, r * d)))
        .collect();
    Ok(LossGrad {
        loss,
        grad: Tensor::from_vec(grads.concat(), (b, r, d), &Device::Cpu)?,
        hits,
    })
}

/// The batch's sequences in one group per thread of the pool (at most one group per sequence).
///
/// Sequences never meet inside the model, so the groups run their forwards and backwards as
/// independent tasks, one per thread, and meet only around the output layer; the parallel loops
/// inside a group still hand work to a thread that has run out of its own. With the whole batch
/// as one group, the threads met at every product and elementwise pass (~400 times a step). In
/// four in-process A/B runs of `sos bench step` on 2 threads (30-40 alternating pairs each) the
/// groups took 0.94-0.99 of that time for the full step and 0.96-0.99 for the cached one: a small
/// gain, and no loss. The output layer stays one product over all loss rows: it is the largest
/// weight, and split by columns each thread packs only its own half of it.
fn groups(b: usize) -> Vec<Range<usize>> {
    let n = rayon::current_num_threads().clamp(1, b.max(1));
    (0..n).map(|i| b * i / n..b * (i + 1) / n).collect()
}

/// Every layer forward over the group of sequences `seqs` (inputs `h`, and their part of the
/// prefix cache, read one layer at a time): the layers' tapes and the last hidden state.
fn forward_group(
    w: &Weights,
    dm: Dims,
    mut h: Vec<f32>,
    prefix: Option<&KvCache>,
    seqs: &Range<usize>,
) -> Result<(Vec<LayerTape>, Vec<f32>)> {
    let mut tapes = Vec::with_capacity(w.layers.len());
    for (i, lw) in w.layers.iter().enumerate() {
        let kv = prefix_kv(prefix, i, seqs)?;
        let (tape, out) = layer_forward(w, lw, dm, h, kv.as_ref().map(|(k, v)| (&k[..], &v[..])));
        tapes.push(tape);
        h = out;
    }
    Ok((tapes, h))
}

/// Every layer backward over one group, from the gradient of its last hidden state to that of
/// its inputs. Each layer's tape is freed once its backward is done.
fn backward_group(w: &Weights, dm: Dims, tapes: Vec<LayerTape>, mut g: Vec<f32>) -> Vec<f32> {
    let mut scratch = Scratch::default();
    for (lw, tape) in w.layers.iter().zip(tapes).rev() {
        g = layer_backward(w, lw, dm, &tape, g, &mut scratch);
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::TinySpec;
    use crate::{Exec, LoadOptions, LoadedModel};

    /// Without the transposed copy the output layer is transposed in blocks; the logits must be
    /// those of the copy to the bit, whatever the block (a longer block at the end included),
    /// for a few rows and for many (gemm sums short products in another order), at a width over
    /// 512 (where that order differs).
    #[test]
    fn blocked_output_layer_gives_the_copys_logits() {
        let dir = std::env::temp_dir().join(format!("sos-fused-lm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.gguf");
        TinySpec { tied: false, d_model: 576, n_layer: 1, seed: 9, ..TinySpec::default() }.write_gguf(&p).unwrap();
        let opts = LoadOptions { exec: Exec::F32, ..Default::default() };
        let plain = LoadedModel::open(&p, &opts).unwrap().model;
        let mut kept = plain.clone();
        kept.keep_transposes().unwrap();
        let d = plain.cfg.d_model;
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        let w = Weights::of(&plain).unwrap();
        assert!(w.lm_head_t.is_none());
        for rows in [5, 70] {
            let hn: Vec<f32> = (0..rows * d).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 3.0).collect();
            let want = bits(output_logits(&Weights::of(&kept).unwrap(), &hn, d, LM_BLOCK));
            for block in [65, 100, 128, LM_BLOCK] {
                assert!(bits(output_logits(&w, &hn, d, block)) == want, "{rows} rows, block {block}");
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Attention in blocks of query rows (`QUERY_BLOCK`) against one block over all rows: the
    /// same bits while every sum over keys or queries stays within gemm's one summation block
    /// (t <= 512), forward and backward, with a prefix; past it, the same values to rounding.
    #[test]
    fn attention_blocks_keep_the_bits() {
        let dir = std::env::temp_dir().join(format!("sos-fused-blocks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.gguf");
        let spec = TinySpec { d_model: 576, n_head: 9, n_kv_head: 3, d_ff: 256, n_layer: 2, seed: 5, tied: false, ..TinySpec::default() };
        spec.write_gguf(&p).unwrap();
        let m = LoadedModel::open(&p, &LoadOptions { exec: Exec::F32, ..Default::default() }).unwrap().model;
        let w = Weights::of(&m).unwrap();
        let d = m.cfg.d_model;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (b, from, r) in [(2, 0, 200), (2, 150, 300), (1, 37, 129), (2, 400, 300)] {
            let ids: Vec<Vec<u32>> = (0..b).map(|s| (0..from + r).map(|i| ((i * 31 + s * 7) % 200 + 3) as u32).collect()).collect();
            let x = m.embed_batch(&ids).unwrap();
            let prefix = (from > 0).then(|| m.prefix(&x.narrow(1, 0, from).unwrap()).unwrap());
            let h = flat(&x.narrow(1, from, r).unwrap()).unwrap();
            let g: Vec<f32> = (0..h.len()).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 1e-2).collect();
            let pass = |qblock: usize| {
                let dm = Dims { qblock, ..dims(&m, b, r, from) };
                let (tapes, out) = forward_group(&w, dm, h.clone(), prefix.as_ref(), &(0..b)).unwrap();
                (out, backward_group(&w, dm, tapes, g.clone()))
            };
            let (whole, blocked) = (pass(usize::MAX), pass(layer::QUERY_BLOCK));
            assert!(whole.0.len() == b * r * d && whole.1.len() == b * r * d);
            if from + r <= 512 {
                assert!(bits(&whole.0) == bits(&blocked.0), "forward, from {from}, r {r}");
                assert!(bits(&whole.1) == bits(&blocked.1), "backward, from {from}, r {r}");
            } else {
                for (a, c) in [(&whole.0, &blocked.0), (&whole.1, &blocked.1)] {
                    let top = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let worst = a.iter().zip(c.iter()).fold(0f32, |m, (a, c)| m.max((a - c).abs()));
                    assert!(worst <= 1e-4 * top, "from {from}, r {r}: off by {worst} at scale {top}");
                }
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
