//! Builds a `Model` from a GGUF file or a Hugging Face safetensors folder.
//!
//! Internally every weight is named the GGUF way (`blk.3.attn_q.weight`); Hugging Face names are
//! mapped onto those, so there is one loading path with two sources.

use std::path::Path;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};

use super::config::{Arch, Config};
use super::{Embedding, Exec, Layer, Linear, Model};
use crate::bytes::SharedBytes;
use crate::format::gguf::{Gguf, TensorType};
use crate::format::safetensors::SafeTensorsDir;
use crate::kernels::quant::QWeight;
use crate::error::{Error, Result};

/// Where the weights come from.
pub enum Weights<'a> {
    Gguf(&'a Gguf),
    SafeTensors(&'a SafeTensorsDir),
}

/// Hugging Face name for a GGUF-style weight name.
pub(crate) fn hf_name(name: &str) -> String {
    let fixed = match name {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => name,
    };
    let Some(rest) = fixed.strip_prefix("blk.") else { return fixed.into() };
    let (layer, rest) = rest.split_once('.').unwrap_or((rest, ""));
    let (part, kind) = rest.rsplit_once('.').unwrap_or((rest, "weight"));
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        other => other,
    };
    format!("model.layers.{layer}.{hf}.{kind}")
}

/// llama.cpp stores Llama Q/K rows interleaved per head (pairs `2j, 2j+1` rotate together);
/// this returns, for each half-split row, the stored row it comes from.
fn unpermute_order(n_head: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut order = Vec::with_capacity(n_head * head_dim);
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                order.push(h * head_dim + 2 * j + i);
            }
        }
    }
    order
}

fn reorder_rows(bytes: &[u8], order: &[usize]) -> Vec<u8> {
    let row = bytes.len() / order.len();
    order.iter().flat_map(|&r| &bytes[r * row..(r + 1) * row]).copied().collect()
}

struct Loader<'a> {
    src: Weights<'a>,
    cfg: &'a Config,
    exec: Exec,
    device: &'a Device,
    origin: &'a Path,
}

