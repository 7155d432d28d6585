//! Strategic-Gram mining (the paper's Appendix A, hicra.md section 3), streaming over a JSONL
//! corpus in three passes so memory stays bounded whatever its size:
//!
//! 1. Document frequencies of every n-gram (n in `min_n..=max_n`) into a count-min sketch.
//! 2. Exact document frequency and occurrence count for the n-grams whose sketch estimate
//!    reaches the floor (the sketch never undercounts, so none that qualify is lost).
//!    Candidates: frequent enough (`min_doc_share`, `min_docs`), sparing within a solution
//!    (mean occurrences per containing solution at most `max_mean_occurrences`: "x = 2"
//!    repeated through a derivation is execution, not strategy), and made of at least
//!    `min_words` words with letters. The `max_candidates` most frequent go on.
//! 3. Embed the candidates, cluster them, count each cluster's document frequency (solutions
//!    containing any member), keep the top `keep_share` of clusters; their members are the
//!    Strategic Grams.

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::cluster::{cluster, Clustering};
use super::ngrams::{for_each_ngram, letter_words, phrase, segments, spell, word_segments, CountMinSketch};
use crate::model::bert::SentenceEmbedder;
use crate::train::planning::StrategicGrams;

/// Why mining failed.
#[derive(Debug, thiserror::Error)]
pub enum MineError {
    /// The corpus could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A corpus line is not a usable record.
    #[error("{}:{line}: {message}", path.display())]
    Record {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A setting is out of range.
    #[error("invalid mining setting: {0}")]
    Config(String),
    /// The embedder failed.
    #[error("embedding the candidates: {0}")]
    Embed(#[from] crate::model::ModelError),
    /// libtorch failed while clustering.
    #[error("clustering the candidates: {0}")]
    Cluster(String),
    /// No record qualified as a correct solution.
    #[error("{}: none of its {records} records is a solution to mine (text field present and reward >= {min_reward})", path.display())]
    NoSolutions {
        /// The corpus.
        path: PathBuf,
        /// Records read.
        records: usize,
        /// The reward threshold.
        min_reward: f64,
    },
}

/// Mining settings (`hicra sg mine --config mine.toml`, or flags).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MineConfig {
    /// Shortest n-gram, in words.
    pub min_n: usize,
    /// Longest n-gram, in words.
    pub max_n: usize,
    /// JSON field holding the solution text; by default the first of `completion`, `text`,
    /// `solution`, `response`, `output` present.
    pub text_field: Option<String>,
    /// JSON field holding a reward; records with a reward below `min_reward` are skipped
    /// (records without the field are kept).
    pub reward_field: String,
    /// Lowest reward of a correct solution.
    pub min_reward: f64,
    /// Candidates appear in at least this share of the solutions ...
    pub min_doc_share: f64,
    /// ... and in at least this many.
    pub min_docs: usize,
    /// Mean occurrences per containing solution at most this (strategies are sparing).
    pub max_mean_occurrences: f64,
    /// Words with at least one letter an n-gram needs.
    pub min_words: usize,
    /// Most candidates embedded and clustered (the most frequent).
    pub max_candidates: usize,
    /// How candidates are grouped.
    pub clustering: Clustering,
    /// Share of clusters kept, by cluster document frequency (the paper: top 20%).
    pub keep_share: f64,
    /// Counters per row of the count-min sketch (4 rows; 4 bytes each).
    pub sketch_width: usize,
}

impl Default for MineConfig {
    fn default() -> Self {
        Self {
            min_n: 3,
            max_n: 5,
            text_field: None,
            reward_field: "reward".into(),
            min_reward: 1.0,
            min_doc_share: 0.01,
            min_docs: 3,
            max_mean_occurrences: 1.5,
            min_words: 2,
            max_candidates: 5000,
            clustering: Clustering::default(),
            keep_share: 0.2,
            sketch_width: 1 << 22,
        }
    }
}

impl MineConfig {
    fn validate(&self) -> Result<(), MineError> {
        let bad = |m: String| Err(MineError::Config(m));
        if self.min_n == 0 || self.max_n < self.min_n {
            return bad(format!("n-gram sizes {}..={} (need 1 <= min_n <= max_n)", self.min_n, self.max_n));
        }
        if !(0.0..=1.0).contains(&self.min_doc_share) || !(0.0..=1.0).contains(&self.keep_share) || self.keep_share == 0.0 {
            return bad(format!("min_doc_share {} and keep_share {} must be in [0, 1] (keep_share > 0)", self.min_doc_share, self.keep_share));
        }
        if self.max_mean_occurrences.is_nan() || self.max_mean_occurrences < 1.0 {
            return bad(format!("max_mean_occurrences {} must be a number >= 1 (below 1 nothing could qualify)", self.max_mean_occurrences));
        }
        if self.min_words > self.max_n {
            return bad(format!("min_words {} exceeds max_n {}: no n-gram could qualify", self.min_words, self.max_n));
        }
        if self.min_reward.is_nan() {
            return bad("min_reward must be a number".into());
        }
        if self.max_candidates == 0 || self.sketch_width == 0 {
            return bad("max_candidates and sketch_width must be positive".into());
        }
        match self.clustering {
            Clustering::Agglomerative { threshold } if !(-1.0..=1.0).contains(&threshold) => bad(format!("threshold {threshold} is not a cosine similarity")),
            Clustering::Kmeans { clusters: 0, .. } => bad("k-means needs clusters >= 1".into()),
            _ => Ok(()),
        }
    }
}

/// One candidate n-gram in the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MinedGram {
    /// The phrase.
    pub ngram: String,
    /// Solutions containing it.
    pub doc_frequency: u32,
    /// Mean occurrences per containing solution.
    pub mean_occurrences: f64,
}

