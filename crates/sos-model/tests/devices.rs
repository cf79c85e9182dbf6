//! The CUDA path against the CPU, whenever this build has CUDA and the machine a GPU (the test
//! says so and returns otherwise: it is compiled in every build, so it cannot rot unseen).
//!
//! `--exec f32` computes the same thing on both devices (dequantized weights, tensor ops), so the
//! greedy tokens must be identical. `--exec quant` is not the same arithmetic: candle's CUDA
//! kernels, like llama.cpp's CUDA backend, quantize activations to Q8_1 and add a Q4_1 block's
//! minimum as `m * sum(x)` over the *unquantized* activations, where the CPU kernels (ggml's CPU
//! path) use `m * d * sum(q)`. That moves a Q4_1 product by ~1e-2 relative against the CPU (Q8_0:
//! ~2e-4), enough to flip a greedy choice at a near-tie of a random tiny model. So quant is held
//! to a bound on the logits along the CPU's own greedy sequence (teacher forcing), and to the
//! same top-1 wherever the CPU's top-2 margin is clear.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sos_model::generate::{generate, Sampling};
use sos_model::gguf::TensorType;
use sos_model::tiny::TinySpec;
use sos_model::{cache, Exec, LoadOptions, LoadedModel, Model};

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("devices: no CUDA device here ({e}); nothing to compare");
            None
        }
    }
}

fn open(path: &Path, exec: Exec, device: &Device) -> LoadedModel {
    LoadedModel::open(path, &LoadOptions { exec, device: device.clone(), template: None }).unwrap()
}

fn greedy(m: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let x = m.embed_ids(prompt).unwrap();
    generate(m, &x, n, &[], Sampling::default(), |_| Ok(true)).unwrap().tokens
}

/// Logits `[len, vocab]` of every position of `seq` in one forward pass, on the CPU in f32.
fn logits(m: &Model, seq: &[u32]) -> Vec<Vec<f32>> {
    let x = m.embed_ids(seq).unwrap().unsqueeze(0).unwrap();
    let h = m.forward(&x, 0, None).unwrap().squeeze(0).unwrap();
    let l = m.logits(&h).unwrap().to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    l.to_vec2().unwrap()
}

/// Largest relative L2 difference of a row, and the rows whose clear argmax differs.
fn compare(cpu: &[Vec<f32>], gpu: &[Vec<f32>]) -> (f64, Vec<usize>) {
    let mut worst = 0f64;
    let mut flips = Vec::new();
    for (i, (a, b)) in cpu.iter().zip(gpu).enumerate() {
        let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        worst = worst.max(diff / norm.max(1e-12));
        let t = Tensor::new(a.as_slice(), &Device::Cpu).unwrap();
        let mean = t.mean_all().unwrap().to_scalar::<f32>().unwrap();
        let std = (a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / a.len() as f32).sqrt();
        let mut order: Vec<usize> = (0..a.len()).collect();
        order.sort_by(|&x, &y| a[y].total_cmp(&a[x]));
        let clear = a[order[0]] - a[order[1]] > 0.05 * std;
        let gpu_top = (0..b.len()).max_by(|&x, &y| b[x].total_cmp(&b[y]).then(y.cmp(&x))).unwrap();
        if clear && gpu_top != order[0] {
            flips.push(i);
        }
    }
    (worst, flips)
}

/// `path` on the CPU and on `gpu`: identical f32 greedy tokens after `prompt` (`n` of them), and
/// quant logits along the CPU's own greedy sequence within `bound` (relative L2), with the same
/// top-1 wherever the CPU's is clear.
fn check_devices(path: &Path, gpu: &Device, prompt: &[u32], n: usize, bound: f64) {
    let (cpu_f32, gpu_f32) = (open(path, Exec::F32, &Device::Cpu), open(path, Exec::F32, gpu));
    let want = greedy(&cpu_f32.model, prompt, n);
    assert_eq!(greedy(&gpu_f32.model, prompt, n), want, "{path:?}: f32 tokens differ between devices");
    let (cpu_q, gpu_q) = (open(path, Exec::Quant, &Device::Cpu), open(path, Exec::Quant, gpu));
    let seq: Vec<u32> = prompt.iter().copied().chain(greedy(&cpu_q.model, prompt, n)).collect();
    let (worst, flips) = compare(&logits(&cpu_q.model, &seq), &logits(&gpu_q.model, &seq));
    eprintln!("{path:?}: quant logits differ by {worst:.2e} (relative L2), clear top-1 flips at {flips:?}");
    assert!(worst <= bound, "{path:?}: quant logits differ by {worst:e} > {bound:e}");
    assert!(flips.is_empty(), "{path:?}: the GPU's top-1 differs where the CPU's is clear, at {flips:?}");
}

#[test]
fn cuda_agrees_with_the_cpu_on_tiny_models() {
    let Some(gpu) = gpu() else { return };
    let dir = std::env::temp_dir().join(format!("sos-devices-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Relative logit bounds for quant, per weight type (see the module comment).
    let cases = [(None, 1e-4), (Some(TensorType::F16), 2e-3), (Some(TensorType::Q8_0), 2e-3), (Some(TensorType::Q4_1), 3e-2)];
    for (ty, bound) in cases {
        let spec = TinySpec { d_model: 64, n_head: 4, n_kv_head: 2, d_ff: 128, quant: ty, ..TinySpec::default() };
        let path = dir.join(format!("{}.gguf", ty.map_or("f32", |t| t.name())));
        spec.write_gguf(&path).unwrap();
        check_devices(&path, &gpu, &[5, 9, 14, 3, 22], 12, bound);
    }
}

#[test]
fn cuda_agrees_with_the_cpu_on_the_default_model() {
    let Some(gpu) = gpu() else { return };
    let path = cache::resolve(None, &mut |m| eprintln!("{m}")).expect("the default model must be fetchable");
    let tok = sos_model::LoadedModel::open_text(&path, None).unwrap().0;
    let prompt = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n").unwrap();
    check_devices(&path, &gpu, &prompt, 16, 3e-2);
}
