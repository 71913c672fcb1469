//! Every file reader against mutated real files, on the stable toolchain (what CI runs; the
//! coverage-guided libFuzzer targets in `fuzz/` run the same harness for longer).
//!
//! Seeds are files written by the crate itself ([`harness::seeds`]); every input kept in
//! `fuzz/regressions/<format>/` (crashes found by fuzzing, kept after their fix) is replayed
//! as it is. Each seed is mutated (bit flips, byte and word overwrites with boundary values,
//! truncation, splices), both as a whole file and as a payload behind a valid envelope. A panic, an allocation of
//! more than 2 GiB (the global allocator below refuses it and the process aborts loudly) or
//! an input taking more than 10 s fails the test.
//!
//! `NNCOMPRESS_HOSTILE_ITERS` sets the mutations per format (default 20,000).

mod hostile_harness;

use hostile_harness as harness;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

/// The allocation cap of the fuzz runs (libFuzzer's `-malloc_limit_mb=2048`).
const CAP: usize = 2 << 30;

struct Capped;

// SAFETY: forwards to the system allocator; only refuses (returns null for) requests past
// the cap, which the standard library turns into a reported allocation failure.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP {
            refused();
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout contract is forwarded unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP {
            refused();
            return std::ptr::null_mut();
        }
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > CAP {
            refused();
            return std::ptr::null_mut();
        }
        // SAFETY: as `alloc`; `ptr` came from this allocator with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Says why the process is about to abort: straight to stderr (libtest captures `eprintln!`,
/// and the abort would lose it), without allocating (this runs inside the allocator).
fn refused() {
    use std::io::Write;
    let _ = std::io::stderr().write_all(
        b"hostile_files: refused an allocation over the 2 GiB cap (the process aborts)\n",
    );
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

const BOUNDARY: [u32; 9] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    u32::MAX,
];

/// One random mutation of `input` (never of its mode byte, which is flipped separately).
fn mutate(input: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut v = input.to_vec();
    if v.len() < 2 {
        v.push(rng.random());
        return v;
    }
    let at = rng.random_range(1..v.len());
    match rng.random_range(0..7) {
        0 => v[at] ^= 1 << rng.random_range(0..8),
        1 => v[at] = rng.random(),
        2 => {
            let word = BOUNDARY[rng.random_range(0..BOUNDARY.len())].to_le_bytes();
            let word = if rng.random() {
                word
            } else {
                u32::from_le_bytes(word).to_be_bytes()
            };
            for (i, b) in word.iter().enumerate() {
                if let Some(slot) = v.get_mut(at + i) {
                    *slot = *b;
                }
            }
        }
        3 => v.truncate(at),
        4 => {
            let len = rng.random_range(1..=16.min(v.len() - at));
            let chunk = v[at..at + len].to_vec();
            let to = rng.random_range(1..v.len());
            v.splice(to..to, chunk);
        }
        5 => {
            let len = rng.random_range(1..=16.min(v.len() - at));
            v.drain(at..at + len);
        }
        _ => {
            // A length-like 64-bit word (the envelope and the streams carry u64 lengths).
            let big = [0u64, 1, u64::from(u32::MAX) + 1, 1 << 40, u64::MAX][rng.random_range(0..5)];
            for (i, b) in big.to_le_bytes().iter().enumerate() {
                if let Some(slot) = v.get_mut(at + i) {
                    *slot = *b;
                }
            }
        }
    }
    v
}

fn regression_inputs(format: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(format);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Runs `input` through the format's harness: `Err` with a description when it panics or
/// takes longer than 10 s.
/// Runs `input` through the format's harness: whether it was accepted and how long it took,
/// or `Err` with a description when it panics or takes longer than 10 s.
fn check(format: &str, input: &[u8]) -> Result<(bool, Duration), String> {
    let run = harness::runner(format);
    let start = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(|| run(input)));
    let took = start.elapsed();
    match outcome {
        Err(_) => Err(format!(
            "{format}: panic on input {:02x?}",
            &input[..input.len().min(64)]
        )),
        Ok(_) if took > Duration::from_secs(10) => Err(format!("{format}: {took:?} on one input")),
        Ok(accepted) => Ok((accepted, took)),
    }
}

#[test]
fn every_reader_survives_mutated_files() {
    let iterations: usize = std::env::var("NNCOMPRESS_HOSTILE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    // The panic messages of caught panics would flood the output; failures are listed below.
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    for format in harness::FORMATS {
        // Seeds are mutated; kept regression inputs are replayed as they are (mutating the
        // 64 MiB gzip bomb thousands of times would cost minutes and test the same limit).
        let pool = harness::seeds(format);
        let regressions = regression_inputs(format);
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let mut slowest = Duration::ZERO;
        for input in harness::seeds(format) {
            // The seeds are valid files: a reader refusing one would make the test vacuous.
            match check(format, &input) {
                Ok((true, _)) => {}
                Ok((false, _)) => failures.push(format!("{format}: a seed was refused")),
                Err(e) => failures.push(e),
            }
        }
        for input in &regressions {
            if let Err(e) = check(format, input) {
                failures.push(e);
            }
        }
        let mut accepted = 0;
        for i in 0..iterations {
            let mut input = mutate(&pool[i % pool.len()], &mut rng);
            // Stack a few more mutations now and then, and flip the mode byte.
            for _ in 0..rng.random_range(0..3) {
                input = mutate(&input, &mut rng);
            }
            if rng.random_bool(0.1) {
                if let Some(m) = input.first_mut() {
                    *m ^= 1;
                }
            }
            match check(format, &input) {
                Ok((ok, t)) => {
                    slowest = slowest.max(t);
                    accepted += usize::from(ok);
                }
                Err(e) => failures.push(e),
            }
        }
        println!(
            "{format}: {} seeds, {} regression inputs, {iterations} mutations ({accepted} accepted), slowest {slowest:?}",
            pool.len(),
            regressions.len()
        );
    }
    let _ = std::panic::take_hook();
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Regenerates the libFuzzer seed corpus `fuzz/seeds/<format>/` from the crate's writers,
/// and the audit's reproducers in `fuzz/regressions/<format>/audit-*`:
/// `cargo test --release --test hostile_files -- --ignored write_fuzz_seeds`.
#[test]
#[ignore = "writes fuzz/seeds; run by hand when a format changes"]
fn write_fuzz_seeds() {
    for format in harness::FORMATS {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds")
            .join(format);
        std::fs::create_dir_all(&dir).expect("seed folder");
        for (i, s) in harness::seeds(format).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).expect("seed file");
        }
    }
    for (format, name, bytes) in harness::audit_reproducers() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/regressions")
            .join(format);
        std::fs::create_dir_all(&dir).expect("regression folder");
        std::fs::write(dir.join(name), bytes).expect("regression file");
    }
}
