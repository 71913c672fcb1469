//! Fuzz target: the ONNX importer (see `tests/hostile_harness/mod.rs`, shared with the
//! stable mutation test).
#![no_main]

#[path = "../../tests/hostile_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::run_onnx(data);
});
