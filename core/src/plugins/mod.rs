//! The host side of the plugin ABI: loading plugin libraries and calling them under guards.
//!
//! Loading copies the library to a uniquely named file first: `dlopen` of a path that is
//! already open returns the old handle, and abi_stable's `RootModule::load_from*` caches the
//! first module of a type for the life of the process, so a new generation of a plugin must be
//! a new file opened with `lib_header_from_path` and checked with `init_root_module` (which
//! runs abi_stable's version and type-layout checks). Libraries are never unloaded.
//!
//! Every call is guarded: it runs on its own thread with a time-out, and its output is checked
//! (one finite score per item). A failing item is reported as failed, never as a reward of 0.

pub mod step;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use abi_stable::library::lib_header_from_path;
use abi_stable::std_types::{RResult, RStr};
use abi_stable::std_types::{RString, RVec};
use hicra_sdk::{CreditGroup, DetectItem, PluginKind, PluginModRef, RewardItem, RewardScore, ABI_VERSION};

/// Why a plugin could not be loaded or called.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The file could not be copied or opened.
    #[error("{}: {message}", path.display())]
    Load {
        /// The plugin file.
        path: PathBuf,
        /// What went wrong (abi_stable's explanation for foreign or mismatched libraries).
        message: String,
    },
    /// The plugin refused its configuration.
    #[error("plugin '{name}' rejected its configuration: {message}")]
    Config {
        /// The plugin.
        name: String,
        /// Its explanation.
        message: String,
    },
    /// A call failed as a whole (panic, error, time-out, malformed output).
    #[error("plugin '{name}': {message}")]
    Call {
        /// The plugin.
        name: String,
        /// What went wrong.
        message: String,
    },
}

/// A loaded plugin generation.
#[derive(Clone)]
pub struct Plugin {
    /// The plugin's name.
    pub name: String,
    /// What it does.
    pub kind: PluginKind,
    /// The plugin's version.
    pub version: String,
    /// The file it was loaded from.
    pub source: PathBuf,
    /// Generation number within this process (1 for the first load).
    pub generation: u64,
    module: PluginModRef,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("version", &self.version)
            .field("source", &self.source)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Where this process keeps the uniquely named copies it loads (one per generation).
fn copies_dir() -> PathBuf {
    std::env::temp_dir().join(format!("hicra-plugins-{}", std::process::id()))
}

/// Bytes of address space mapped from plugin copies: the memory that generations, never
/// unloaded, pin. Read from `/proc/self/maps`; `None` where that file does not exist.
pub fn pinned_bytes() -> Option<u64> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let copies = copies_dir();
    let copies = copies.to_string_lossy();
    let mut total = 0u64;
    for line in maps.lines() {
        // address perms offset dev inode path
        let mut fields = line.split_whitespace();
        let (Some(range), Some(path)) = (fields.next(), fields.nth(4)) else { continue };
        if !path.starts_with(copies.as_ref()) {
            continue;
        }
        if let Some((start, end)) = range.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                total += end.saturating_sub(start);
            }
        }
    }
    Some(total)
}