impl Loader<'_> {
    /// Row permutation to undo for this weight, if any (GGUF Llama Q/K only).
    fn permutation(&self, name: &str) -> Option<Vec<usize>> {
        if !matches!(self.src, Weights::Gguf(_)) || self.cfg.arch != Arch::Llama {
            return None;
        }
        let c = self.cfg;
        if name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias") {
            Some(unpermute_order(c.n_head, c.head_dim))
        } else if name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias") {
            Some(unpermute_order(c.n_kv_head, c.head_dim))
        } else {
            None
        }
    }

    fn check_shape(&self, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
        if got != want {
            return Err(Error::format(
                self.origin,
                format!("tensor `{name}` has shape {got:?}, expected {want:?} from the model config"),
            ));
        }
        Ok(())
    }

    /// The tensor's raw bytes (Q/K rows un-permuted, else shared with the file's map) and
    /// type, after checking its shape.
    fn raw(&self, g: &Gguf, name: &str, shape: &[usize]) -> Result<(SharedBytes, TensorType)> {
        let info = g
            .tensor_info(name)
            .ok_or_else(|| Error::format(self.origin, format!("missing tensor `{name}`")))?;
        self.check_shape(name, &info.shape(), shape)?;
        let bytes = match self.permutation(name) {
            Some(order) => SharedBytes::owned(reorder_rows(g.tensor_bytes(info), &order)),
            None => g.tensor_shared(info)?,
        };
        Ok((bytes, info.ty))
    }

    fn qtensor(&self, g: &Gguf, name: &str, shape: &[usize], device: &Device) -> Result<QTensor> {
        let (bytes, ty) = self.raw(g, name, shape)?;
        candle_core::quantized::ggml_file::qtensor_from_ggml(ty.to_candle(), &bytes, shape.to_vec(), device)
            .map_err(|e| Error::format(self.origin, format!("tensor `{name}`: {e}")))
    }

    /// A quantized GGUF weight: our kernels where we have them, candle's otherwise.
    fn quant_linear(&self, g: &Gguf, name: &str, out: usize, inp: usize) -> Result<Linear> {
        let (bytes, ty) = self.raw(g, name, &[out, inp])?;
        if QWeight::supports(ty) && self.device.is_cpu() {
            return Ok(Linear::Kernel(QWeight::shared(ty, out, inp, bytes)?));
        }
        Ok(Linear::Quant(QMatMul::from_qtensor(self.qtensor(g, name, &[out, inp], self.device)?)?))
    }

    /// The token table: in `quant` mode a quantized GGUF table stays in its blocks (rows are
    /// dequantized on lookup); otherwise f32 on the target device.
    fn embedding(&self, rows: usize, cols: usize) -> Result<Embedding> {
        let name = "token_embd.weight";
        if let (Exec::Quant, Weights::Gguf(g)) = (self.exec, &self.src) {
            let (bytes, ty) = self.raw(g, name, &[rows, cols])?;
            if ty != TensorType::F32 {
                return Embedding::quant(ty, rows, cols, bytes).map_err(|e| Error::format(self.origin, e.to_string()));
            }
        }
        Ok(Embedding::Dense(self.dense(name, &[rows, cols])?))
    }

    /// A float tensor in f32 on the target device.
    fn dense(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = match self.src {
            Weights::Gguf(g) => self.qtensor(g, name, shape, &Device::Cpu)?.dequantize(&Device::Cpu)?,
            Weights::SafeTensors(st) => {
                let t = st.tensor(&hf_name(name))?;
                self.check_shape(name, t.dims(), shape)?;
                t
            }
        };
        Ok(t.to_device(self.device)?)
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        match (self.exec, &self.src) {
            (Exec::F32, _) => Ok(Linear::Dense(self.dense(name, &[out, inp])?)),
            (Exec::Quant, Weights::Gguf(g)) => self.quant_linear(g, name, out, inp),
            (Exec::Quant, Weights::SafeTensors(_)) => {
                let w = self.dense(name, &[out, inp])?;
                if inp % 32 != 0 {
                    return Ok(Linear::Dense(w));
                }
                Ok(Linear::Quant(QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?))
            }
        }
    }

    fn has(&self, name: &str) -> bool {
        match self.src {
            Weights::Gguf(g) => g.tensor_info(name).is_some(),
            Weights::SafeTensors(st) => st.contains(&hf_name(name)),
        }
    }

    fn bias(&self, name: &str, n: usize) -> Result<Option<Tensor>> {
        if !self.cfg.qkv_bias {
            return Ok(None);
        }
        let b = self.dense(name, &[n])?;
        Ok(Some(match self.permutation(name) {
            Some(order) => {
                let idx = Tensor::new(order.iter().map(|&i| i as u32).collect::<Vec<_>>(), self.device)?;
                b.index_select(&idx, 0)?
            }
            None => b,
        }))
    }
}

/// Most positions any single forward will ever need; bounds the rotary tables of models that
/// advertise 128k+ contexts.
const MAX_ROPE_POSITIONS: usize = 32_768;

