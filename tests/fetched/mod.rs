//! Files the fetch scripts put under `target/models/` (or `$NNCOMPRESS_MODELS`): a test
//! whose data or oracle is missing skips loudly, and fails when `CI` is set.

// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::path::PathBuf;

/// The models folder.
pub fn models_dir() -> PathBuf {
    std::env::var_os("NNCOMPRESS_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/models"))
}

/// Skips loudly (`None`), or panics under `CI`, with `what` and the script that fetches it.
pub fn missing<T>(what: &str, script: &str) -> Option<T> {
    let msg = format!("{what} (run {script})");
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

/// The models folder when every path in `needed` (relative to it) exists.
pub fn require(needed: &[&str], script: &str) -> Option<PathBuf> {
    let dir = models_dir();
    if needed.iter().all(|f| dir.join(f).exists()) {
        return Some(dir);
    }
    missing(
        &format!("{} missing under {}", needed.join(", "), dir.display()),
        script,
    )
}

/// A Python that can `import {modules}`: `NNCOMPRESS_ORT_PYTHON`, else the venv
/// `scripts/fetch_onnx_testdata.sh` makes.
pub fn python_with(modules: &str) -> Option<PathBuf> {
    let py = std::env::var_os("NNCOMPRESS_ORT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| models_dir().join("venv/bin/python"));
    let ok = std::process::Command::new(&py)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    missing(
        &format!("{} cannot import {modules}", py.display()),
        "scripts/fetch_onnx_testdata.sh",
    )
}

/// `rounds` copies of `bytes`, each with one to three bits flipped at places a xorshift
/// generator seeded with `seed` picks (the same seed, the same copies).
pub fn bit_flipped(bytes: &[u8], seed: u64, rounds: usize) -> Vec<Vec<u8>> {
    let mut state = seed.max(1);
    (0..rounds)
        .map(|_| {
            let mut m = bytes.to_vec();
            for _ in 0..1 + (state % 3) as usize {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = (state as usize / 8) % m.len();
                m[at] ^= 1 << (state % 8);
            }
            m
        })
        .collect()
}
