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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use abi_stable::library::lib_header_from_path;
use abi_stable::std_types::{RResult, RStr};
use hicra_sdk::{PluginKind, PluginModRef, RewardItem, RewardScore, ABI_VERSION};

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

/// Loads a plugin library and applies `config` (a JSON object).
pub fn load(path: &Path, config: &serde_json::Value) -> Result<Plugin, PluginError> {
    let err = |message: String| PluginError::Load { path: path.to_path_buf(), message };
    let generation = GENERATION.fetch_add(1, Ordering::Relaxed) + 1;
    let copies = std::env::temp_dir().join(format!("hicra-plugins-{}", std::process::id()));
    std::fs::create_dir_all(&copies).map_err(|e| err(format!("cannot create {}: {e}", copies.display())))?;
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "plugin".into());
    let copy = copies.join(format!("{stem}.gen{generation}.so"));
    std::fs::copy(path, &copy).map_err(|e| err(format!("cannot copy to {}: {e}", copy.display())))?;
    let header = lib_header_from_path(&copy).map_err(|e| err(format!("not a hicra plugin: {e}")))?;
    let module = header.init_root_module::<PluginModRef>().map_err(|e| err(format!("incompatible plugin: {e}")))?;
    let abi = (module.abi_version())();
    if abi != ABI_VERSION {
        return Err(err(format!("plugin ABI version {abi}, this host speaks {ABI_VERSION}")));
    }
    let info = (module.info())();
    let plugin = Plugin {
        name: info.name.to_string(),
        kind: info.kind,
        version: info.version.to_string(),
        source: path.to_path_buf(),
        generation,
        module,
    };
    let text = config.to_string();
    if let RResult::RErr(message) = (module.configure())(RStr::from(text.as_str())) {
        return Err(PluginError::Config { name: plugin.name, message: message.to_string() });
    }
    Ok(plugin)
}

impl Plugin {
    fn fail(&self, message: impl Into<String>) -> PluginError {
        PluginError::Call { name: self.name.clone(), message: message.into() }
    }

    /// Scores `items` within `timeout`. The outer error fails the whole batch; inner errors
    /// fail single items (to be masked out of training, not scored 0).
    pub fn score(&self, items: Vec<RewardItem>, timeout: Duration) -> Result<Vec<Result<RewardScore, String>>, PluginError> {
        if self.kind != PluginKind::Reward {
            return Err(self.fail(format!("is a {:?} plugin, not a reward", self.kind)));
        }
        let count = items.len();
        let call = self.module.score_batch();
        let (send, receive) = std::sync::mpsc::channel();
        // A plugin that hangs keeps its thread; the host moves on after the time-out.
        std::thread::Builder::new()
            .name(format!("plugin-{}", self.name))
            .spawn(move || {
                let _ = send.send(call(items.as_slice().into()));
            })
            .map_err(|e| self.fail(format!("cannot start a call thread: {e}")))?;
        let results = match receive.recv_timeout(timeout) {
            Ok(RResult::ROk(results)) => results,
            Ok(RResult::RErr(message)) => return Err(self.fail(message.to_string())),
            Err(_) => return Err(self.fail(format!("timed out after {} ms", timeout.as_millis()))),
        };
        if results.len() != count {
            return Err(self.fail(format!("returned {} results for {count} items", results.len())));
        }
        Ok(results
            .into_iter()
            .map(|r| match r {
                RResult::ROk(score) if score.score.is_finite() => Ok(score),
                RResult::ROk(score) => Err(format!("non-finite score {}", score.score)),
                RResult::RErr(message) => Err(message.to_string()),
            })
            .collect())
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
        assert!(message(with("wrong_count").score(items(), second)).contains("1 results for 2 items"));
        let nan = with("nan").score(items(), second).expect("batch returns");
        assert!(nan.iter().all(|r| r.as_ref().err().is_some_and(|e| e.contains("non-finite"))));
        assert!(matches!(load(&path, &serde_json::json!({"mode": "reject"})), Err(PluginError::Config { .. })));
        // The host is unharmed: a well-behaved generation of the same library still works.
        let ok = with("ok").score(items(), second).expect("batch");
        assert!(ok.iter().all(|r| r.as_ref().map(|s| s.score).ok() == Some(0.5)));
    }
}
