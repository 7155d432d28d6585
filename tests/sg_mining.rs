//! Strategic-Gram mining on real parts: the all-MiniLM-L6-v2 embedder against reference
//! embeddings from transformers, and `hicra sg mine` (the real binary) on a synthetic corpus
//! with planted strategies, execution phrases and rare phrases.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use hicra_core::model::bert::{default_embedder_dir, SentenceEmbedder};
use serde_json::Value;

fn embedder_dir() -> PathBuf {
    let dir = default_embedder_dir();
    assert!(dir.join("model.safetensors").exists(), "{} missing: run scripts/setup.sh", dir.display());
    dir
}

#[test]
fn minilm_embeddings_match_the_transformers_reference() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm/embeddings.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(&fixture).expect("fixture")).expect("json");
    let texts: Vec<&str> = reference["texts"].as_array().expect("texts").iter().map(|t| t.as_str().expect("text")).collect();
    let embedder = SentenceEmbedder::load(&embedder_dir(), tch::Device::Cpu).expect("embedder loads");
    assert_eq!(embedder.dimension(), 384);
    let ours = embedder.embed(&texts).expect("embed");
    let ours: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(ours).expect("rows");
    let mut worst = 0.0f32;
    for (row, expected) in ours.iter().zip(reference["embeddings"].as_array().expect("embeddings")) {
        let expected: Vec<f32> = expected.as_array().expect("row").iter().map(|v| v.as_f64().expect("number") as f32).collect();
        assert_eq!(row.len(), expected.len());
        worst = row.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
    }
    assert!(worst < 1e-4, "max |embedding difference| {worst}");
    // Paraphrases are closer than unrelated phrases: the property clustering relies on.
    let cos = |a: usize, b: usize| ours[a].iter().zip(&ours[b]).map(|(x, y)| x * y).sum::<f32>();
    assert!(cos(0, 1) > cos(0, 6), "'{}' vs '{}': {} <= {}", texts[0], texts[1], cos(0, 1), cos(0, 6));
}

/// SplitMix64 (the library's), for a corpus that is the same on every run.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        hicra_core::random::splitmix(&mut self.0)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() as f64 / u64::MAX as f64) < p
    }
}

/// Four strategies, each said three ways.
const STRATEGIES: [[&str; 3]; 4] = [
    ["Let's try a different approach", "We could try another way", "Maybe we should try another method"],
    ["Let me double check this", "Let me verify the result", "We should check our answer again"],
    ["The key idea here is simple", "The crucial observation is this", "Notice the important insight here"],
    ["But wait, that is wrong", "Wait, this does not work", "Hold on, that seems wrong"],
];

/// Problem-specific phrases: frequent enough to be candidates, too rare to rank with the
/// strategies.
const TOPICS: [&str; 40] = [
    "The farmer sells fresh eggs", "Tickets for the concert cost more", "The rectangular garden has a fence", "A train leaves the station early",
    "Students in the classroom read books", "The bakery makes chocolate muffins", "A cyclist rides up the hill", "The aquarium holds tropical fish",
    "Workers paint the old bridge", "The library lends many novels", "A chef prepares spicy noodles", "The orchard grows red apples",
    "The pool fills with water slowly", "A plumber fixes the leaking pipe", "The company hires new engineers", "Grandma knits warm wool scarves",
    "The parking lot holds many cars", "A pilot flies over the ocean", "The museum displays ancient pottery", "Kids collect colorful seashells",
    "The factory produces plastic bottles", "A gardener plants tulip bulbs", "The school bus carries pupils", "The store discounts winter jackets",
    "A runner trains for the marathon", "The zoo feeds hungry penguins", "The printer uses black ink cartridges", "A carpenter builds oak tables",
    "The band rehearses loud songs", "Tourists visit the famous castle", "The hospital treats sick patients", "A baker slices sourdough bread",
    "The river floods the valley", "A painter mixes blue pigments", "The team scores many goals", "The phone battery drains quickly",
    "A tailor sews silk dresses", "The hotel books spare rooms", "Bees produce golden honey", "The mechanic repairs flat tires",
];

