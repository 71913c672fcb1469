//! Text corpora for transformer calibration and evaluation: the Debian `fortunes-min`
//! files (BSD licence) as `scripts/fetch_minilm.sh` fetches them.

use crate::error::{Error, Result};
use std::path::Path;

/// The files of `fortunes-min` read, in this order.
pub const FORTUNE_FILES: [&str; 3] = ["fortunes", "literature", "riddles"];

/// Entries longer than this many characters are dropped (a few hundred characters stay
/// under 128 tokens).
pub const MAX_SENTENCE_CHARS: usize = 400;

/// Sentences split into a part to calibrate (and tune) on and a held-out part that is read
/// once, for the reported figure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextSplit {
    /// Four in five sentences.
    pub calibration: Vec<String>,
    /// Every fifth sentence (indices 4, 9, 14, ... of the corpus).
    pub held_out: Vec<String>,
}

/// Splits `%`-separated fortune text into entries with whitespace collapsed, dropping empty
/// ones and those over [`MAX_SENTENCE_CHARS`] characters.
pub fn parse_fortunes(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chunk: Vec<&str> = Vec::new();
    for line in text.split('\n').chain(std::iter::once("%")) {
        if line == "%" {
            let joined = chunk.join(" ");
            let s = joined.split_whitespace().collect::<Vec<_>>().join(" ");
            if !s.is_empty() && s.chars().count() <= MAX_SENTENCE_CHARS {
                out.push(s);
            }
            chunk.clear();
        } else {
            chunk.push(line);
        }
    }
    out
}

/// Every sentence of [`FORTUNE_FILES`] in `dir`, in file order, split by index (see
/// [`TextSplit`]); `scripts/minilm_reference.py` applies the same rule.
///
/// # Errors
/// [`Error::Io`] for a missing file, [`Error::CorruptFile`] for one that is not UTF-8 or
/// larger than 16 MiB.
pub fn load_fortunes(dir: impl AsRef<Path>) -> Result<TextSplit> {
    load_fortune_files(dir, &FORTUNE_FILES)
}

/// The files of the Debian `fortunes` package (BSD licence, the same source as
/// `fortunes-min`, no file in common with it) that `scripts/fetch_minilm.sh` puts in
/// `target/models/fortunes/`: 6,518 entries, the evaluation corpus of issue 17 (its
/// held-out fifth is over 1,000 sentences).
pub const FORTUNES_EVAL_FILES: [&str; 8] = [
    "people",
    "definitions",
    "cookie",
    "computers",
    "science",
    "work",
    "wisdom",
    "education",
];

/// Every sentence of fortune files `files` in `dir`, in order, split by index as
/// [`load_fortunes`] splits them.
///
/// # Errors
/// As [`load_fortunes`].
pub fn load_fortune_files(dir: impl AsRef<Path>, files: &[&str]) -> Result<TextSplit> {
    const MAX_BYTES: u64 = 16 << 20;
    let mut sentences = Vec::new();
    for name in files {
        let p = dir.as_ref().join(name);
        let len = std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?.len();
        if len > MAX_BYTES {
            return Err(Error::corrupt(
                Some(&p),
                format!("{len} bytes; a fortune file is a few kB"),
            ));
        }
        let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| Error::corrupt(Some(&p), format!("not UTF-8: {e}")))?;
        sentences.extend(parse_fortunes(&text));
    }
    let (mut calibration, mut held_out) = (Vec::new(), Vec::new());
    for (i, s) in sentences.into_iter().enumerate() {
        if i % 5 == 4 {
            held_out.push(s);
        } else {
            calibration.push(s);
        }
    }
    Ok(TextSplit {
        calibration,
        held_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_collapsed_and_long_ones_dropped() {
        let long = "x".repeat(MAX_SENTENCE_CHARS + 1);
        let text = format!("A  day\nfor  firm\tdecisions!\n%\n\n%\n{long}\n%\nLast one.\n");
        assert_eq!(
            parse_fortunes(&text),
            ["A day for firm decisions!", "Last one."]
        );
    }
}