/// One cluster in the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MinedCluster {
    /// 1 = highest cluster document frequency.
    pub rank: usize,
    /// Solutions containing any member.
    pub doc_frequency: u32,
    /// Whether its members are Strategic Grams.
    pub kept: bool,
    /// Members, most frequent first.
    pub members: Vec<MinedGram>,
}

/// What `mine` found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MineReport {
    /// The corpus file.
    pub corpus: PathBuf,
    /// Records read.
    pub records: usize,
    /// Solutions used (records with text and, when rewarded, a reward >= `min_reward`).
    pub solutions: usize,
    /// The settings used.
    pub config: MineConfig,
    /// Distinct n-grams whose sketch estimate reached the floor (exactly counted).
    pub counted_ngrams: usize,
    /// The document-frequency floor applied.
    pub min_doc_frequency: u32,
    /// Frequent n-grams rejected for repeating within solutions (most frequent first, 20 shown).
    pub rejected_repeated: Vec<MinedGram>,
    /// Frequent n-grams rejected for having too few words (20 shown).
    pub rejected_not_words: Vec<MinedGram>,
    /// Candidates embedded and clustered.
    pub candidates: usize,
    /// The Strategic Grams: members of kept clusters, by cluster rank then frequency.
    pub strategic_grams: Vec<String>,
    /// Every cluster, by rank.
    pub clusters: Vec<MinedCluster>,
    /// Seconds per phase: count, exact, embed, cluster, cluster_df.
    pub seconds: HashMap<String, f64>,
}