/// The plugin libraries in `dir` (files ending in the platform's library extension), sorted
/// by name so load order is stable.
pub fn libraries_in(dir: &Path) -> Result<Vec<PathBuf>, PluginError> {
    let err = |message: String| PluginError::Load { path: dir.to_path_buf(), message };
    let entries = std::fs::read_dir(dir).map_err(|e| err(format!("cannot list the plugin folder: {e}")))?;
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| err(format!("cannot list the plugin folder: {e}")))?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == std::env::consts::DLL_EXTENSION) {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// Loads a plugin library and applies `config` (a JSON object).
pub fn load(path: &Path, config: &serde_json::Value) -> Result<Plugin, PluginError> {
    let plugin = open(path)?;
    plugin.configure(config)?;
    Ok(plugin)
}

/// Loads a new generation of a plugin library without configuring it (its name is known
/// only once it is loaded, and configurations are keyed by name).
pub fn open(path: &Path) -> Result<Plugin, PluginError> {
    let err = |message: String| PluginError::Load { path: path.to_path_buf(), message };
    let generation = GENERATION.fetch_add(1, Ordering::Relaxed) + 1;
    let copies = copies_dir();
    std::fs::create_dir_all(&copies).map_err(|e| err(format!("cannot create {}: {e}", copies.display())))?;
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "plugin".into());
    let copy = copies.join(format!("{stem}.gen{generation}.so"));
    std::fs::copy(path, &copy).map_err(|e| err(format!("cannot copy to {}: {e}", copy.display())))?;
    let header = lib_header_from_path(&copy).map_err(|e| err(format!("not a hicra plugin: {e}")))?;
    let module = header.init_root_module::<PluginModRef>().map_err(|e| {
        let built_with = header.version_strings().version;
        err(format!("incompatible plugin: built against hicra-sdk {built_with}, this server uses {}: {}", hicra_sdk::SDK_VERSION, summarize_incompatibility(&e)))
    })?;
    let abi = (module.abi_version())();
    if abi != ABI_VERSION {
        return Err(err(format!("plugin ABI version {abi}, this host speaks {ABI_VERSION}")));
    }
    let info = (module.info())();
    Ok(Plugin { name: info.name.to_string(), kind: info.kind, version: info.version.to_string(), source: path.to_path_buf(), generation, module })
}

/// The differences abi_stable found, one short phrase each, instead of its full layout dump
/// (thousands of lines): `WHAT (expected A, found B) in TYPE, TYPE`.
fn summarize_incompatibility(error: &abi_stable::library::LibraryError) -> String {
    let text = error.to_string();
    // (what, expected, found) -> the types it was found in, in order of appearance.
    let mut differences: Vec<((String, String, String), Vec<String>)> = Vec::new();
    let mut current_type = String::new();
    let mut lines = text.lines().map(str::trim).peekable();
    while let Some(line) = lines.next() {
        if line.contains("error(s)") {
            // A new error trace: its type comes from its own layout.
            current_type.clear();
        } else if line == "Layout of expected type:" {
            // The type's name is the `type:` line of its layout; a function has none, so its
            // signature (the layout's first line) names it.
            let (mut name, mut first) = (None, None);
            while let Some(l) = lines.next_if(|l| !l.is_empty() && *l != "Layout of found type:") {
                first = first.or(Some(l));
                name = name.or(l.strip_prefix("type:"));
            }
            current_type = name.or(first).unwrap_or_default().to_string();
        } else if let Some(what) = line.strip_prefix("Error:") {
            lines.next_if(|l| *l == "Expected:");
            let expected = section(&mut lines);
            lines.next_if(|l| *l == "Found:");
            let found = section(&mut lines);
            let key = (what.to_string(), expected, found);
            match differences.iter_mut().find(|(k, _)| *k == key) {
                Some((_, types)) if !types.contains(&current_type) => types.push(current_type.clone()),
                Some(_) => {}
                None => differences.push((key, vec![current_type.clone()])),
            }
        }
    }
    if differences.is_empty() {
        return text.lines().take(8).collect::<Vec<_>>().join(" ");
    }
    const SHOWN: usize = 3;
    let mut phrases: Vec<String> = differences
        .iter()
        .take(SHOWN)
        .map(|((what, expected, found), types)| {
            let types: Vec<&str> = types.iter().map(String::as_str).filter(|t| !t.is_empty()).collect();
            let place = if types.is_empty() { String::new() } else { format!(" in {}", types.join(", ")) };
            format!("{what} (expected {expected}, found {found}){place}")
        })
        .collect();
    if differences.len() > SHOWN {
        phrases.push(format!("{} more differences", differences.len() - SHOWN));
    }
    phrases.join("; ")
}

/// The lines of one section of abi_stable's report, up to the next heading or a blank line.
fn section<'a>(lines: &mut std::iter::Peekable<impl Iterator<Item = &'a str>>) -> String {
    let is_value = |l: &&str| !l.is_empty() && *l != "Found:" && !l.starts_with("Error:") && !l.contains("error(s)");
    let mut values = Vec::new();
    while let Some(line) = lines.next_if(is_value) {
        values.push(line);
    }
    values.join(" ")
}

