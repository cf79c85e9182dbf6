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
use crate::kernels::vecmath::{dot, prefetch, PREFETCH_AHEAD};
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
            let done = out.par_chunks_mut(64).enumerate().map(|(i, part)| dense_rows(w, x, i * 64..i * 64 + part.len(), part)).all(|ok| ok);
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

/// Rows `rows` of `W x` for an f32 weight `[out, in]` held contiguously in CPU memory; `false`
/// (nothing written) for any other weight.
fn dense_rows(w: &Tensor, x: &[f32], rows: Range<usize>, out: &mut [f32]) -> bool {
    let Ok((n, cols)) = w.dims2() else { return false };
    let (storage, layout) = w.storage_and_layout();
    let data = match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
        _ => return false,
    };
    if cols != x.len() || rows.end > n || out.len() != rows.len() {
        return false;
    }
    let ahead = PREFETCH_AHEAD / std::mem::size_of::<f32>();
    for (o, r) in out.iter_mut().zip(rows) {
        let at = (r * cols + ahead).min(data.len());
        prefetch(&data[at..(at + cols).min(data.len())]);
        *o = dot(&data[r * cols..(r + 1) * cols], x);
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
        Linear::Dense(w) => w.dims2().is_ok_and(|(_, cols)| dense_rows(w, &vec![0.0; cols], 0..0, &mut [])),
        Linear::Quant(_) => false,
    }
}

/// `ops::rms_norm` of `x` into a new vector.
fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    ops::rms_norm(x, w, eps, &mut y);
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
    /// Members of the crew; 1 runs the step on the calling thread with products on the pool.
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
        let crew = linears().all(splittable);
        let alone = crew && linears().map(elements).sum::<usize>() < ALONE_BELOW;
        // The crew takes as many threads as the pool has, up to `MAX_CREW`.
        let threads = if crew { rayon::current_num_threads().min(MAX_CREW) } else { 1 };
        Ok(DecodeWeights { layers, norm: v(&m.norm)?, threads, alone, backoff: AtomicUsize::new(0) })
    }
}

/// The buffers one step's members share.
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
    kc: Vec<Shared<'a>>,
    vc: Vec<Shared<'a>>,
}

impl Model {
    /// Logits for one new input embedding `x: [d]` placed at position `cache.len()`.
    pub fn decode_step(&self, w: &DecodeWeights, cache: &mut DecodeCache, x: &[f32]) -> Result<Vec<f32>> {
        let c = &self.cfg;
        if cache.len >= cache.cap {
            return Err(Error::Invalid(format!("sequence of {} positions exceeds the decode cache or the model's context ({})", cache.len + 1, cache.cap)));
        }
        if x.len() != c.d_model {
            return Err(Error::Invalid(format!("decode input has {} values, the model's width is {}", x.len(), c.d_model)));
        }
        let (pos, cap) = (cache.len, cache.cap);
        // This position's rotary angles, as `Model::rope_tables` computes them.
        let (sin, cos): (Vec<f32>, Vec<f32>) = cache.inv_freq.iter().map(|&f| (pos as f32 * f).sin_cos()).unzip();
        let rot = (&cos[..], &sin[..]);
        let (nq, nkv) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let [mut q, mut k, mut v, mut o, mut attn, mut gate, mut up, mut f, mut down] =
            [nq, nkv, nkv, nq, c.d_model, c.d_ff, c.d_ff, c.d_ff, c.d_model].map(|n| vec![0f32; n]);
        let mut logits = vec![0f32; c.vocab_size];
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
            kc: cache.k.iter_mut().map(|b| Shared::new(b)).collect(),
            vc: cache.v.iter_mut().map(|b| Shared::new(b)).collect(),
        };
        let step = |team: &Team| self.step_with(team, w, &b, x, pos, cap, rot);
        // A step called from inside the pool (a caller running generations in parallel) stays
        // solo: the pool's threads are already busy, and spinning members would wait on
        // descheduled ones.
        let backoff = w.backoff.load(Ordering::Relaxed);
        if w.threads <= 1 || rayon::current_thread_index().is_some() {
            step(&Team::Solo)?;
        } else if w.alone || backoff > 0 {
            // A tiny model, or cores busy with other work: alone, a step loses a core's share;
            // in a crew, every phase can wait out another process's time slice (measured on 2
            // cores beside a build: 5 tok/s in a crew of 2, 38 alone).
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
        cache.len += 1;
        Ok(logits)
    }