const FILLER: [&str; 40] = [
    "amber", "basin", "cobalt", "delta", "ember", "fjord", "gravel", "harbor", "island", "jasper", "kettle", "lantern", "meadow", "nectar", "orbit", "pepper", "quartz", "ribbon",
    "saddle", "timber", "umber", "velvet", "willow", "xenon", "yonder", "zephyr", "anchor", "breeze", "candle", "dune", "echo", "falcon", "glacier", "hollow", "ivory", "juniper",
    "kelp", "lagoon", "marble", "nimbus",
];

fn filler(random: &mut Random) -> String {
    let words: Vec<&str> = (0..8).map(|_| FILLER[random.below(FILLER.len())]).collect();
    words.join(" ")
}

/// A corpus of `n` rewarded solutions; every fifth is wrong (reward 0) and must be ignored.
fn write_corpus(path: &Path, n: usize) {
    let mut random = Random(7);
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("corpus file"));
    for i in 0..n {
        let mut sentences = vec![filler(&mut random)];
        for family in STRATEGIES {
            if random.chance(0.5) {
                sentences.push(family[random.below(3)].to_string());
            }
            sentences.push(filler(&mut random));
        }
        for _ in 0..2 {
            sentences.push(TOPICS[random.below(TOPICS.len())].to_string());
        }
        // Execution: the same step repeated through the derivation.
        for _ in 0..3 + random.below(3) {
            sentences.push("so x = 2".into());
            sentences.push("multiply both sides by three".into());
        }
        if i % 160 == 0 {
            sentences.push("The purple elephant danced gracefully".into());
        }
        let reward = if i % 5 == 4 { 0.0 } else { 1.0 };
        let record = serde_json::json!({"completion": sentences.join(". ") + ".", "reward": reward});
        writeln!(file, "{record}").expect("write record");
    }
}

/// The phrase's words as the miner writes them (lower case, no apostrophes).
fn words(text: &str) -> String {
    text.to_lowercase().replace('\'', "")
}