/// Calls `visit` with the text of every solution of the corpus, reporting the bytes read to
/// `observe` as `stage`; returns (records, solutions).
fn for_each_solution(path: &Path, config: &MineConfig, stage: MineStage, observe: &mut dyn FnMut(MineProgress), mut visit: impl FnMut(&str)) -> Result<(usize, usize), MineError> {
    let file = std::fs::File::open(path).map_err(|source| MineError::Io { path: path.to_path_buf(), source })?;
    let total = file.metadata().map_err(|source| MineError::Io { path: path.to_path_buf(), source })?.len();
    let (mut records, mut solutions, mut done) = (0, 0, 0u64);
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| MineError::Io { path: path.to_path_buf(), source })?;
        done += line.len() as u64 + 1;
        observe(MineProgress { stage, done: done.min(total), total });
        if line.trim().is_empty() {
            continue;
        }
        records += 1;
        let record_error = |message: String| MineError::Record { path: path.to_path_buf(), line: index + 1, message };
        let record: serde_json::Value = serde_json::from_str(&line).map_err(|e| record_error(format!("not JSON: {e}")))?;
        let text = match &config.text_field {
            Some(field) => record.get(field).ok_or_else(|| record_error(format!("no '{field}' field")))?,
            None => ["completion", "text", "solution", "response", "output"]
                .iter()
                .find_map(|f| record.get(*f))
                .ok_or_else(|| record_error("no text field (completion, text, solution, response or output; or set text_field)".into()))?,
        };
        let text = text.as_str().ok_or_else(|| record_error("the text field is not a string".into()))?;
        if let Some(reward) = record.get(&config.reward_field) {
            let reward = reward.as_f64().ok_or_else(|| record_error(format!("'{}' is not a number", config.reward_field)))?;
            if reward < config.min_reward {
                continue;
            }
        }
        solutions += 1;
        visit(text);
    }
    Ok((records, solutions))
}

/// Exact statistics of an n-gram that passed the sketch.
struct Counted {
    tokens: Vec<String>,
    /// Words with a letter among `tokens`.
    letters: usize,
    docs: u32,
    occurrences: u32,
}

impl Counted {
    fn gram(&self) -> MinedGram {
        MinedGram { ngram: phrase(&self.tokens), doc_frequency: self.docs, mean_occurrences: self.occurrences as f64 / self.docs.max(1) as f64 }
    }
}

/// Mines Strategic Grams from the JSONL corpus at `path` (see the module docs).
pub fn mine(path: &Path, config: &MineConfig, embedder: &SentenceEmbedder) -> Result<MineReport, MineError> {
    mine_observed(path, config, embedder, &mut |_| {})
}

/// The stages of a mining run, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MineStage {
    /// Pass 1 over the corpus: counting n-grams in a bounded table.
    Count,
    /// Pass 2: exact counts of the candidates.
    Exact,
    /// Embedding the candidates.
    Embed,
    /// Clustering the embeddings.
    Cluster,
    /// Pass 3: each cluster's document frequency.
    ClusterFrequencies,
}

impl MineStage {
    /// Its key in [`MineReport::seconds`].
    pub fn name(self) -> &'static str {
        match self {
            Self::Count => "count",
            Self::Exact => "exact",
            Self::Embed => "embed",
            Self::Cluster => "cluster",
            Self::ClusterFrequencies => "cluster_df",
        }
    }

    /// What its progress counts, for a progress bar.
    pub fn progress_label(self) -> &'static str {
        match self {
            Self::Count => "pass 1, counting n-grams: bytes",
            Self::Exact => "pass 2, exact counts: bytes",
            Self::Embed => "embedding candidates",
            Self::Cluster => "clustering",
            Self::ClusterFrequencies => "pass 3, cluster frequencies: bytes",
        }
    }
}

/// Where a mining run is: a stage and how far into it (for progress bars).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MineProgress {
    /// The stage.
    pub stage: MineStage,
    /// Units done: bytes of the corpus for the passes, phrases for `embed`.
    pub done: u64,
    /// Units in the stage.
    pub total: u64,
}

