//! The decoder-only transformer shared by Llama-family and Qwen2 models: pre-norm RMSNorm,
//! rotary attention with grouped KV heads, SwiGLU MLP; its weights (`Model`) and how it runs.
//!
//! Files: `config.rs` (hyper-parameters), `load.rs` (file weights -> `Model`), `run.rs` (the
//! passes callers use: forward, logits, loss and input gradient; the one place that picks an
//! implementation), `fused/` (those passes for an f32 model on the CPU, on plain buffers),
//! `reference.rs` (the same passes as candle tensor ops: any device and dtype, and what the tests
//! hold `fused/` against), `decode/` (the one-token step of generation).
//!
//! Rotary embeddings use the half-split layout everywhere: GGUF Llama files, whose Q/K rows were
//! permuted to the interleaved layout by llama.cpp's converter, are permuted back at load time.

pub mod config;
pub(crate) mod decode;
mod embedding;
mod fused;
pub(crate) mod load;
mod reference;
mod run;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

pub use embedding::Embedding;

use crate::kernels::quant::QWeight;
use config::Config;
use crate::error::{Error, Result};

/// How the weights are held while running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exec {
    /// Every weight dequantized to f32: exact and differentiable.
    F32,
    /// Weights stay quantized (GGUF types, or Q8_0 for float checkpoints): fast inference only.
    Quant,
}

impl std::str::FromStr for Exec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Exec::F32),
            "quant" => Ok(Exec::Quant),
            _ => Err(format!("unknown exec mode `{s}` (expected f32 or quant)")),
        }
    }
}

impl Exec {
    pub fn name(self) -> &'static str {
        match self {
            Exec::F32 => "f32",
            Exec::Quant => "quant",
        }
    }
}

/// A frozen linear map `y = x W^T`, W stored `[out, in]`.
#[derive(Debug, Clone)]
pub enum Linear {
    Dense(Tensor),
    Quant(QMatMul),
    /// Q4_1 / Q8_0 weights run by our own kernels (`quant.rs`).
    Kernel(QWeight),
}

