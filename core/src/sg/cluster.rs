//! Grouping semantically equivalent n-grams by their (L2-normalised) embeddings.
//!
//! - [`agglomerative`]: average-linkage agglomerative clustering on cosine similarity, merging
//!   while the closest clusters' mean pairwise similarity is at least a threshold. Runs the
//!   nearest-neighbour-chain algorithm on the full similarity matrix: O(n^2) time and memory
//!   (n = 5000 candidates: about 200 MB at the peak, the matrix held twice while it is copied
//!   out of libtorch), exact, and deterministic (ties go to the lower index).
//! - [`kmeans`]: spherical k-means (cosine), k-means++ seeding from a seeded generator, so the
//!   same seed gives the same clusters.
//!
//! Both return one cluster id per input row, ids numbered by first appearance.

use tch::{Device, Kind, Tensor};

/// How to cluster.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Clustering {
    /// Average linkage; merge while the mean pairwise cosine similarity is >= `threshold`.
    Agglomerative {
        /// Cosine similarity cut.
        threshold: f32,
    },
    /// Spherical k-means with `clusters` centroids.
    Kmeans {
        /// Number of clusters (capped at the number of n-grams).
        clusters: usize,
        /// Lloyd iterations at most.
        iterations: usize,
        /// Seed of the k-means++ draws.
        seed: u64,
    },
}

impl Default for Clustering {
    fn default() -> Self {
        Clustering::Agglomerative { threshold: 0.6 }
    }
}

/// Cluster ids for the rows of `embeddings` `(n, d)` (L2-normalised, float32).
pub fn cluster(embeddings: &Tensor, method: Clustering) -> Result<Vec<usize>, tch::TchError> {
    match method {
        Clustering::Agglomerative { threshold } => agglomerative(embeddings, threshold),
        Clustering::Kmeans { clusters, iterations, seed } => kmeans(embeddings, clusters, iterations, seed),
    }
}

/// Renumbers labels by first appearance (0, 1, 2, ...).
fn renumber(labels: &[usize]) -> Vec<usize> {
    let mut map = std::collections::HashMap::new();
    labels
        .iter()
        .map(|l| {
            let next = map.len();
            *map.entry(*l).or_insert(next)
        })
        .collect()
}

/// Average-linkage clustering with a similarity cut (see the module docs).
pub fn agglomerative(embeddings: &Tensor, threshold: f32) -> Result<Vec<usize>, tch::TchError> {
    let n = embeddings.size().first().copied().unwrap_or(0) as usize;
    if n == 0 {
        return Ok(Vec::new());
    }
    let x = embeddings.to_device(Device::Cpu).to_kind(Kind::Float);
    let similarity = x.matmul(&x.tr());
    // A GEMM need not be bit-symmetric; the chain below needs sim[a][b] == sim[b][a] exactly
    // (a near-tie read both ways could make it cycle).
    let similarity = (&similarity + similarity.tr()) / 2.0;
    let mut sim = Vec::<f32>::try_from(similarity.reshape([-1]))?;
    let mut size = vec![1usize; n];
    // `active`: clusters that may still merge; `parent`: where a merged cluster went.
    let mut active = vec![true; n];
    let mut parent: Vec<usize> = (0..n).collect();
    let mut chain: Vec<usize> = Vec::new();
    let mut remaining = n;
    while remaining > 0 {
        if chain.is_empty() {
            chain.push(active.iter().position(|&a| a).unwrap_or(0));
        }
        let a = *chain.last().unwrap_or(&0);
        // Nearest active neighbour of `a`; prefer the previous chain element on ties so the
        // chain ends in a reciprocal pair.
        let previous = chain.len().checked_sub(2).map(|i| chain[i]);
        let mut best: Option<(usize, f32)> = previous.map(|p| (p, sim[a * n + p]));
        for b in 0..n {
            if b != a && active[b] && best.is_none_or(|(_, s)| sim[a * n + b] > s) {
                best = Some((b, sim[a * n + b]));
            }
        }
        let Some((b, s)) = best else {
            // `a` is the last active cluster.
            active[a] = false;
            remaining -= 1;
            chain.clear();
            continue;
        };
        if Some(b) != previous {
            debug_assert!(chain.len() < n, "the nearest-neighbour chain cannot be longer than the clusters");
            chain.push(b);
            continue;
        }
        // Reciprocal nearest neighbours a <-> b.
        chain.truncate(chain.len() - 2);
        if s < threshold {
            // Neither can reach the threshold with anything (average linkage is reducible).
            active[a] = false;
            active[b] = false;
            remaining -= 2;
            continue;
        }
        // Merge b into a; Lance-Williams update for average linkage.
        let (na, nb) = (size[a] as f32, size[b] as f32);
        for k in 0..n {
            if active[k] && k != a && k != b {
                let merged = (na * sim[a * n + k] + nb * sim[b * n + k]) / (na + nb);
                sim[a * n + k] = merged;
                sim[k * n + a] = merged;
            }
        }
        size[a] += size[b];
        active[b] = false;
        parent[b] = a;
        remaining -= 1;
    }
    let root = |mut i: usize| {
        while parent[i] != i {
            i = parent[i];
        }
        i
    };
    Ok(renumber(&(0..n).map(root).collect::<Vec<_>>()))
}

