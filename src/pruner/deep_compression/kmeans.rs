//! One-dimensional k-means with linear initialisation (Han et al. 2016, §3.1: centroids
//! spaced evenly between the smallest and largest weight keep the rare large weights, which
//! matter most, represented).

/// Centroids and the cluster of each value.
#[derive(Clone, Debug, PartialEq)]
pub struct Clustering {
    /// Cluster centres, ascending.
    pub centroids: Vec<f32>,
    /// Cluster index of each value.
    pub assignment: Vec<u32>,
}

/// k-means of `values` into at most `k` clusters (fewer when there are fewer values), linear
/// initialisation, Lloyd iterations until no assignment changes (at most `max_iter`).
pub fn kmeans_linear(values: &[f32], k: usize, max_iter: usize) -> Clustering {
    let k = k.min(values.len()).max(1);
    if values.is_empty() {
        return Clustering {
            centroids: vec![0.0],
            assignment: Vec::new(),
        };
    }
    let (lo, hi) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let mut centroids: Vec<f32> = if k == 1 {
        vec![(lo + hi) / 2.0]
    } else {
        (0..k)
            .map(|i| lo + (hi - lo) * i as f32 / (k - 1) as f32)
            .collect()
    };
    let mut assignment = vec![u32::MAX; values.len()];
    for _ in 0..max_iter.max(1) {
        let mut changed = false;
        for (a, &v) in assignment.iter_mut().zip(values) {
            let c = nearest(&centroids, v);
            if *a != c {
                *a = c;
                changed = true;
            }
        }
        if !changed {
            break;
        }
        let mut sum = vec![0.0f64; k];
        let mut count = vec![0usize; k];
        for (&a, &v) in assignment.iter().zip(values) {
            sum[a as usize] += v as f64;
            count[a as usize] += 1;
        }
        for c in 0..k {
            // An empty cluster keeps its centre.
            if count[c] > 0 {
                centroids[c] = (sum[c] / count[c] as f64) as f32;
            }
        }
        centroids.sort_by(f32::total_cmp);
    }
    // The assignment of the final centres (the loop may stop after an update).
    for (a, &v) in assignment.iter_mut().zip(values) {
        *a = nearest(&centroids, v);
    }
    Clustering {
        centroids,
        assignment,
    }
}

/// Index of the centroid nearest to `v` (centroids ascending; ties to the lower one).
pub fn nearest(centroids: &[f32], v: f32) -> u32 {
    let i = centroids.partition_point(|&c| c < v);
    if i == 0 {
        return 0;
    }
    if i == centroids.len() {
        return (centroids.len() - 1) as u32;
    }
    if (v - centroids[i - 1]) <= (centroids[i] - v) {
        (i - 1) as u32
    } else {
        i as u32
    }
}
