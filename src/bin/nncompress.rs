//! `nncompress`: the crate's compression workflow on ONNX files, from a shell.
//!
//! ```text
//! nncompress inspect  model.onnx [--dim NAME=SIZE]...
//! nncompress quantize model.onnx --calib calib.npy|DIR [--method kld|minmax|percentile|mse]
//!                     [--batch 32] [--per-channel] [--keep-float NODE]... -o model.int8.onnx
//! nncompress prune    model.onnx --ratio 0.3 [--criterion l1|l2|fpgm] [--round-to 8]
//!                     -o model.pruned.onnx
//! ```
//!
//! `quantize` calibrates on the `.npy` file (or every `.npy` in a folder), `[N, ...]` f32 in
//! the model input's shape, and writes the full-integer model as QDQ ONNX; `prune` removes
//! the least important channels and writes the smaller float model; `inspect` prints the
//! op histogram, parameters, MACs and how the integer model would run each node. Long steps
//! show progress on a terminal; each command ends with a summary table.
//!
//! A binary target of the library crate: `cargo install nncompress` builds it, while a
//! project that depends on the library never compiles it, and it needs no dependency the
//! library does not already have.

use nncompress::io::load_npy;
use nncompress::limits::Limits;
use nncompress::model::Graph;
use nncompress::onnx::{export, export_qdq, import_file, ImportOptions};
use nncompress::pruner::{Fpgm, L1Norm, L2Norm, StructuredPruner};
use nncompress::quantizer::{integer_plan, Calibration, QuantConfig, Quantizer};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "usage:
  nncompress inspect  MODEL.onnx [--dim NAME=SIZE]...
  nncompress quantize MODEL.onnx --calib FILE.npy|DIR [--method kld|minmax|percentile|mse]
                      [--batch N] [--per-channel] [--keep-float NODE]... -o OUT.onnx
  nncompress prune    MODEL.onnx --ratio R [--criterion l1|l2|fpgm] [--round-to M] -o OUT.onnx";

/// Parsed arguments: the positional ones and the `--flag value` pairs (repeatable).
struct Args {
    positional: Vec<String>,
    flags: BTreeMap<String, Vec<String>>,
}

impl Args {
    fn parse(raw: impl Iterator<Item = String>) -> Result<Args, String> {
        const SWITCHES: &[&str] = &["--per-channel", "--help"];
        let mut positional = Vec::new();
        let mut flags: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut raw = raw.peekable();
        while let Some(a) = raw.next() {
            if SWITCHES.contains(&a.as_str()) {
                flags.entry(a).or_default().push(String::new());
            } else if a.starts_with('-') && a.len() > 1 {
                let v = raw.next().ok_or_else(|| format!("{a} needs a value"))?;
                flags.entry(a).or_default().push(v);
            } else {
                positional.push(a);
            }
        }
        Ok(Args { positional, flags })
    }

    fn one(&self, flag: &str) -> Option<&str> {
        self.flags
            .get(flag)
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    fn all(&self, flag: &str) -> &[String] {
        self.flags.get(flag).map_or(&[], Vec::as_slice)
    }

    fn only(&self, known: &[&str]) -> Result<(), String> {
        match self.flags.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(format!("unknown option {k}")),
            None => Ok(()),
        }
    }

    fn output(&self) -> Result<PathBuf, String> {
        self.one("-o")
            .or_else(|| self.one("--output"))
            .map(PathBuf::from)
            .ok_or_else(|| "-o OUT.onnx is required".into())
    }
}

fn main() -> ExitCode {
    let mut raw = std::env::args().skip(1);
    let Some(command) = raw.next() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let args = match Args::parse(raw) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nncompress: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match command.as_str() {
        "inspect" => inspect(&args),
        "quantize" => quantize(&args),
        "prune" => prune(&args),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nncompress: {e}");
            ExitCode::FAILURE
        }
    }
}