impl Plugin {
    /// Applies a configuration (a JSON object); the plugin validates it.
    pub fn configure(&self, config: &serde_json::Value) -> Result<(), PluginError> {
        let text = config.to_string();
        match (self.module.configure())(RStr::from(text.as_str())) {
            RResult::ROk(()) => Ok(()),
            RResult::RErr(message) => Err(PluginError::Config { name: self.name.clone(), message: message.to_string() }),
        }
    }

    fn fail(&self, message: impl Into<String>) -> PluginError {
        PluginError::Call { name: self.name.clone(), message: message.into() }
    }

    /// Runs `call` on its own thread and waits at most `timeout`. A plugin that hangs keeps
    /// its thread; the host moves on.
    fn guarded<T: Send + 'static>(&self, kind: PluginKind, timeout: Duration, call: impl FnOnce() -> RResult<T, RString> + Send + 'static) -> Result<T, PluginError> {
        if self.kind != kind {
            return Err(self.fail(format!("is a {:?} plugin, not {kind:?}", self.kind)));
        }
        let (send, receive) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("plugin-{}", self.name))
            .spawn(move || {
                let _ = send.send(call());
            })
            .map_err(|e| self.fail(format!("cannot start a call thread: {e}")))?;
        match receive.recv_timeout(timeout) {
            Ok(RResult::ROk(value)) => Ok(value),
            Ok(RResult::RErr(message)) => Err(self.fail(message.to_string())),
            Err(_) => Err(self.fail(format!("timed out after {} ms", timeout.as_millis()))),
        }
    }

    fn check_count<T>(&self, results: &RVec<T>, count: usize) -> Result<(), PluginError> {
        if results.len() != count {
            return Err(self.fail(format!("returned {} results for {count} items", results.len())));
        }
        Ok(())
    }

    /// Scores `items` within `timeout`. The outer error fails the whole batch; inner errors
    /// fail single items (to be masked out of training, not scored 0).
    pub fn score(&self, items: Vec<RewardItem>, timeout: Duration) -> Result<Vec<Result<RewardScore, String>>, PluginError> {
        let count = items.len();
        let call = self.module.score_batch();
        let results = self.guarded(PluginKind::Reward, timeout, move || call(items.as_slice().into()))?;
        self.check_count(&results, count)?;
        Ok(results
            .into_iter()
            .map(|r| match r {
                RResult::ROk(score) if score.score.is_finite() => Ok(score),
                RResult::ROk(score) => Err(format!("non-finite score {}", score.score)),
                RResult::RErr(message) => Err(message.to_string()),
            })
            .collect())
    }

    /// Planning masks for `items`; a mask whose length differs from the item's token spans
    /// fails that item.
    pub fn detect(&self, items: Vec<DetectItem>, timeout: Duration) -> Result<Vec<Result<Vec<bool>, String>>, PluginError> {
        let lengths: Vec<usize> = items.iter().map(|i| i.token_spans.len()).collect();
        let call = self.module.detect_batch();
        let results = self.guarded(PluginKind::SgDetector, timeout, move || call(items.as_slice().into()))?;
        self.check_count(&results, lengths.len())?;
        Ok(results
            .into_iter()
            .zip(lengths)
            .map(|(r, n)| match r {
                RResult::ROk(mask) if mask.len() == n => Ok(mask.iter().map(|&b| b != 0).collect()),
                RResult::ROk(mask) => Err(format!("mask of {} entries for {n} tokens", mask.len())),
                RResult::RErr(message) => Err(message.to_string()),
            })
            .collect())
    }

    /// Per-token advantages for `group`; the group fails as a whole if any row has the wrong
    /// length or a non-finite value.
    pub fn credit(&self, group: CreditGroup, timeout: Duration) -> Result<Vec<Vec<f32>>, PluginError> {
        let lengths: Vec<usize> = group.planning_masks.iter().map(|m| m.len()).collect();
        let call = self.module.credit_group();
        let rows = self.guarded(PluginKind::Credit, timeout, move || call(&group))?;
        self.check_count(&rows, lengths.len())?;
        for (i, (row, n)) in rows.iter().zip(&lengths).enumerate() {
            if row.len() != *n || row.iter().any(|v| !v.is_finite()) {
                return Err(self.fail(format!("response {i}: {} advantages for {n} tokens or a non-finite value", row.len())));
            }
        }
        Ok(rows.into_iter().map(|row| row.into_vec()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plugin library built by `cargo build --release --workspace` (scripts/test.sh does).
    fn built_plugin(name: &str) -> PathBuf {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release").join(format!("lib{name}.so"));
        assert!(path.exists(), "{} missing: run cargo build --release --workspace first", path.display());
        path
    }

    #[test]
    fn foreign_libraries_and_missing_files_are_refused_clearly() {
        let missing = load(Path::new("/nonexistent/libx.so"), &serde_json::json!({}));
        assert!(matches!(missing, Err(PluginError::Load { .. })));
        // libgomp ships beside libtorch: a real shared library that is not a hicra plugin.
        let foreign = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/libtorch/lib/libgomp.so.1");
        let err = load(&foreign, &serde_json::json!({})).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("not a hicra plugin"), "{err}");
    }

    #[test]
    fn math_plugin_scores_and_fails_items_without_an_answer() {
        let path = built_plugin("hicra_math_reward");
        let plugin = load(&path, &serde_json::json!({"last_number_fallback": true})).expect("loads");
        assert_eq!((plugin.name.as_str(), plugin.kind), ("math", PluginKind::Reward));
        let item = |completion: &str, metadata: &str| RewardItem { completion: completion.into(), metadata_json: metadata.into(), ..RewardItem::default() };
        let results = plugin
            .score(vec![item("#### 42", r#"{"answer": "42"}"#), item("it is 41", r#"{"answer": 42}"#), item("7", "{}")], Duration::from_secs(10))
            .expect("batch");
        assert_eq!(results[0].as_ref().map(|s| s.score).ok(), Some(1.0));
        assert_eq!(results[1].as_ref().map(|s| s.score).ok(), Some(0.0));
        assert!(results[2].as_ref().err().is_some_and(|e| e.contains("answer")));
        let bad = load(&path, &serde_json::json!({"last_number_fallback": "yes"}));
        assert!(matches!(bad, Err(PluginError::Config { .. })));
        // A second load is a new generation from a new copy.
        let again = load(&path, &serde_json::json!({})).expect("reloads");
        assert!(again.generation > plugin.generation);
    }

    #[test]
    fn misbehaving_plugins_become_errors_not_crashes_or_zeros() {
        let path = built_plugin("hicra_test_misbehaving");
        let items = || vec![RewardItem::default(), RewardItem::default()];
        let with = |mode: &str| load(&path, &serde_json::json!({"mode": mode})).expect("loads");
        let second = Duration::from_secs(1);
        let message = |r: Result<Vec<Result<RewardScore, String>>, PluginError>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message(with("panic").score(items(), second)).contains("deliberate panic"));
        assert!(message(with("hang").score(items(), Duration::from_millis(300))).contains("timed out"));
        assert!(message(with("wrong_count").score(items(), second)).contains("3 results for 2 items"));
        let nan = with("nan").score(items(), second).expect("batch returns");
        assert!(nan.iter().all(|r| r.as_ref().err().is_some_and(|e| e.contains("non-finite"))));
        assert!(matches!(load(&path, &serde_json::json!({"mode": "reject"})), Err(PluginError::Config { .. })));
        // The host is unharmed: a well-behaved generation of the same library still works.
        let ok = with("ok").score(items(), second).expect("batch");
        assert!(ok.iter().all(|r| r.as_ref().map(|s| s.score).ok() == Some(0.5)));
    }

    #[test]
    fn detector_and_credit_plugins_are_called_and_validated() {
        let second = Duration::from_secs(5);
        let detector = load(&built_plugin("hicra_example_phrase_detector"), &serde_json::json!({"phrases": ["let me check"]})).expect("loads");
        assert_eq!(detector.kind, PluginKind::SgDetector);
        let text = "Hmm, let me check: 2+2=4";
        // Tokens: "Hmm," " let" " me" " check" ":" " 2+2=4"
        let spans: Vec<(u32, u32)> = vec![(0, 4), (4, 8), (8, 11), (11, 17), (17, 18), (18, 24)];
        let item = DetectItem { text: text.into(), token_spans: spans.into_iter().map(|(a, b)| abi_stable::std_types::Tuple2(a, b)).collect() };
        let masks = detector.detect(vec![item], second).expect("batch");
        assert_eq!(masks[0].as_ref().ok(), Some(&vec![false, true, true, true, false, false]));
        // A detector is not a reward.
        assert!(detector.score(vec![RewardItem::default()], second).is_err());

        let credit = load(&built_plugin("hicra_example_credit_variant"), &serde_json::json!({"up": 0.5, "down": 0.25})).expect("loads");
        let group = CreditGroup {
            rewards: vec![1.0, 0.0].into(),
            planning_masks: vec![RVec::from(vec![1u8, 0]), RVec::from(vec![1u8, 0, 0])].into(),
            entropies: RVec::new(),
        };
        // mean 0.5: A = +0.5 -> planning 0.75; A = -0.5 -> planning -0.375.
        let rows = credit.credit(group, second).expect("advantages");
        assert_eq!(rows, vec![vec![0.75, 0.5], vec![-0.375, -0.5, -0.5]]);
        let mismatched = CreditGroup { rewards: vec![1.0].into(), planning_masks: RVec::new(), entropies: RVec::new() };
        assert!(credit.credit(mismatched, second).is_err());
    }

    #[test]
    fn built_in_detector_and_credit_plugins_match_the_host_built_ins() {
        use crate::train::credit::{assign, CreditScheme, GroupInput};
        use crate::train::planning::{spans_from_pieces, StrategicGrams};
        let second = Duration::from_secs(5);
        let pieces = ["Wait", ",", " let", "'s", " try", " a", " different", " approach", ":", " 3", "+", "4"];
        let text: String = pieces.concat();
        let spans = spans_from_pieces(&pieces);
        let detector = load(&built_plugin("hicra_strategic_grams"), &serde_json::json!({})).expect("loads");
        let item = DetectItem { text: text.as_str().into(), token_spans: spans.iter().map(|&(a, b)| abi_stable::std_types::Tuple2(a as u32, b as u32)).collect() };
        let mask = detector.detect(vec![item], second).expect("batch").remove(0).expect("item");
        assert_eq!(mask, StrategicGrams::paper().token_mask(&text, &spans));
        assert!(mask.iter().any(|&m| m) && !mask[9], "{mask:?}");

        let schemes = load(&built_plugin("hicra_credit_schemes"), &serde_json::json!({"scheme": "hicra", "alpha": 0.3})).expect("loads");
        let rewards = [1.0f32, 0.0, 0.0, 1.0];
        let masks: Vec<Vec<bool>> = vec![vec![true, false], vec![false, true, true], vec![false], vec![true]];
        let group = CreditGroup {
            rewards: rewards.to_vec().into(),
            planning_masks: masks.iter().map(|m| m.iter().map(|&b| b as u8).collect()).collect(),
            entropies: RVec::new(),
        };
        let ours = assign(&CreditScheme::Hicra { alpha: 0.3, scale_by_std: true }, &GroupInput { rewards: &rewards, planning_masks: &masks, entropies: None }).expect("assign");
        assert_eq!(schemes.credit(group, second).expect("advantages"), ours.per_token);
        assert!(matches!(load(&built_plugin("hicra_credit_schemes"), &serde_json::json!({"scheme": "magic"})), Err(PluginError::Config { .. })));
    }
}
