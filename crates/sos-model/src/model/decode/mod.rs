//! The one-token decode step on plain buffers.
//!
//! Decoding does a few microseconds of arithmetic per op, so running it as ~25 tensor ops per
//! layer spends most of its time dispatching them. This step does the same arithmetic as
//! `Model::forward` for a single new position, in plain loops over `Vec<f32>`, with the KV cache
//! as flat per-layer buffers; only the weight products go to the matmul kernels.
//!
//! Where every weight can be split by rows, the step runs on a *crew* of threads (`crew.rs`), as ggml does:
//! each member runs the whole step, computes its share of every product's rows and of the
//! attention heads, and waits at a spinning barrier before it reads the others' shares. Handing
//! each of the ~150 products of a step to the rayon pool instead cost a wake-up and a join each,
//! ~10 % of a step on 2 cores. The vector work between products (norms, rotary, quantizing the
//! activations) is small enough that every member repeats it rather than wait at one more barrier.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::{Exec, KvCache, Linear, Model};
use crate::kernels::crew::{Barrier, PoisonOnDrop, Shared, Team};
use crate::kernels::ops;
use crate::kernels::quant::{ActFormat, Q8Row, QWeight};
use crate::kernels::vecmath::{dot, dots, prefetch, PREFETCH_AHEAD};
use crate::error::{Error, Result};

/// Keys and values for decoding: per layer `[kv_head][position][head_dim]`, preallocated.
pub struct DecodeCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    cap: usize,
    inv_freq: Vec<f32>,
}

impl DecodeCache {
    /// Takes over a prefilled `KvCache`, with room for `extra` more positions.
    pub fn from_prefill(model: &Model, kv: &KvCache, extra: usize) -> Result<Self> {
        let c = &model.cfg;
        let len = kv.len();
        // Room for `extra` more positions, but never past the model's context.
        let cap = (len + extra).min(model.cos.dim(0)?);
        let mut k = Vec::with_capacity(c.n_layer);
        let mut v = Vec::with_capacity(c.n_layer);
        for layer in kv.layers() {
            let (kt, vt) = layer.as_ref().ok_or_else(|| Error::Invalid("decode needs a prefilled KV cache".into()))?;
            for (src, dst) in [(kt, &mut k), (vt, &mut v)] {
                // [1, kvh, len, hd] -> [kvh][cap][hd]
                let flat: Vec<f32> = src.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let mut buf = vec![0f32; c.n_kv_head * cap * c.head_dim];
                for h in 0..c.n_kv_head {
                    let n = len * c.head_dim;
                    buf[h * cap * c.head_dim..h * cap * c.head_dim + n].copy_from_slice(&flat[h * n..(h + 1) * n]);
                }
                dst.push(buf);
            }
        }
        Ok(DecodeCache { k, v, len, cap, inv_freq: c.rope_inv_freq() })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A frozen weight applied to one vector, its rows split over the rayon pool.
fn matvec(l: &Linear, x: &[f32]) -> Result<Vec<f32>> {
    match l {
        Linear::Kernel(w) => Ok(w.matmul(x, 1)),
        Linear::Dense(w) => {
            let rows = w.dims2()?.0;
            let mut out = vec![0f32; rows];
            let done = out.par_chunks_mut(64).enumerate().map(|(i, part)| dense_rows(w, x, i * 64..i * 64 + part.len(), &mut [part])).all(|ok| ok);
            if done {
                return Ok(out);
            }
            let t = Tensor::from_slice(x, (1, x.len()), w.device())?;
            Ok(t.matmul(&w.t()?)?.flatten_all()?.to_vec1()?)
        }
        Linear::Quant(_) => {
            let t = Tensor::from_slice(x, (1, x.len()), &candle_core::Device::Cpu)?;
            Ok(l.forward(&t)?.flatten_all()?.to_vec1()?)
        }
    }
}

/// `W_i x` for weights that read the same vector: one pool job when all are our kernels.
fn matvec_many(ls: &[&Linear], x: &[f32]) -> Result<Vec<Vec<f32>>> {
    let kernels: Option<Vec<&QWeight>> = ls
        .iter()
        .map(|l| match l {
            Linear::Kernel(w) => Some(w),
            _ => None,
        })
        .collect();
    match kernels {
        Some(ws) if ws.iter().all(|w| w.act_format() == ws[0].act_format()) => Ok(QWeight::matvec_many(&ws, x)),
        _ => ls.iter().map(|l| matvec(l, x)).collect(),
    }
}

/// Rows `rows` of `W x_s` for every activation `x_s` of `x` (`outs.len()` of them, each as
/// long as a weight row), for an f32 weight `[out, in]` held contiguously in CPU memory; `false`
/// (nothing written) for any other weight. Each weight row is read from memory once for all the
/// activations, and each product is the `dot` one activation alone gets (`dots`).
fn dense_rows(w: &Tensor, x: &[f32], rows: Range<usize>, outs: &mut [&mut [f32]]) -> bool {
    let Ok((n, cols)) = w.dims2() else { return false };
    let (storage, layout) = w.storage_and_layout();
    let data = match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
        _ => return false,
    };
    if x.len() != cols * outs.len() || rows.end > n || outs.iter().any(|o| o.len() != rows.len()) {
        return false;
    }
    let ahead = PREFETCH_AHEAD / std::mem::size_of::<f32>();
    let mut col = vec![0f32; outs.len()];
    for (i, r) in rows.enumerate() {
        let at = (r * cols + ahead).min(data.len());
        prefetch(&data[at..(at + cols).min(data.len())]);
        dots(&data[r * cols..(r + 1) * cols], x, &mut col);
        for (out, v) in outs.iter_mut().zip(&col) {
            out[i] = *v;
        }
    }
    true
}

/// Elements of a weight matrix.
fn elements(l: &Linear) -> usize {
    match l {
        Linear::Kernel(w) => w.rows * w.cols,
        Linear::Dense(w) => w.elem_count(),
        // Not splittable: such a model never forms a crew.
        Linear::Quant(_) => 0,
    }
}

/// Whether a crew member can compute any range of this weight's rows itself.
fn splittable(l: &Linear) -> bool {
    match l {
        Linear::Kernel(_) => true,
        Linear::Dense(w) => w.dims2().is_ok_and(|(_, cols)| dense_rows(w, &vec![0.0; cols], 0..0, &mut [&mut []])),
        Linear::Quant(_) => false,
    }
}

/// `ops::rms_norm` of each row of `x` (rows of `d`) into a new buffer.
fn rms_norm(x: &[f32], d: usize, w: &[f32], eps: f32) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        ops::rms_norm(x, w, eps, y);
    }
    y
}