fn model_arg(args: &Args) -> Result<&Path, String> {
    match args.positional.as_slice() {
        [m] => Ok(Path::new(m)),
        [] => Err(format!("no model given\n{USAGE}")),
        more => Err(format!("one model expected, got {}", more.len())),
    }
}

fn options(args: &Args) -> Result<ImportOptions, String> {
    let mut o = ImportOptions::default();
    for d in args.all("--dim") {
        let (name, size) = d
            .split_once('=')
            .ok_or_else(|| format!("--dim {d}: expected NAME=SIZE"))?;
        let size = size
            .parse()
            .map_err(|_| format!("--dim {d}: {size} is not a size"))?;
        o.dims.insert(name.to_string(), size);
    }
    Ok(o)
}

fn load(path: &Path, args: &Args) -> Result<Graph, String> {
    import_file(path, &options(args)?).map_err(|e| format!("{}: {e}", path.display()))
}

/// A table with a header row, columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn inspect(args: &Args) -> Result<(), String> {
    args.only(&["--dim"])?;
    let path = model_arg(args)?;
    let g = load(path, args)?;
    let mut histogram: BTreeMap<String, usize> = BTreeMap::new();
    for n in g.nodes() {
        *histogram.entry(n.op.kind().to_string()).or_default() += 1;
    }
    println!("{}", path.display());
    for (&id, name) in g.input_ids().iter().zip(g.input_names()) {
        // Symbolic axes by name (`sequence_length`), fixed ones by size.
        let dims: Vec<String> = match &g.node(id).op {
            nncompress::model::Op::Input { shape, dynamic, .. } => shape
                .iter()
                .enumerate()
                .map(|(axis, d)| match dynamic.iter().find(|(a, _)| *a == axis) {
                    Some((_, symbol)) => symbol.clone(),
                    None => d.to_string(),
                })
                .collect(),
            _ => Vec::new(),
        };
        println!(
            "  input  {name}: [{}] per sample, {:?}",
            dims.join(", "),
            g.dtype(id)
        );
    }
    for &id in g.output_ids() {
        println!(
            "  output {}: {:?} per sample at the example sizes, {:?}",
            g.node(id).name,
            g.shape(id),
            g.dtype(id)
        );
    }
    println!(
        "  {} nodes, {} parameters ({:.2} MB in f32), {} MACs per sample\n",
        g.nodes().len(),
        g.param_count(),
        g.param_count() as f64 * 4.0 / 1e6,
        g.macs_per_sample()
    );
    let rows: Vec<Vec<String>> = histogram
        .iter()
        .map(|(k, v)| vec![k.clone(), v.to_string()])
        .collect();
    println!("{}\n", table(&["op", "count"], &rows));
    match integer_plan(&g) {
        Ok(plan) => {
            let rows: Vec<Vec<String>> = plan.into_iter().map(|(n, how)| vec![n, how]).collect();
            println!(
                "full-integer quantization would run:\n{}",
                table(&["node", "as"], &rows)
            );
        }
        Err(e) => println!("full-integer quantization: {e}"),
    }
    Ok(())
}

/// Calibration batches from one `.npy` or every `.npy` of a folder, cut into `batch` rows.
fn calibration(path: &Path, batch: usize) -> Result<Vec<ndarray::ArrayD<f32>>, String> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut f: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "npy"))
            .collect();
        f.sort();
        f
    } else {
        vec![path.to_path_buf()]
    };
    if files.is_empty() {
        return Err(format!("no .npy files in {}", path.display()));
    }
    let mut batches = Vec::new();
    for f in files {
        let a = load_npy(&f, &Limits::default()).map_err(|e| format!("{}: {e}", f.display()))?;
        let n = a.shape().first().copied().unwrap_or(0);
        for start in (0..n).step_by(batch) {
            let end = start.saturating_add(batch).min(n);
            batches.push(
                a.slice_axis(ndarray::Axis(0), ndarray::Slice::from(start..end))
                    .to_owned(),
            );
        }
    }
    Ok(batches)
}