/// [`mine`], telling `observe` how far it is as it goes.
pub fn mine_observed(path: &Path, config: &MineConfig, embedder: &SentenceEmbedder, observe: &mut dyn FnMut(MineProgress)) -> Result<MineReport, MineError> {
    config.validate()?;
    let sizes = config.min_n..=config.max_n;
    let mut seconds = HashMap::new();

    // Pass 1: document frequencies into the sketch.
    let started = Instant::now();
    let mut sketch = CountMinSketch::new(config.sketch_width, 4);
    let mut in_doc: HashSet<u64> = HashSet::new();
    let (records, solutions) = for_each_solution(path, config, MineStage::Count, observe, |text| {
        in_doc.clear();
        for_each_ngram(&word_segments(text), sizes.clone(), |_, hash| {
            if in_doc.insert(hash) {
                sketch.add(hash);
            }
        });
    })?;
    seconds.insert(MineStage::Count.name().to_string(), started.elapsed().as_secs_f64());
    if solutions == 0 {
        return Err(MineError::NoSolutions { path: path.to_path_buf(), records, min_reward: config.min_reward });
    }
    let floor = ((config.min_doc_share * solutions as f64).ceil() as u32).max(config.min_docs as u32).max(1);

    // Pass 2: exact counts of the n-grams the sketch lets through.
    let started = Instant::now();
    let mut counted: HashMap<u64, Counted> = HashMap::new();
    let mut occurrences_in_doc: HashMap<u64, u32> = HashMap::new();
    for_each_solution(path, config, MineStage::Exact, observe, |text| {
        occurrences_in_doc.clear();
        for_each_ngram(&word_segments(text), sizes.clone(), |gram, hash| {
            if sketch.estimate(hash) >= floor {
                *occurrences_in_doc.entry(hash).or_default() += 1;
                counted.entry(hash).or_insert_with(|| Counted { tokens: spell(text, gram), letters: letter_words(gram), docs: 0, occurrences: 0 });
            }
        });
        for (hash, count) in &occurrences_in_doc {
            if let Some(c) = counted.get_mut(hash) {
                c.docs += 1;
                c.occurrences += count;
            }
        }
    })?;
    drop(sketch);
    seconds.insert(MineStage::Exact.name().to_string(), started.elapsed().as_secs_f64());
    let counted_ngrams = counted.len();
    let mut frequent: Vec<(u64, Counted)> = counted.into_iter().filter(|(_, c)| c.docs >= floor).collect();
    frequent.sort_by(|a, b| b.1.docs.cmp(&a.1.docs).then_with(|| a.1.tokens.cmp(&b.1.tokens)));
    let (mut rejected_repeated, mut rejected_not_words, mut candidates) = (Vec::new(), Vec::new(), Vec::new());
    for (hash, c) in frequent {
        if c.letters < config.min_words {
            rejected_not_words.push(c.gram());
        } else if c.occurrences as f64 / c.docs.max(1) as f64 > config.max_mean_occurrences {
            rejected_repeated.push(c.gram());
        } else if candidates.len() < config.max_candidates {
            candidates.push((hash, c));
        }
    }
    rejected_repeated.truncate(20);
    rejected_not_words.truncate(20);

    // Embed and cluster.
    let started = Instant::now();
    let texts: Vec<String> = candidates.iter().map(|(_, c)| phrase(&c.tokens)).collect();
    let total = texts.len() as u64;
    let embeddings = embedder.embed_observed(&texts.iter().map(String::as_str).collect::<Vec<_>>(), &mut |done| observe(MineProgress { stage: MineStage::Embed, done: done as u64, total }))?;
    observe(MineProgress { stage: MineStage::Cluster, done: 0, total: 1 });
    seconds.insert(MineStage::Embed.name().to_string(), started.elapsed().as_secs_f64());
    let started = Instant::now();
    let labels = cluster(&embeddings, config.clustering).map_err(|e| MineError::Cluster(e.to_string()))?;
    seconds.insert(MineStage::Cluster.name().to_string(), started.elapsed().as_secs_f64());
    observe(MineProgress { stage: MineStage::Cluster, done: 1, total: 1 });

    // Pass 3: cluster document frequencies.
    let started = Instant::now();
    let cluster_of: HashMap<u64, usize> = candidates.iter().zip(&labels).map(|((hash, _), &l)| (*hash, l)).collect();
    let cluster_count = labels.iter().max().map_or(0, |m| m + 1);
    let mut cluster_docs = vec![0u32; cluster_count];
    let mut in_doc: HashSet<usize> = HashSet::new();
    for_each_solution(path, config, MineStage::ClusterFrequencies, observe, |text| {
        in_doc.clear();
        for_each_ngram(&word_segments(text), sizes.clone(), |_, hash| {
            if let Some(&l) = cluster_of.get(&hash) {
                in_doc.insert(l);
            }
        });
        for &l in &in_doc {
            cluster_docs[l] += 1;
        }
    })?;
    seconds.insert(MineStage::ClusterFrequencies.name().to_string(), started.elapsed().as_secs_f64());

    let clusters = rank_clusters(&candidates, &labels, &cluster_docs, config.keep_share);
    let strategic_grams = clusters.iter().filter(|c| c.kept).flat_map(|c| c.members.iter().map(|m| m.ngram.clone())).collect();
    Ok(MineReport {
        corpus: path.to_path_buf(),
        records,
        solutions,
        config: config.clone(),
        counted_ngrams,
        min_doc_frequency: floor,
        rejected_repeated,
        rejected_not_words,
        candidates: candidates.len(),
        strategic_grams,
        clusters,
        seconds,
    })
}