fn add_bias(x: &mut [f32], b: &Option<Vec<f32>>) {
    if let Some(b) = b {
        add(x, b);
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

fn round_f16(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32());
}

/// Norm weights and biases as plain vectors, read once per model, and how many threads a step
/// runs on.
pub struct DecodeWeights {
    layers: Vec<LayerVecs>,
    norm: Vec<f32>,
    /// Every weight can be split by rows (our kernels or dense f32): the step runs as a crew, or
    /// as a crew of one on the calling thread. Otherwise (weights only candle runs) each sequence's
    /// products go whole to the pool (`Team::Solo`).
    splits: bool,
    /// Members of the crew.
    threads: usize,
    /// A model this small steps on the calling thread: a step's arithmetic is shorter than
    /// handing work to another thread (see `ALONE_BELOW`).
    alone: bool,
    /// Steps left that run on the calling thread alone, after a crew step in which a member
    /// waited for a descheduled one (see `BACKOFF_STEPS`).
    backoff: AtomicUsize,
}

struct LayerVecs {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
}

impl DecodeWeights {
    pub fn new(m: &Model) -> Result<Self> {
        let v = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
        let o = |t: &Option<Tensor>| t.as_ref().map(v).transpose();
        let layers = m
            .layers
            .iter()
            .map(|l| Ok(LayerVecs { attn_norm: v(&l.attn_norm)?, ffn_norm: v(&l.ffn_norm)?, bq: o(&l.bq)?, bk: o(&l.bk)?, bv: o(&l.bv)? }))
            .collect::<Result<_>>()?;
        let linears = || m.layers.iter().flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]).chain([&m.lm_head]);
        let splits = linears().all(splittable);
        let alone = splits && linears().map(elements).sum::<usize>() < ALONE_BELOW;
        // The crew takes as many threads as the pool has, up to `MAX_CREW`.
        let threads = if splits { rayon::current_num_threads().min(MAX_CREW) } else { 1 };
        Ok(DecodeWeights { layers, norm: v(&m.norm)?, splits, threads, alone, backoff: AtomicUsize::new(0) })
    }
}

