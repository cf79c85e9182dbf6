//! Loading an injected file takes no more memory than loading the original plus the new rows.
//! A loaded model's memory is its heap, measured with a counting allocator (this test binary's
//! own; one test, so nothing else allocates meanwhile) around `LoadedModel::open`, plus the file
//! it maps (quantized weights are read in place, page by page as they are used: all of them).
//! Checked on tiny models, original against injected copies. A tied table given an output layer
//! of its own costs the table once more, and the measure says so.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use sos_dist::gguf_add::{add_tokens, NewLogits};
use sos_dist::tokens::added_texts;
use sos_model::gguf::{Gguf, TensorType};
use sos_model::tiny::TinySpec;
use sos_model::{Exec, LoadOptions, LoadedModel};

struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            PEAK.fetch_max(NOW.fetch_add(l.size(), Relaxed) + l.size(), Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        NOW.fetch_sub(l.size(), Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

/// (peak while loading, held once loaded) in bytes: heap above what was held before, plus the
/// mapped file.
fn load_cost(path: &Path, exec: Exec) -> (usize, usize) {
    let mapped = std::fs::metadata(path).unwrap().len() as usize;
    let before = NOW.load(Relaxed);
    PEAK.store(before, Relaxed);
    let lm = LoadedModel::open(path, &LoadOptions { exec, ..Default::default() }).unwrap();
    let held = NOW.load(Relaxed) - before;
    let peak = PEAK.load(Relaxed) - before;
    drop(lm);
    (peak + mapped, held + mapped)
}

#[test]
fn an_injected_file_loads_in_the_original_plus_its_rows() {
    let d = std::env::temp_dir().join(format!("sos-memory-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let (k, width) = (4, 256);
    let texts = added_texts("cf", k).unwrap();
    let rows: Vec<f32> = (0..k * width).map(|i| (i % 7) as f32 * 0.01).collect();
    for exec in [Exec::F32, Exec::Quant] {
        for (tied, logits) in [(false, NewLogits::Silent), (true, NewLogits::Tied), (true, NewLogits::Silent)] {
            let spec = TinySpec { tied, d_model: width, n_head: 4, n_kv_head: 4, quant: Some(TensorType::Q8_0), ..Default::default() };
            let (src, out) = (d.join(format!("src-{tied}.gguf")), d.join(format!("out-{tied}-{logits:?}.gguf")));
            spec.write_gguf(&src).unwrap();
            let g = Gguf::open(&src).unwrap();
            add_tokens(&g, &texts, &rows, logits).unwrap().0.write(&out).unwrap();
            let (peak0, held0) = load_cost(&src, exec);
            let (peak1, held1) = load_cost(&out, exec);
            // The new rows as the loader holds them at most (f32) and in the file (Q8_0: less), in
            // the table and, when the output layer is the model's own, in it too; and the
            // tokenizer's entries for them.
            let n_vocab = sos_model::tiny::vocab().len();
            let rows_bytes = 2 * k * width * 4 * if tied { 1 } else { 2 };
            let allowance = rows_bytes + 16 * 1024;
            let what = format!("{exec:?}, tied {tied}, {logits:?}: held {held0} -> {held1}, peak {peak0} -> {peak1}, rows {rows_bytes}");
            eprintln!("{what}");
            if tied && logits == NewLogits::Silent {
                // An output layer of its own: the table's rows once more (at least Q8_0's bytes).
                assert!(held1 > held0 + n_vocab * width, "{what}");
            } else {
                assert!(held1 <= held0 + allowance, "{what}");
                assert!(peak1 <= peak0 + allowance, "{what}");
            }
        }
    }
    std::fs::remove_dir_all(&d).unwrap();
}
