//! GGUF header parsing, then the two readers of its metadata (model config and tokenizer).
//! Any input may be rejected with an error; a panic, abort, OOM or timeout is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = sos_model::gguf::Gguf::from_bytes("fuzz.gguf", data.to_vec()) {
        let _ = sos_model::Config::from_gguf(&g);
        let _ = sos_model::Tokenizer::from_gguf(&g);
    }
});