pub fn build_model(src: Weights<'_>, cfg: &Config, exec: Exec, device: &Device, origin: &Path) -> Result<Model> {
    let l = Loader { src, cfg, exec, device, origin };
    let (d, hd, ff) = (cfg.d_model, cfg.head_dim, cfg.d_ff);
    let (nq, nkv) = (cfg.n_head * hd, cfg.n_kv_head * hd);
    let embed = l.embedding(cfg.vocab_size, d)?;
    let lm_head = match (cfg.tied || !l.has("output.weight"), exec, &l.src, &embed) {
        (true, Exec::F32, _, Embedding::Dense(e)) => Linear::Dense(e.clone()),
        (true, Exec::Quant, Weights::Gguf(g), _) => l.quant_linear(g, "token_embd.weight", cfg.vocab_size, d)?,
        (true, Exec::Quant, Weights::SafeTensors(_), Embedding::Dense(e)) => {
            Linear::Quant(QMatMul::from_qtensor(QTensor::quantize(e, GgmlDType::Q8_0)?)?)
        }
        (false, _, _, _) => l.linear("output.weight", cfg.vocab_size, d)?,
        // `embedding` keeps a table quantized only in quant mode from a GGUF file.
        (true, _, _, Embedding::Quant { .. }) => return Err(Error::Invalid("a quantized token table outside quant mode".into())),
    };
    let mut layers = Vec::with_capacity(cfg.n_layer);
    for i in 0..cfg.n_layer {
        let n = |s: &str| format!("blk.{i}.{s}");
        let mut layer = Layer {
            attn_norm: l.dense(&n("attn_norm.weight"), &[d])?,
            wq: l.linear(&n("attn_q.weight"), nq, d)?,
            wk: l.linear(&n("attn_k.weight"), nkv, d)?,
            wv: l.linear(&n("attn_v.weight"), nkv, d)?,
            wo: l.linear(&n("attn_output.weight"), d, nq)?,
            bq: l.bias(&n("attn_q.bias"), nq)?,
            bk: l.bias(&n("attn_k.bias"), nkv)?,
            bv: l.bias(&n("attn_v.bias"), nkv)?,
            ffn_norm: l.dense(&n("ffn_norm.weight"), &[d])?,
            w_gate: l.linear(&n("ffn_gate.weight"), ff, d)?,
            w_up: l.linear(&n("ffn_up.weight"), ff, d)?,
            w_down: l.linear(&n("ffn_down.weight"), d, ff)?,
        };
        stack(&mut [&mut layer.wq, &mut layer.wk, &mut layer.wv])?;
        stack(&mut [&mut layer.w_gate, &mut layer.w_up])?;
        layers.push(layer);
    }
    let norm = l.dense("output_norm.weight", &[d])?;
    let (cos, sin) = Model::rope_tables(cfg, cfg.max_seq.min(MAX_ROPE_POSITIONS), device)?;
    Ok(Model { cfg: cfg.clone(), exec, device: device.clone(), embed, layers, norm, lm_head, cos, sin, transposed: None })
}

/// Dense weights that read the same input, stacked into one tensor with each kept as a view of
/// its rows: the CPU reverse pass then runs them as a single matrix product (`reverse_cpu.rs`).
/// Quantized weights are left as they are.
fn stack(ws: &mut [&mut Linear]) -> Result<()> {
    let Some(all) = Linear::stacked(&ws.iter().map(|w| &**w).collect::<Vec<_>>())? else { return Ok(()) };
    let mut row = 0;
    for w in ws.iter_mut() {
        let Linear::Dense(part) = &**w else { unreachable!("stacked returns None unless every weight is dense") };
        let rows = part.dim(0)?;
        **w = Linear::Dense(all.narrow(0, row, rows)?);
        row += rows;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names() {
        assert_eq!(hf_name("blk.3.attn_q.weight"), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(hf_name("blk.0.attn_k.bias"), "model.layers.0.self_attn.k_proj.bias");
        assert_eq!(hf_name("blk.12.ffn_norm.weight"), "model.layers.12.post_attention_layernorm.weight");
        assert_eq!(hf_name("output.weight"), "lm_head.weight");
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: stored[h, j, i] = hf[h, i, j] with i in 0..2, j in 0..half.
        let (n_head, hd) = (2, 6);
        let half = hd / 2;
        let hf: Vec<usize> = (0..n_head * hd).collect();
        let mut stored = vec![0; n_head * hd];
        for h in 0..n_head {
            for i in 0..2 {
                for j in 0..half {
                    stored[h * hd + 2 * j + i] = hf[h * hd + i * half + j];
                }
            }
        }
        let back: Vec<usize> = unpermute_order(n_head, hd).iter().map(|&r| stored[r]).collect();
        assert_eq!(back, hf);
    }
}
