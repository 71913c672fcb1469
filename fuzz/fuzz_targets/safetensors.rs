//! Fuzz target: the `safetensors` reader (see `tests/hostile_harness/mod.rs`, shared with the
//! stable mutation test).
#![no_main]

#[path = "../../tests/hostile_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::run_safetensors(data);
});