/// SplitMix64: the seeded generator of k-means++.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `1 - cosine` of every row of `x` to row `centre`, at least 0.
fn cosine_distances(x: &Tensor, centre: usize) -> Result<Vec<f32>, tch::TchError> {
    let similarity = x.matmul(&x.get(centre as i64).unsqueeze(1)).squeeze_dim(1);
    Vec::<f32>::try_from((similarity.neg() + 1.0).clamp_min(0.0))
}

/// Spherical k-means (see the module docs).
pub fn kmeans(embeddings: &Tensor, clusters: usize, iterations: usize, seed: u64) -> Result<Vec<usize>, tch::TchError> {
    let x = embeddings.to_device(Device::Cpu).to_kind(Kind::Float);
    let n = x.size().first().copied().unwrap_or(0) as usize;
    let k = clusters.clamp(1, n.max(1));
    if n == 0 {
        return Ok(Vec::new());
    }
    // k-means++: each next centre drawn with probability proportional to its distance
    // (1 - cosine) to the nearest centre so far.
    let mut state = seed;
    let mut centres = vec![(next_random(&mut state) % n as u64) as usize];
    let mut nearest = cosine_distances(&x, centres[0])?;
    while centres.len() < k {
        let total: f64 = nearest.iter().map(|&d| d as f64).sum();
        // Only points away from every centre can be drawn (distance > 0), so no centre repeats;
        // rounding left over at the end of the walk falls to the last such point.
        let last_candidate = nearest.iter().rposition(|&d| d > 0.0);
        let pick = match last_candidate {
            Some(last) if total > 0.0 => {
                let mut target = (next_random(&mut state) as f64 / u64::MAX as f64) * total;
                nearest
                    .iter()
                    .position(|&d| {
                        target -= d as f64;
                        d > 0.0 && target <= 0.0
                    })
                    .unwrap_or(last)
            }
            // Every point sits on a centre (duplicates): take the next unused index.
            _ => (0..n).find(|i| !centres.contains(i)).unwrap_or(0),
        };
        centres.push(pick);
        let distance = cosine_distances(&x, pick)?;
        for (d, new) in nearest.iter_mut().zip(distance) {
            *d = d.min(new);
        }
    }
    let index = Tensor::from_slice(&centres.iter().map(|&c| c as i64).collect::<Vec<_>>());
    let mut centroids = x.index_select(0, &index);
    let mut labels = Tensor::zeros([n as i64], (Kind::Int64, Device::Cpu));
    for _ in 0..iterations.max(1) {
        let assigned = x.matmul(&centroids.tr()).argmax(1, false);
        let changed = assigned.ne_tensor(&labels).any().to_kind(Kind::Int64).f_int64_value(&[])? != 0;
        labels = assigned;
        // New centroid: normalised mean of its members; an empty cluster keeps its centroid.
        let sums = Tensor::zeros([k as i64, x.size()[1]], (Kind::Float, Device::Cpu)).index_add(0, &labels, &x);
        let norms = sums.norm_scalaropt_dim(2.0, [-1i64].as_slice(), true);
        let empty = norms.le(1e-12);
        centroids = (sums / norms.clamp_min(1e-12)).where_self(&empty.logical_not(), &centroids);
        if !changed {
            break;
        }
    }
    let labels = Vec::<i64>::try_from(labels)?;
    Ok(renumber(&labels.into_iter().map(|l| l as usize).collect::<Vec<_>>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three tight groups of unit vectors in 3-d.
    fn points() -> Tensor {
        let rows: [[f32; 3]; 7] = [[1.0, 0.05, 0.0], [0.98, 0.0, 0.1], [1.0, -0.05, 0.05], [0.0, 1.0, 0.05], [0.05, 0.97, 0.0], [0.0, 0.05, 1.0], [0.1, 0.0, 0.99]];
        let t = Tensor::from_slice(&rows.concat()).view([7, 3]);
        let norms = t.norm_scalaropt_dim(2.0, [-1i64].as_slice(), true);
        t / norms
    }

    #[test]
    fn agglomerative_finds_the_groups_and_respects_the_threshold() {
        assert_eq!(agglomerative(&points(), 0.9).ok(), Some(vec![0, 0, 0, 1, 1, 2, 2]));
        // A cut above every pair's similarity keeps everything apart.
        assert_eq!(agglomerative(&points(), 0.99999).ok(), Some(vec![0, 1, 2, 3, 4, 5, 6]));
        // A cut below every similarity merges everything.
        assert_eq!(agglomerative(&points(), -1.0).ok(), Some(vec![0; 7]));
    }

    #[test]
    fn kmeans_finds_the_groups_and_is_deterministic_per_seed() {
        for seed in [1, 2, 3] {
            let labels = kmeans(&points(), 3, 20, seed).expect("k-means");
            assert_eq!(labels[0], labels[1]);
            assert_eq!(labels[1], labels[2]);
            assert_eq!(labels[3], labels[4]);
            assert_eq!(labels[5], labels[6]);
            assert_eq!(labels.iter().collect::<std::collections::HashSet<_>>().len(), 3);
            assert_eq!(labels, kmeans(&points(), 3, 20, seed).expect("k-means"));
        }
        // Duplicate points: k-means++ never picks a point twice and still returns k clusters.
        let twins = Tensor::cat(&[points(), points()], 0);
        for seed in [1, 2, 3] {
            let labels = kmeans(&twins, 7, 20, seed).expect("k-means");
            assert_eq!(labels.iter().collect::<std::collections::HashSet<_>>().len(), 7, "{labels:?}");
        }
    }
}