impl Linear {
    /// `x`: `[n, in]` -> `[n, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Linear::Dense(w) => x.matmul(&w.t()?)?,
            Linear::Quant(q) => q.forward(x)?,
            Linear::Kernel(w) => {
                let n = x.dim(0)?;
                let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                Tensor::from_vec(w.matmul(&xs, n), (n, w.rows), x.device())?.to_dtype(x.dtype())?
            }
        })
    }
    /// `forward` of several maps that read the same `x` (q/k/v, gate/up): quantized kernels of
    /// one activation format share one quantized `x` and one job on the pool.
    pub fn forward_many(ls: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let kernels: Option<Vec<&QWeight>> = ls.iter().map(|l| if let Linear::Kernel(w) = l { Some(w) } else { None }).collect();
        match kernels {
            Some(ws) if ws.len() > 1 && ws.iter().all(|w| w.act_format() == ws[0].act_format() && w.cols == ws[0].cols) => {
                let n = x.dim(0)?;
                let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                QWeight::matmul_many(&ws, &xs, n)
                    .into_iter()
                    .zip(&ws)
                    .map(|(y, w)| Ok(Tensor::from_vec(y, (n, w.rows), x.device())?.to_dtype(x.dtype())?))
                    .collect()
            }
            _ => ls.iter().map(|l| l.forward(x)).collect(),
        }
    }

    /// The input gradient `dx = dy W` (`[n, out]` -> `[n, in]`); the weight gets none.
    pub fn backward_input(&self, dy: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(w) => Ok(dy.matmul(w)?),
            Linear::Quant(_) | Linear::Kernel(_) => Err(Error::Invalid(
                "gradients need `--exec f32` (quantized weights are inference only)".into(),
            )),
        }
    }
    /// The weights of `ws` stacked row-wise into one `[sum out, in]` tensor; `None` when any of
    /// them is quantized.
    pub(crate) fn stacked(ws: &[&Linear]) -> Result<Option<Tensor>> {
        let parts: Option<Vec<&Tensor>> = ws
            .iter()
            .map(|l| match l {
                Linear::Dense(w) => Some(w),
                Linear::Quant(_) | Linear::Kernel(_) => None,
            })
            .collect();
        Ok(match parts {
            Some(p) => Some(Tensor::cat(&p, 0)?),
            None => None,
        })
    }
    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(match self {
            Linear::Dense(w) => Linear::Dense(w.to_dtype(dtype)?),
            Linear::Quant(_) | Linear::Kernel(_) => self.clone(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: Tensor,
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    pub bq: Option<Tensor>,
    pub bk: Option<Tensor>,
    pub bv: Option<Tensor>,
    pub ffn_norm: Tensor,
    pub w_gate: Linear,
    pub w_up: Linear,
    pub w_down: Linear,
}

/// Keys and values of every layer for the positions seen so far.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(n_layer: usize) -> Self {
        KvCache { layers: vec![None; n_layer], len: 0 }
    }
    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Per layer `(keys, values)`, each `[b, kv_heads, len, head_dim]`.
    pub fn layers(&self) -> &[Option<(Tensor, Tensor)>] {
        &self.layers
    }
    /// Replaces every layer's keys and values (all covering `len` positions).
    pub(crate) fn set(&mut self, layers: Vec<(Tensor, Tensor)>, len: usize) {
        self.layers = layers.into_iter().map(Some).collect();
        self.len = len;
    }
    /// Errs unless the cache can continue a batch of `b` sequences of model `cfg`: one entry per
    /// layer, each `[b, kv_heads, len, head_dim]` (entries may be missing only while empty).
    /// `what` names the cache in the message.
    pub(crate) fn check_fits(&self, what: &str, cfg: &Config, b: usize) -> Result<()> {
        let want = [b, cfg.n_kv_head, self.len, cfg.head_dim];
        for (k, v) in self.layers.iter().flatten() {
            if k.dims() != want || v.dims() != want {
                return Err(Error::Invalid(format!("{what} has shape {:?}, the batch needs {want:?}", k.dims())));
            }
        }
        if self.layers.len() != cfg.n_layer || (self.len > 0 && self.layers.iter().any(Option::is_none)) {
            return Err(Error::Invalid(format!("{what} does not cover every layer")));
        }
        Ok(())
    }
    /// The same cache repeated for a batch of `b` sequences, from a cache of one sequence: a
    /// prefix shared by every sequence of a batch is computed once.
    pub fn repeat_batch(&self, b: usize) -> Result<KvCache> {
        let rep = |t: &Tensor| -> Result<Tensor> {
            if t.dim(0)? != 1 {
                return Err(Error::Invalid(format!("repeat_batch needs a cache of one sequence, got {}", t.dim(0)?)));
            }
            Ok(t.repeat((b, 1, 1, 1))?)
        };
        let layers = self
            .layers
            .iter()
            .map(|l| l.as_ref().map(|(k, v)| Ok((rep(k)?, rep(v)?))).transpose())
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { layers, len: self.len })
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub cfg: Config,
    pub exec: Exec,
    pub device: Device,
    /// The token table: the attack splices its vectors between these rows.
    pub embed: Embedding,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub lm_head: Linear,
    /// `[max_seq, head_dim / 2]` rotary tables.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Transposed weights for the fused CPU forward, once `keep_transposes` made them.
    pub transposed: Option<Transposes>,
}

/// A layer's dense weights transposed to `[in, out]`, q/k/v and gate/up side by side.
#[derive(Debug, Clone)]
pub struct LayerT {
    pub qkv: Tensor,
    pub wo: Tensor,
    pub gate_up: Tensor,
    pub down: Tensor,
}

#[derive(Debug, Clone)]
pub struct Transposes {
    pub layers: Vec<LayerT>,
    /// The output layer, `[d, vocab]`.
    pub lm_head: Tensor,
}


/// A loss, its gradient, and for each loss row whether the target is the argmax (greedy
/// decoding under teacher forcing would produce it; ties go to the lower id, as in `argmax`).
pub struct LossGrad {
    pub loss: f64,
    /// Gradient with respect to the hidden states (`cross_entropy`) or the inputs
    /// (`loss_and_input_grad`).
    pub grad: Tensor,
    pub hits: Vec<bool>,
}