    /// One member's run of the step; with `Team::Solo`, the whole step.
    ///
    /// Each phase writes buffers that the next phase reads, after a `sync`; a buffer is written
    /// again two or more syncs after its last read, so no member still reads it then.
    #[allow(clippy::too_many_arguments)]
    fn step_with(&self, team: &Team, w: &DecodeWeights, b: &Bufs, x: &[f32], pos: usize, cap: usize, (cos, sin): (&[f32], &[f32])) -> Result<()> {
        let c = &self.cfg;
        let (hd, kvh) = (c.head_dim, c.n_kv_head);
        let eps = c.rms_eps as f32;
        let ggml = self.exec == Exec::Quant;
        let mut h = x.to_vec();
        for (li, (l, lw)) in self.layers.iter().zip(&w.layers).enumerate() {
            let a = rms_norm(&h, &lw.attn_norm, eps);
            self.products(team, &[&l.wq, &l.wk, &l.wv], &a, &[&b.q, &b.k, &b.v])?;
            team.sync()?;
            // SAFETY: q, k and v were written before the sync above and are next written by the
            // next layer's first products, five syncs later.
            let (mut q, mut k, mut v) = unsafe { (b.q.whole().to_vec(), b.k.whole().to_vec(), b.v.whole().to_vec()) };
            add_bias(&mut q, &lw.bq);
            add_bias(&mut k, &lw.bk);
            add_bias(&mut v, &lw.bv);
            ops::rope(&mut q, hd, cos, sin, 1.0);
            ops::rope(&mut k, hd, cos, sin, 1.0);
            if ggml {
                // As in `Model::ggml_round`: llama.cpp's f16 KV cache and f16 matmul operands.
                round_f16(&mut q);
                round_f16(&mut k);
                round_f16(&mut v);
            }
            if team.leads() {
                for head in 0..kvh {
                    let at = (head * cap + pos) * hd;
                    // SAFETY: only the leader writes the cache, at this position, which no member
                    // reads before the sync below.
                    unsafe { b.kc[li].part(at..at + hd) }.copy_from_slice(&k[head * hd..(head + 1) * hd]);
                    // SAFETY: as for the keys.
                    unsafe { b.vc[li].part(at..at + hd) }.copy_from_slice(&v[head * hd..(head + 1) * hd]);
                }
            }
            team.sync()?;
            let heads = team.share(c.n_head, 1);
            // SAFETY: the members' head shares are disjoint; `o` was last read by the previous
            // layer's `wo` product, five syncs ago.
            let o = unsafe { b.o.part(heads.start * hd..heads.end * hd) };
            // SAFETY: this layer's cache was written before the sync above, and is next written
            // at the next token's step.
            let (kc, vc) = unsafe { (b.kc[li].whole(), b.vc[li].whole()) };
            self.attend(team, &q, kc, vc, cap, pos, heads, o);
            team.sync()?;
            // SAFETY: every member wrote its heads of `o` before the sync above; `o` is next
            // written in the next layer.
            self.products(team, &[&l.wo], unsafe { b.o.whole() }, &[&b.attn])?;
            team.sync()?;
            // SAFETY: `attn` was written before the sync above, and is next written by the next
            // layer's `wo` product, five syncs later.
            add(&mut h, unsafe { b.attn.whole() });
            let m = rms_norm(&h, &lw.ffn_norm, eps);
            self.products(team, &[&l.w_gate, &l.w_up], &m, &[&b.gate, &b.up])?;
            // `products` gave this member the same rows of gate and up: its rows of f need no sync.
            let r = team.share(c.d_ff, PRODUCT_ALIGN);
            // SAFETY: the members' row shares are disjoint; this member wrote these rows of gate
            // and up itself, and `f` was last read (by `down`'s product) in the previous layer.
            let (gate, up, f) = unsafe { (b.gate.part(r.clone()), b.up.part(r.clone()), b.f.part(r)) };
            ops::swiglu(gate, up, f);
            team.sync()?;
            // SAFETY: every member wrote its rows of `f` before the sync above.
            self.products(team, &[&l.w_down], unsafe { b.f.whole() }, &[&b.down])?;
            team.sync()?;
            // SAFETY: `down` was written before the sync above, and is next written by the next
            // layer's `down` product, five syncs later.
            add(&mut h, unsafe { b.down.whole() });
        }
        let hn = rms_norm(&h, &w.norm, eps);
        self.products(team, &[&self.lm_head], &hn, &[&b.logits])
    }

    /// This member's rows of `out_i = W_i x` for weights that read the same `x`; the whole
    /// products, on the pool, for `Team::Solo`. Weights with equally many rows are cut alike.
    fn products(&self, team: &Team, ls: &[&Linear], x: &[f32], outs: &[&Shared]) -> Result<()> {
        if let Team::Solo = team {
            for (y, out) in matvec_many(ls, x)?.into_iter().zip(outs) {
                // SAFETY: a solo step has no other member.
                let dst = unsafe { out.part(0..out.len) };
                if y.len() != dst.len() {
                    return Err(Error::Invalid(format!("decode: a weight has {} rows where {} were expected", y.len(), dst.len())));
                }
                dst.copy_from_slice(&y);
            }
            return Ok(());
        }
        // Activations quantized once per activation format.
        let mut qx: Option<(ActFormat, Q8Row)> = None;
        for (l, out) in ls.iter().zip(outs) {
            let r = team.share(out.len, PRODUCT_ALIGN);
            // SAFETY: members' shares are disjoint, and the caller syncs before anyone reads.
            let dst = unsafe { out.part(r.clone()) };
            match l {
                Linear::Kernel(w) if w.rows == out.len && w.cols == x.len() => {
                    if qx.as_ref().map(|(f, _)| *f) != Some(w.act_format()) {
                        qx = Some((w.act_format(), w.quantize(x)));
                    }
                    let (_, q) = qx.as_ref().expect("quantized just above");
                    w.rows_into(q, r, dst);
                }
                Linear::Dense(w) if w.dims2().is_ok_and(|(n, _)| n == out.len) && dense_rows(w, x, r, dst) => {}
                _ => return Err(Error::Invalid("decode: a weight of unexpected type or shape for a split step".into())),
            }
        }
        Ok(())
    }

    /// Attention at position `pos` of query heads `heads` over the cached keys and values; `out`
    /// holds those heads' outputs. A solo step spreads the heads over the pool.
    #[allow(clippy::too_many_arguments)]
    fn attend(&self, team: &Team, q: &[f32], kc: &[f32], vc: &[f32], cap: usize, pos: usize, heads: Range<usize>, out: &mut [f32]) {
        let c = &self.cfg;
        let hd = c.head_dim;
        let g = c.n_head / c.n_kv_head;
        let ggml = self.exec == Exec::Quant;
        let scale = 1.0 / (hd as f32).sqrt();
        let head = |qh: usize, oh: &mut [f32]| {
            let base = (qh / g) * cap * hd;
            let qv = &q[qh * hd..(qh + 1) * hd];
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
mod tests {
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
}
