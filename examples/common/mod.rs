//! Helpers shared by the examples: data paths, a progress bar, tables.
#![allow(dead_code)]

use nncompress::train::Progress;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

/// The repository's bundled data folder.
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// The value after `flag` on the command line (`--epochs 3` → `Some("3")`).
pub fn arg(flag: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// Whether `flag` is on the command line.
pub fn has_flag(flag: &str) -> bool {
    std::env::args().any(|a| a == flag)
}

/// Draws a one-line progress bar on stderr when stderr is a terminal; otherwise (a log file,
/// CI) writes one plain line per finished epoch.
pub fn progress_bar(label: &str) -> impl FnMut(&Progress) + '_ {
    let terminal = std::io::stderr().is_terminal();
    move |p: &Progress| {
        if !terminal {
            if p.batch == p.batches {
                eprintln!(
                    "{label} epoch {}/{}: loss {:.4} acc {:.2}%",
                    p.epoch,
                    p.epochs,
                    p.loss,
                    100.0 * p.accuracy
                );
            }
            return;
        }
        // Redraw about a hundred times per epoch, not on every batch.
        let every = (p.batches / 100).max(1);
        if !p.batch.is_multiple_of(every) && p.batch != p.batches {
            return;
        }
        let width = 30;
        let filled = width * p.batch / p.batches.max(1);
        let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
        eprint!(
            "\r{label} epoch {:>2}/{} [{bar}] {:>4}/{} loss {:.4} acc {:6.2}%",
            p.epoch,
            p.epochs,
            p.batch,
            p.batches,
            p.loss,
            100.0 * p.accuracy
        );
        if p.batch == p.batches {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}

/// Prints a table with a header row and aligned columns.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("| {} |", parts.join(" | "));
    };
    line(header.iter().map(|s| s.to_string()).collect());
    println!(
        "|{}|",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for r in rows {
        line(r.clone());
    }
}