/// The buffers one step's members share: activations `[sequence][n]`, and each sequence's cache.
struct Bufs<'a> {
    q: Shared<'a>,
    k: Shared<'a>,
    v: Shared<'a>,
    o: Shared<'a>,
    attn: Shared<'a>,
    gate: Shared<'a>,
    up: Shared<'a>,
    f: Shared<'a>,
    down: Shared<'a>,
    logits: Shared<'a>,
    /// `[sequence][layer]`.
    kc: Vec<Vec<Shared<'a>>>,
    vc: Vec<Vec<Shared<'a>>>,
}

/// Where each sequence of a step stands: its new position, its cache's room, and that
/// position's rotary angles `(cos, sin)`.
struct Places {
    pos: Vec<usize>,
    cap: Vec<usize>,
    rot: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Model {
    /// Logits for one new input embedding `x: [d]` placed at position `cache.len()`.
    pub fn decode_step(&self, w: &DecodeWeights, cache: &mut DecodeCache, x: &[f32]) -> Result<Vec<f32>> {
        self.decode_steps(w, &mut [cache], x)
    }

    /// Logits `[sequence][vocab]` (flat) for one new input embedding per sequence: row `s` of
    /// `xs: [sequences, d]` placed at position `caches[s].len()`. Each weight is read once for
    /// all the sequences (a step is bound by reading the weights), and each sequence's logits are
    /// bit for bit what `decode_step` gives it alone: every product is the same dot product.
    pub fn decode_steps(&self, w: &DecodeWeights, caches: &mut [&mut DecodeCache], xs: &[f32]) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let n = caches.len();
        if n == 0 || xs.len() != n * c.d_model {
            return Err(Error::Invalid(format!("decode input has {} values for {n} sequences of the model's width {}", xs.len(), c.d_model)));
        }
        if let Some(full) = caches.iter().find(|k| k.len >= k.cap) {
            return Err(Error::Invalid(format!("sequence of {} positions exceeds the decode cache or the model's context ({})", full.len + 1, full.cap)));
        }
        let places = Places {
            pos: caches.iter().map(|k| k.len).collect(),
            cap: caches.iter().map(|k| k.cap).collect(),
            // Each position's rotary angles, as `Model::rope_tables` computes them.
            rot: caches
                .iter()
                .map(|k| {
                    let (sin, cos): (Vec<f32>, Vec<f32>) = k.inv_freq.iter().map(|&f| (k.len as f32 * f).sin_cos()).unzip();
                    (cos, sin)
                })
                .collect(),
        };
        let (nq, nkv) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let [mut q, mut k, mut v, mut o, mut attn, mut gate, mut up, mut f, mut down, mut logits] =
            [nq, nkv, nkv, nq, c.d_model, c.d_ff, c.d_ff, c.d_ff, c.d_model, c.vocab_size].map(|len| vec![0f32; n * len]);
        let (kc, vc): (Vec<Vec<Shared>>, Vec<Vec<Shared>>) = caches
            .iter_mut()
            .map(|cache| {
                let DecodeCache { k, v, .. } = &mut **cache;
                (k.iter_mut().map(|b| Shared::new(b)).collect(), v.iter_mut().map(|b| Shared::new(b)).collect())
            })
            .unzip();
        let b = Bufs {
            q: Shared::new(&mut q),
            k: Shared::new(&mut k),
            v: Shared::new(&mut v),
            o: Shared::new(&mut o),
            attn: Shared::new(&mut attn),
            gate: Shared::new(&mut gate),
            up: Shared::new(&mut up),
            f: Shared::new(&mut f),
            down: Shared::new(&mut down),
            logits: Shared::new(&mut logits),
            kc,
            vc,
        };
        let step = |team: &Team| self.step_with(team, w, &b, xs, &places);
        let backoff = w.backoff.load(Ordering::Relaxed);
        if !w.splits {
            step(&Team::Solo)?;
        } else if w.threads <= 1 || w.alone || backoff > 0 || rayon::current_thread_index().is_some() {
            // One thread, a tiny model, cores busy with other work, or a step called from inside
            // the pool (whose threads are busy: spinning members would wait on descheduled
            // ones): a crew of one on the calling thread, which still reads each weight row once
            // for all the sequences. Alone a step loses a core's share; in a crew, every phase can
            // wait out another process's time slice (measured on 2 cores beside a build: 5 tok/s
            // in a crew of 2, 38 alone).
            w.backoff.store(backoff.saturating_sub(1), Ordering::Relaxed);
            let alone = Barrier::new(1);
            step(&Team::Member { index: 0, size: 1, barrier: &alone })?;
        } else {
            let barrier = Barrier::new(w.threads);
            let member = |index: usize| {
                let guard = PoisonOnDrop(&barrier, index);
                let r = step(&Team::Member { index, size: w.threads, barrier: &barrier });
                if r.is_ok() {
                    std::mem::forget(guard);
                }
                r
            };
            let mut results: Vec<Result<()>> = std::thread::scope(|s| {
                let mut helpers = Vec::with_capacity(w.threads - 1);
                let mut failed = None;
                for i in 1..w.threads {
                    match std::thread::Builder::new().spawn_scoped(s, move || member(i)) {
                        Ok(h) => helpers.push(h),
                        Err(e) => {
                            // The members already started see the poison and return.
                            barrier.poison(0);
                            failed = Some(Err(Error::Invalid(format!("decode: cannot start a thread: {e}"))));
                            break;
                        }
                    }
                }
                let mut results = vec![failed.unwrap_or_else(|| member(0))];
                for h in helpers {
                    results.push(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
                }
                results
            });
            // The first failure is the cause; the others only saw the poisoned barrier.
            let culprit = barrier.culprit.load(Ordering::Acquire);
            if culprit < results.len() {
                results.swap(0, culprit);
            }
            results.into_iter().collect::<Result<Vec<()>>>()?;
            if barrier.was_slow() {
                w.backoff.store(BACKOFF_STEPS, Ordering::Relaxed);
            }
        }
        drop(b);
        for k in caches.iter_mut() {
            k.len += 1;
        }
        Ok(logits)
    }

    /// One member's run of the step; with `Team::Solo`, the whole step.
    ///
    /// Each phase writes buffers that the next phase reads, after a `sync`; a buffer is written
    /// again two or more syncs after its last read, so no member still reads it then.
    fn step_with(&self, team: &Team, w: &DecodeWeights, b: &Bufs, xs: &[f32], at: &Places) -> Result<()> {
        let c = &self.cfg;
        let (hd, kvh, d) = (c.head_dim, c.n_kv_head, c.d_model);
        let (nq, nkv) = (c.n_head * hd, kvh * hd);
        let n = at.pos.len();
        let eps = c.rms_eps as f32;
        let ggml = self.exec == Exec::Quant;
        let mut h = xs.to_vec();
        for (li, (l, lw)) in self.layers.iter().zip(&w.layers).enumerate() {
            let a = rms_norm(&h, d, &lw.attn_norm, eps);
            self.products(team, &[&l.wq, &l.wk, &l.wv], &a, n, &[&b.q, &b.k, &b.v])?;
            team.sync()?;
            // SAFETY: q, k and v were written before the sync above and are next written by the
            // next layer's first products, five syncs later.
            let (mut q, mut k, mut v) = unsafe { (b.q.whole().to_vec(), b.k.whole().to_vec(), b.v.whole().to_vec()) };
            for (s, (cos, sin)) in at.rot.iter().enumerate() {
                let (q, k, v) = (&mut q[s * nq..(s + 1) * nq], &mut k[s * nkv..(s + 1) * nkv], &mut v[s * nkv..(s + 1) * nkv]);
                add_bias(q, &lw.bq);
                add_bias(k, &lw.bk);
                add_bias(v, &lw.bv);
                ops::rope(q, hd, cos, sin, 1.0);
                ops::rope(k, hd, cos, sin, 1.0);
                if ggml {
                    // As in `Model::ggml_round`: llama.cpp's f16 KV cache and f16 matmul operands.
                    round_f16(q);
                    round_f16(k);
                    round_f16(v);
                }
            }
            if team.leads() {
                for s in 0..n {
                    for head in 0..kvh {
                        let to = (head * at.cap[s] + at.pos[s]) * hd;
                        let from = s * nkv + head * hd..s * nkv + (head + 1) * hd;
                        // SAFETY: only the leader writes the caches, at this step's positions,
                        // which no member reads before the sync below.
                        unsafe { b.kc[s][li].part(to..to + hd) }.copy_from_slice(&k[from.clone()]);
                        // SAFETY: as for the keys.
                        unsafe { b.vc[s][li].part(to..to + hd) }.copy_from_slice(&v[from]);
                    }
                }
            }
            team.sync()?;
            // Attention runs per (sequence, head) pair: `o` holds them in that order.
            let heads = team.share(n * c.n_head, 1);
            // SAFETY: the members' head shares are disjoint; `o` was last read by the previous
            // layer's `wo` product, five syncs ago.
            let o = unsafe { b.o.part(heads.start * hd..heads.end * hd) };
            // SAFETY: this layer's caches were written before the sync above, and are next
            // written at the next token's step.
            let kv: Vec<(&[f32], &[f32])> = (0..n).map(|s| unsafe { (b.kc[s][li].whole(), b.vc[s][li].whole()) }).collect();
            self.attend(team, &q, &kv, at, heads, o);
            team.sync()?;
            // SAFETY: every member wrote its heads of `o` before the sync above; `o` is next
            // written in the next layer.
            self.products(team, &[&l.wo], unsafe { b.o.whole() }, n, &[&b.attn])?;
            team.sync()?;
            // SAFETY: `attn` was written before the sync above, and is next written by the next
            // layer's `wo` product, five syncs later.
            add(&mut h, unsafe { b.attn.whole() });
            let m = rms_norm(&h, d, &lw.ffn_norm, eps);
            self.products(team, &[&l.w_gate, &l.w_up], &m, n, &[&b.gate, &b.up])?;
            // `products` gave this member the same rows of gate and up: its rows of f need no sync.
            let r = team.share(c.d_ff, PRODUCT_ALIGN);
            for s in 0..n {
                let r = s * c.d_ff + r.start..s * c.d_ff + r.end;
                // SAFETY: the members' row shares are disjoint; this member wrote these rows of
                // gate and up itself, and `f` was last read (by `down`'s product) in the
                // previous layer.
                let (gate, up, f) = unsafe { (b.gate.part(r.clone()), b.up.part(r.clone()), b.f.part(r)) };
                ops::swiglu(gate, up, f);
            }
            team.sync()?;
            // SAFETY: every member wrote its rows of `f` before the sync above.
            self.products(team, &[&l.w_down], unsafe { b.f.whole() }, n, &[&b.down])?;
            team.sync()?;
            // SAFETY: `down` was written before the sync above, and is next written by the next
            // layer's `down` product, five syncs later.
            add(&mut h, unsafe { b.down.whole() });
        }
        let hn = rms_norm(&h, d, &w.norm, eps);
        self.products(team, &[&self.lm_head], &hn, n, &[&b.logits])
    }

    /// This member's rows of `out_i = W_i x_s` for weights that read the same activations `x:
    /// [n, cols]`, into `outs` (`[n, rows_i]`); the whole products, on the pool, for
    /// `Team::Solo`. Weights with equally many rows are cut alike.
    fn products(&self, team: &Team, ls: &[&Linear], x: &[f32], n: usize, outs: &[&Shared]) -> Result<()> {
        let cols = x.len() / n;
        if let Team::Solo = team {
            for (s, xs) in x.chunks_exact(cols).enumerate() {
                for (y, out) in matvec_many(ls, xs)?.into_iter().zip(outs) {
                    let rows = out.len / n;
                    if y.len() != rows {
                        return Err(Error::Invalid(format!("decode: a weight has {} rows where {rows} were expected", y.len())));
                    }
                    // SAFETY: a solo step has no other member.
                    unsafe { out.part(s * rows..(s + 1) * rows) }.copy_from_slice(&y);
                }
            }
            return Ok(());
        }
        // Activations quantized once per activation format.
        let mut qx: Option<(ActFormat, Vec<Q8Row>)> = None;
        for (l, out) in ls.iter().zip(outs) {
            let rows = out.len / n;
            let r = team.share(rows, PRODUCT_ALIGN);
            // SAFETY: members' shares are disjoint, and the caller syncs before anyone reads.
            let mut dst: Vec<&mut [f32]> = (0..n).map(|s| unsafe { out.part(s * rows + r.start..s * rows + r.end) }).collect();
            match l {
                Linear::Kernel(w) if w.rows == rows && w.cols == cols => {
                    if qx.as_ref().map(|(f, _)| *f) != Some(w.act_format()) {
                        qx = Some((w.act_format(), x.chunks_exact(cols).map(|xs| w.quantize(xs)).collect()));
                    }
                    let (_, q) = qx.as_ref().expect("quantized just above");
                    w.rows_into(q, r, &mut dst);
                }
                Linear::Dense(w) if w.dims2().is_ok_and(|(n, _)| n == rows) && dense_rows(w, x, r, &mut dst) => {}
                _ => return Err(Error::Invalid("decode: a weight of unexpected type or shape for a split step".into())),
            }
        }
        Ok(())
    }

    /// Attention at each sequence's new position, for the (sequence, query head) pairs `heads`
    /// (pair `s * n_head + h`) over the cached keys and values `kv[s]`; `out` holds those pairs'
    /// outputs. A solo step spreads the pairs over the pool.
    fn attend(&self, team: &Team, q: &[f32], kv: &[(&[f32], &[f32])], at: &Places, heads: Range<usize>, out: &mut [f32]) {
        let c = &self.cfg;
        let hd = c.head_dim;
        let g = c.n_head / c.n_kv_head;
        let ggml = self.exec == Exec::Quant;
        let scale = 1.0 / (hd as f32).sqrt();
        let head = |pair: usize, oh: &mut [f32]| {
            let (s, qh) = (pair / c.n_head, pair % c.n_head);
            let ((kc, vc), cap, pos) = (kv[s], at.cap[s], at.pos[s]);
            let base = (qh / g) * cap * hd;
            let qv = &q[pair * hd..(pair + 1) * hd];
            let mut p: Vec<f32> = (0..=pos).map(|j| dot(qv, &kc[base + j * hd..base + (j + 1) * hd]) * scale).collect();
            let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for pj in p.iter_mut() {
                *pj = (*pj - max).exp();
                sum += *pj;
            }
            p.iter_mut().for_each(|pj| *pj /= sum);
            if ggml {
                round_f16(&mut p);
            }
            oh.fill(0.0);
            for (j, &pj) in p.iter().enumerate() {
                let vj = &vc[base + j * hd..base + (j + 1) * hd];
                oh.iter_mut().zip(vj).for_each(|(acc, &vv)| *acc += pj * vv);
            }
        };
        match team {
            Team::Solo => out.par_chunks_mut(hd).enumerate().for_each(|(i, oh)| head(heads.start + i, oh)),
            Team::Member { .. } => out.chunks_mut(hd).enumerate().for_each(|(i, oh)| head(heads.start + i, oh)),
        }
    }
}

/// The most threads a decode step runs on. Members are spawned per step: a spawn and join took
/// ~40 us here, against ~10 ms for a step of the default model on 2 threads, but dozens of them
/// per token would cost more than they share. (Only 2 cores were available to measure on.)
const MAX_CREW: usize = 8;
/// Weights (elements of every product's matrix) under which a step runs alone. The default
/// model has 134 M; a test's tiny model ~0.1 M, whose crew step spent more on the thread spawn
/// and the barriers than on arithmetic (a behaviour audit of one: 37 s in a crew, 7 s alone).
const ALONE_BELOW: usize = 1 << 20;
/// Steps run alone after a crew step that waited for a descheduled member; then the crew is
/// tried again, so a machine that quietens gets its cores back within this many tokens.
const BACKOFF_STEPS: usize = 64;

/// Products are cut at multiples of the rows the kernels take together.
const PRODUCT_ALIGN: usize = 4;

#[cfg(test)]
mod tests;
