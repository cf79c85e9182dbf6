//! safetensors header validation (header length, JSON, tensor extents against the file).
//! Any input may be rejected with an error; a panic, abort, OOM or timeout is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sos_model::safetensors::check_safetensors(std::path::Path::new("fuzz.safetensors"), data);
});