/// `done / total` on stderr when it is a terminal.
fn progress(label: &str) -> impl FnMut(usize, usize) + '_ {
    let terminal = std::io::stderr().is_terminal();
    move |done, total| {
        if terminal {
            let width = 30;
            let filled = done * width / total.max(1);
            eprint!(
                "\r{label} [{}{}] {done}/{total}",
                "#".repeat(filled),
                " ".repeat(width - filled)
            );
            if done == total {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        }
    }
}

fn quantize(args: &Args) -> Result<(), String> {
    args.only(&[
        "--calib",
        "--method",
        "--batch",
        "--per-channel",
        "--keep-float",
        "--dim",
        "-o",
        "--output",
    ])?;
    let path = model_arg(args)?;
    let out = args.output()?;
    let calib = args
        .one("--calib")
        .ok_or("--calib FILE.npy|DIR is required")?;
    let batch: usize = args
        .one("--batch")
        .unwrap_or("32")
        .parse()
        .ok()
        .filter(|&b| b > 0)
        .ok_or("--batch: not a positive size")?;
    let method = match args.one("--method").unwrap_or("kld") {
        "kld" | "entropy" => Calibration::Kld,
        "minmax" => Calibration::MinMax,
        "percentile" => Calibration::Percentile(99.99),
        "mse" => Calibration::Mse,
        other => return Err(format!("--method {other}: kld, minmax, percentile or mse")),
    };
    // Weights are always int8 per output channel: the only form the int8 kernels take.
    let mut config = QuantConfig::int8().calibration(method);
    for k in args.all("--keep-float") {
        config = config.keep_float(k);
    }
    let g = load(path, args)?;
    let batches = calibration(Path::new(calib), batch)?;
    let rows: usize = batches.iter().map(|b| b.shape()[0]).sum();
    eprintln!(
        "calibrating on {rows} samples in {} batches ({method:?})",
        batches.len()
    );
    let q = Quantizer::new(config)
        .calibrate_with_progress(&g, &batches, progress("calibrating"))
        .map_err(|e| format!("quantize: {e}"))?;
    let bytes = export_qdq(&q).map_err(|e| format!("QDQ export: {e}"))?;
    std::fs::write(&out, &bytes).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("{}", q.report_table());
    let float_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    println!(
        "\n{}",
        table(
            &["file", "bytes"],
            &[
                vec![path.display().to_string(), float_bytes.to_string()],
                vec![out.display().to_string(), bytes.len().to_string()],
            ],
        )
    );
    Ok(())
}

fn prune(args: &Args) -> Result<(), String> {
    args.only(&[
        "--ratio",
        "--criterion",
        "--round-to",
        "--dim",
        "-o",
        "--output",
    ])?;
    let path = model_arg(args)?;
    let out = args.output()?;
    let ratio: f32 = args
        .one("--ratio")
        .ok_or("--ratio R is required")?
        .parse()
        .map_err(|_| "--ratio: not a number")?;
    let g = load(path, args)?;
    let pruner = match args.one("--criterion").unwrap_or("l1") {
        "l1" => StructuredPruner::new(L1Norm),
        "l2" => StructuredPruner::new(L2Norm),
        "fpgm" => StructuredPruner::new(Fpgm),
        other => return Err(format!("--criterion {other}: l1, l2 or fpgm")),
    };
    let mut pruner = pruner.with_ratio(ratio).map_err(|e| e.to_string())?;
    if let Some(m) = args.one("--round-to") {
        pruner = pruner.round_to(m.parse().map_err(|_| "--round-to: not a size")?);
    }
    let (small, report) = pruner.prune(&g, None).map_err(|e| format!("prune: {e}"))?;
    let bytes = export(&small).map_err(|e| format!("export: {e}"))?;
    std::fs::write(&out, &bytes).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("{}", report.table());
    Ok(())
}
