//! A user-written pruning criterion: the mean absolute activation of each channel on a sample
//! batch (channels that barely fire go first), compared with the built-in L1 norm on the
//! MNIST VGG fixture, pruning 50 % of every conv's channels without fine-tuning.
//!
//! ```text
//! cargo run --release --example custom_criterion
//! ```

mod common;

use ndarray::Axis;
use nncompress::model::{zoo, Graph};
use nncompress::pruner::{L1Norm, LayerParams, PruningCriterion, StructuredPruner};
use nncompress::train::{evaluate, load_mnist, Dataset, MnistSplit};
use nncompress::{Error, Result};

/// Mean |activation| per output channel over the sample batch.
struct MeanActivation;

impl PruningCriterion for MeanActivation {
    fn name(&self) -> &str {
        "mean |activation|"
    }

    fn channel_scores(&self, layer: &LayerParams) -> Result<Vec<f32>> {
        let a = layer.activation.as_ref().ok_or_else(|| {
            Error::Unsupported(format!(
                "`{}`: give the pruner a sample batch (with_sample)",
                layer.name
            ))
        })?;
        Ok(a.axis_iter(Axis(1))
            .map(|c| c.iter().map(|v| v.abs()).sum::<f32>() / c.len().max(1) as f32)
            .collect())
    }
}

fn main() -> Result<()> {
    let train = load_mnist(common::data_dir().join("mnist"), MnistSplit::Train)?;
    let test = load_mnist(common::data_dir().join("mnist"), MnistSplit::Test)?;
    let vgg = Graph::from_safetensors(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/vgg_small.safetensors"
        ),
        zoo::vgg_small([1, 28, 28], &[32, 64, 128], 10, 0)?,
    )?;
    let sample = train.batch(&(0..256).collect::<Vec<_>>())?.0;
    let mut rows = vec![vec![
        "unpruned".to_string(),
        format!("{:.2}", 100.0 * evaluate(&vgg, &test, 1000)?.accuracy),
    ]];
    let l1 = StructuredPruner::new(L1Norm).with_ratio(0.5)?;
    let custom = StructuredPruner::new(MeanActivation)
        .with_ratio(0.5)?
        .with_sample(sample);
    for (name, pruner) in [
        ("L1 norm (built in)", l1),
        ("mean |activation| (user)", custom),
    ] {
        let (pruned, report) = pruner.prune(&vgg, None)?;
        rows.push(vec![
            format!("{name}, {:.0} % fewer MACs", 100.0 * report.macs_removed()),
            format!("{:.2}", 100.0 * evaluate(&pruned, &test, 1000)?.accuracy),
        ]);
    }
    common::print_table(
        &["50 % of the channels, no fine-tuning", "test acc %"],
        &rows,
    );
    Ok(())
}