#[test]
fn mining_recovers_planted_strategies_and_rejects_execution_and_rare_phrases() {
    let dir = std::env::temp_dir().join(format!("hicra-sg-mine-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let corpus = dir.join("corpus.jsonl");
    write_corpus(&corpus, 1500);
    let (report_path, list) = (dir.join("report.json"), dir.join("sg.txt"));
    let output = Command::new(env!("CARGO_BIN_EXE_hicra"))
        .args(["sg", "mine"])
        .arg(&corpus)
        .arg("--out")
        .arg(&report_path)
        .arg("--list")
        .arg(&list)
        .arg("--embedder")
        .arg(embedder_dir())
        .output()
        .expect("hicra runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // Not a terminal: each stage's progress comes as plain lines, ending at 100%.
    let progress = String::from_utf8_lossy(&output.stderr);
    for stage in ["pass 1, counting n-grams: bytes", "pass 2, exact counts: bytes", "embedding candidates", "pass 3, cluster frequencies: bytes"] {
        assert!(progress.lines().any(|l| l.starts_with(stage) && l.ends_with("(100%)")), "no finished '{stage}' line:\n{progress}");
    }
    assert!(!progress.contains('\u{1b}'), "escape codes in a pipe: {progress}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report_path).expect("report")).expect("json");
    assert_eq!(report["solutions"], 1200, "wrong solutions (reward 0) are skipped");
    let mined: Vec<String> = report["strategic_grams"].as_array().expect("list").iter().map(|g| g.as_str().expect("phrase").to_string()).collect();
    assert_eq!(std::fs::read_to_string(&list).expect("list file").lines().collect::<Vec<_>>(), mined);

    let strategy_texts: Vec<String> = STRATEGIES.iter().flatten().map(|s| words(s)).collect();
    // Every mined phrase comes from a planted strategy ...
    for gram in &mined {
        assert!(strategy_texts.iter().any(|s| format!(" {s} ").contains(&format!(" {gram} "))), "'{gram}' is not a planted strategy\n{report:#}");
    }
    // ... and every strategy is found.
    for family in STRATEGIES {
        let found = mined.iter().any(|gram| family.iter().any(|v| format!(" {} ", words(v)).contains(&format!(" {gram} "))));
        assert!(found, "no phrase of {family:?} was mined: {mined:?}");
    }
    // Execution steps were frequent but repeated within solutions (or not words): rejected.
    let rejected: Vec<&str> = ["rejected_repeated", "rejected_not_words"].iter().flat_map(|k| report[*k].as_array().into_iter().flatten()).filter_map(|g| g["ngram"].as_str()).collect();
    assert!(rejected.contains(&"x = 2"), "{rejected:?}");
    assert!(rejected.iter().any(|g| g.contains("multiply both sides")), "{rejected:?}");
    // Rare phrases never become candidates; topic phrases do but rank too low.
    let candidates: Vec<&str> = report["clusters"].as_array().expect("clusters").iter().flat_map(|c| c["members"].as_array().into_iter().flatten()).filter_map(|m| m["ngram"].as_str()).collect();
    assert!(!candidates.iter().any(|c| c.contains("purple elephant")), "{candidates:?}");
    assert!(candidates.iter().any(|c| c.contains("orchard grows")), "topic phrases should be candidates: {candidates:?}");
    // Paraphrases share clusters: some kept cluster holds phrases of two different variants.
    let merged = report["clusters"].as_array().expect("clusters").iter().filter(|c| c["kept"] == true).any(|c| {
        let members: Vec<&str> = c["members"].as_array().into_iter().flatten().filter_map(|m| m["ngram"].as_str()).collect();
        STRATEGIES.iter().any(|family| {
            let variants: std::collections::HashSet<usize> = members.iter().filter_map(|m| family.iter().position(|v| format!(" {} ", words(v)).contains(&format!(" {m} ")))).collect();
            variants.len() >= 2
        })
    });
    assert!(merged, "no cluster merged paraphrases\n{report:#}");

    // k-means instead: the same seed gives the same clusters.
    let kmeans = |out: &str| -> Value {
        let path = dir.join(out);
        let output = Command::new(env!("CARGO_BIN_EXE_hicra"))
            .args(["sg", "mine"])
            .arg(&corpus)
            .arg("--out")
            .arg(&path)
            .args(["--kmeans", "30", "--seed", "3", "--embedder"])
            .arg(embedder_dir())
            .output()
            .expect("hicra runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_str(&std::fs::read_to_string(&path).expect("report")).expect("json")
    };
    let (first, second) = (kmeans("kmeans-1.json"), kmeans("kmeans-2.json"));
    assert_eq!(first["clusters"].as_array().map(Vec::len), Some(30));
    assert_eq!(first["clusters"], second["clusters"]);
    assert!(!first["strategic_grams"].as_array().expect("list").is_empty());

    // Bad input: a clear error naming the line.
    std::fs::write(dir.join("bad.jsonl"), "{\"completion\": \"fine\"}\nnot json\n").expect("bad corpus");
    let output = Command::new(env!("CARGO_BIN_EXE_hicra")).args(["sg", "mine"]).arg(dir.join("bad.jsonl")).arg("--out").arg(dir.join("bad.json")).arg("--embedder").arg(embedder_dir()).output().expect("hicra runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.jsonl:2") && stderr.contains("not JSON"), "{stderr}");
    assert!(!dir.join("bad.json").exists(), "no report is written on failure");
    // Rewards on another scale: nothing qualifies, and the error says so.
    let output = Command::new(env!("CARGO_BIN_EXE_hicra")).args(["sg", "mine"]).arg(&corpus).arg("--out").arg(dir.join("none.json")).args(["--min-reward", "5"]).arg("--embedder").arg(embedder_dir()).output().expect("hicra runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("none of its 1500 records") && stderr.contains("reward >= 5"), "{stderr}");
}