/// Clusters by document frequency (ties: by their most frequent member), the top
/// `keep_share` (at least one) marked kept.
fn rank_clusters(candidates: &[(u64, Counted)], labels: &[usize], cluster_docs: &[u32], keep_share: f64) -> Vec<MinedCluster> {
    let mut members: Vec<Vec<MinedGram>> = vec![Vec::new(); cluster_docs.len()];
    for ((_, c), &l) in candidates.iter().zip(labels) {
        members[l].push(c.gram());
    }
    let mut clusters: Vec<MinedCluster> = members
        .into_iter()
        .zip(cluster_docs)
        .map(|(mut members, &docs)| {
            members.sort_by(|a, b| b.doc_frequency.cmp(&a.doc_frequency).then_with(|| a.ngram.cmp(&b.ngram)));
            MinedCluster { rank: 0, doc_frequency: docs, kept: false, members }
        })
        .collect();
    clusters.sort_by(|a, b| b.doc_frequency.cmp(&a.doc_frequency).then_with(|| a.members.first().map(|m| &m.ngram).cmp(&b.members.first().map(|m| &m.ngram))));
    let keep = ((clusters.len() as f64 * keep_share).ceil() as usize).clamp(clusters.len().min(1), clusters.len());
    for (i, c) in clusters.iter_mut().enumerate() {
        c.rank = i + 1;
        c.kept = i < keep;
    }
    clusters
}

/// How a mined list compares with a reference list (e.g. the paper's).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Overlap {
    /// Phrases mined.
    pub mined: usize,
    /// Phrases in the reference.
    pub reference: usize,
    /// Mined phrases that are reference phrases (same words).
    pub exact: Vec<String>,
    /// Mined phrases that contain a reference phrase (as whole words).
    pub containing_reference: usize,
    /// `containing_reference / mined`.
    pub share_of_mined_containing_reference: f64,
    /// Reference phrases found inside some mined phrase.
    pub reference_found: usize,
}

/// Compares `mined` with `reference` by the matcher's words (case, apostrophes folded).
pub fn overlap(mined: &[String], reference: &StrategicGrams, reference_phrases: &[String]) -> Overlap {
    let normalise = |p: &str| segments(p).concat().join(" ");
    let reference_words: HashSet<String> = reference_phrases.iter().map(|p| normalise(p)).collect();
    let exact: Vec<String> = mined.iter().filter(|m| reference_words.contains(&normalise(m))).cloned().collect();
    let mut found: HashSet<String> = HashSet::new();
    let mut containing = 0;
    for m in mined {
        let matches = reference.find(m);
        if !matches.is_empty() {
            containing += 1;
        }
        found.extend(matches.into_iter().map(|x| x.phrase));
    }
    Overlap {
        mined: mined.len(),
        reference: reference.len(),
        exact,
        containing_reference: containing,
        share_of_mined_containing_reference: containing as f64 / mined.len().max(1) as f64,
        reference_found: found.len(),
    }
}
