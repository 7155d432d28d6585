//! Strategic Grams for new domains: mining them from correct solutions.
//!
//! - [`ngrams`]: the words and n-grams of a solution (the same words the planning-token
//!   matcher uses) and a count-min sketch for bounded-memory counting.
//! - [`cluster`]: agglomerative (cosine threshold) or k-means clustering of embeddings.
//! - [`mine`](mod@mine): the streaming pipeline behind `hicra sg mine`, and the overlap of a mined list
//!   with a reference list.

pub mod cluster;
pub mod mine;
pub mod ngrams;

pub use cluster::Clustering;
pub use mine::{mine, mine_observed, overlap, MineConfig, MineError, MineProgress, MineReport, MineStage};