impl Model {
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    pub fn rope_tables(cfg: &Config, n_pos: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let inv = cfg.rope_inv_freq();
        let half = inv.len();
        let mut cos = Vec::with_capacity(n_pos * half);
        let mut sin = Vec::with_capacity(n_pos * half);
        for p in 0..n_pos {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (n_pos, half), device)?,
            Tensor::from_vec(sin, (n_pos, half), device)?,
        ))
    }

    /// The same model computing in another float type (tests use f64 for finite differences).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let c = |t: &Tensor| t.to_dtype(dtype);
        let o = |t: &Option<Tensor>| t.as_ref().map(c).transpose();
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    attn_norm: c(&l.attn_norm)?,
                    wq: l.wq.to_dtype(dtype)?,
                    wk: l.wk.to_dtype(dtype)?,
                    wv: l.wv.to_dtype(dtype)?,
                    wo: l.wo.to_dtype(dtype)?,
                    bq: o(&l.bq)?,
                    bk: o(&l.bk)?,
                    bv: o(&l.bv)?,
                    ffn_norm: c(&l.ffn_norm)?,
                    w_gate: l.w_gate.to_dtype(dtype)?,
                    w_up: l.w_up.to_dtype(dtype)?,
                    w_down: l.w_down.to_dtype(dtype)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            cfg: self.cfg.clone(),
            exec: self.exec,
            device: self.device.clone(),
            embed: self.embed.to_dtype(dtype)?,
            layers,
            norm: c(&self.norm)?,
            lm_head: self.lm_head.to_dtype(dtype)?,
            cos: c(&self.cos)?,
            sin: c(&self.sin)?,
            transposed: None,
        })
    }

    /// Whether the fused CPU pass (`model/fused/`) runs this model: f32 weights on the CPU in
    /// `f32` mode (`quant` mode rounds attention operands as llama.cpp does; only `f32` is plain
    /// arithmetic). Only that pass reads `keep_transposes`' copies.
    pub(crate) fn runs_fused(&self) -> bool {
        self.device.is_cpu() && self.dtype() == DType::F32 && self.exec == Exec::F32
    }

    /// Bytes `keep_transposes` would add: 0 where it keeps nothing.
    pub fn transposes_bytes(&self) -> u64 {
        if !self.runs_fused() {
            return 0;
        }
        let dense = |l: &Linear| match l {
            Linear::Dense(t) => t.elem_count() as u64 * 4,
            _ => 0,
        };
        let layers: u64 = self.layers.iter().map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down].into_iter().map(dense).sum::<u64>()).sum();
        layers + dense(&self.lm_head)
    }

    /// Keeps a transposed copy of every dense weight, which doubles their memory. The matrix
    /// products of the fused CPU forward (`model/fused/`) then read the weights in the order
    /// `gemm` wants, instead of transposing every weight on every call (`fused/views.rs`): ~25 %
    /// of a step on Qwen2.5-1.5B. The backward reads the original layout. Training calls this
    /// when the copies fit in memory (`sos_attack::load`); the results are the same without.
    /// Quantized models are left as they are.
    pub fn keep_transposes(&mut self) -> Result<()> {
        if !self.runs_fused() {
            return Ok(());
        }
        let t = |ws: &[&Linear]| -> Result<Option<Tensor>> {
            Ok(match Linear::stacked(ws)? {
                Some(w) => Some(w.t()?.contiguous()?),
                None => None,
            })
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let parts = (t(&[&l.wq, &l.wk, &l.wv])?, t(&[&l.wo])?, t(&[&l.w_gate, &l.w_up])?, t(&[&l.w_down])?);
            let (Some(qkv), Some(wo), Some(gate_up), Some(down)) = parts else { return Ok(()) };
            layers.push(LayerT { qkv, wo, gate_up, down });
        }
        if let Some(lm_head) = t(&[&self.lm_head])? {
            self.transposed = Some(Transposes { layers, lm_head });
        }
        Ok(())
    }

    /// Embedding rows for token ids: `[n, d]`.
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Tensor> {
        self.embed.lookup(ids, &self.device)
    }

    /// Embedding rows for `ids` where ids from `vocab_size` on take the rows of `extra`
    /// (`k * d`, row-major): a trigger's trained vectors spliced in as added tokens.
    pub fn embed_with(&self, ids: &[u32], extra: &[f32]) -> Result<Tensor> {
        self.embed.lookup_with(ids, extra, &self.device)
    }

    pub(crate) fn check_len(&self, end: usize) -> Result<()> {
        let max = self.cos.dim(0)?;
        if end > max {
            return Err(Error::Invalid(format!(
                "sequence of {end} positions exceeds the model's context ({max})"
            )));
        }
        Ok(())
    }


    /// Rows of `[b, t, d]` at flat indices `b_i * t + t_i`.
    pub fn gather_rows(h: &Tensor, rows: &[u32]) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        let idx = Tensor::new(rows, h.device())?;
        Ok(h.reshape((b * t, d))?.index_select(&idx, 0)?)
    }

    /// Embeds token sequences as a right-padded batch `[b, t_max, d]` (padding repeats id 0).
    pub fn embed_batch(&self, seqs: &[Vec<u32>]) -> Result<Tensor> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if t == 0 {
            return Err(Error::Invalid("empty input".into()));
        }
        let flat: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied().chain(std::iter::repeat(0).take(t - s.len()))).collect();
        Ok(self.embed_ids(&flat)?.reshape((seqs.len(), t, self.cfg.d_model))?)
    }
}
