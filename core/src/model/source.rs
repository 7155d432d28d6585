//! Resolving `--model` to files on disk.
//!
//! Accepted forms, tried in this order:
//! 1. a path: a Hugging Face folder (with `config.json`) or a `.gguf` file;
//! 2. a known short name such as `smollm2-135m-instruct` (the default model), looked up as
//!    `<name>.gguf` in `$HICRA_MODELS`, then in the `.deps/models` folder that
//!    `scripts/setup.sh` fills (next to the workspace, or two levels above the binary);
//! 3. a hub id `org/name`, found in the local Hugging Face cache (`$HF_HUB_CACHE`, else
//!    `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), at the snapshot `refs/main` names.
//!    hicra does not download: fetch with `huggingface-cli download org/name` first.

use std::path::{Path, PathBuf};

use super::ModelError;

/// The default model when `--model` is omitted.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// Short names and the GGUF file each resolves to.
const KNOWN_MODELS: &[(&str, &str)] = &[(DEFAULT_MODEL, "smollm2-135m-instruct.gguf")];

/// Files a model is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face folder: `config.json`, safetensors, `tokenizer.json`.
    HfFolder(PathBuf),
    /// A single GGUF file.
    Gguf(PathBuf),
}

impl ModelSource {
    /// A short name for logs and `/v1/models`.
    pub fn display_name(&self) -> String {
        let path = match self {
            Self::HfFolder(p) | Self::Gguf(p) => p,
        };
        let stem = match self {
            Self::HfFolder(_) => path.file_name(),
            Self::Gguf(_) => path.file_stem(),
        };
        stem.map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
    }
}

/// Resolves a `--model` value; see the module docs for the forms accepted.
pub fn resolve(spec: &str) -> Result<ModelSource, ModelError> {
    let path = Path::new(spec);
    if path.exists() {
        return from_path(path);
    }
    if let Some((_, file)) = KNOWN_MODELS.iter().find(|(name, _)| name.eq_ignore_ascii_case(spec)) {
        let dirs = model_dirs();
        return dirs
            .iter()
            .map(|dir| dir.join(file))
            .find(|candidate| candidate.is_file())
            .map(ModelSource::Gguf)
            .ok_or_else(|| ModelError::NotFound {
                name: spec.to_string(),
                hint: format!(
                    "looked for {file} in {}; run scripts/setup.sh or set HICRA_MODELS",
                    dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            });
    }
    if let Some((org, name)) = spec.split_once('/') {
        if !org.is_empty() && !name.is_empty() && !name.contains('/') {
            return from_hub_cache(&hub_cache_dir(), org, name);
        }
    }
    Err(ModelError::NotFound {
        name: spec.to_string(),
        hint: format!(
            "not a file or folder, not a known name ({}), not a hub id org/name",
            KNOWN_MODELS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        ),
    })
}

fn from_path(path: &Path) -> Result<ModelSource, ModelError> {
    if path.is_dir() {
        if !path.join("config.json").is_file() {
            return Err(ModelError::MissingFile { path: path.join("config.json"), what: "model configuration (is this a Hugging Face model folder?)" });
        }
        return Ok(ModelSource::HfFolder(path.to_path_buf()));
    }
    // Anything else is treated as GGUF; the reader checks the magic and says so if it is not.
    Ok(ModelSource::Gguf(path.to_path_buf()))
}

fn model_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("HICRA_MODELS") {
        dirs.push(PathBuf::from(dir));
    }
    dirs.extend(deps_dirs().into_iter().map(|d| d.join("models")));
    dirs
}

/// Where `scripts/setup.sh` may have installed things: the `.deps` folder of the workspace
/// this binary was built from, then the one two levels above the binary
/// (`target/release/hicra` -> `<workspace>/.deps`).
fn deps_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps")];
    if let Ok(exe) = std::env::current_exe() {
        if let Some(workspace) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            dirs.push(workspace.join(".deps"));
        }
    }
    dirs
}

/// The first `.deps` folder that exists (the source tree's when none does).
pub fn deps_dir() -> PathBuf {
    let dirs = deps_dirs();
    dirs.iter().find(|d| d.is_dir()).cloned().unwrap_or_else(|| dirs[0].clone())
}

fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
    home.join(".cache/huggingface/hub")
}

/// Finds `org/name` in a Hugging Face hub cache laid out as
/// `models--org--name/{refs/main, snapshots/<revision>/...}`.
pub fn from_hub_cache(cache: &Path, org: &str, name: &str) -> Result<ModelSource, ModelError> {
    let repo = cache.join(format!("models--{org}--{name}"));
    let not_cached = |why: String| ModelError::NotFound {
        name: format!("{org}/{name}"),
        hint: format!("{why}; hicra reads the local Hugging Face cache only: run `huggingface-cli download {org}/{name}`"),
    };
    let refs_main = repo.join("refs/main");
    let revision = std::fs::read_to_string(&refs_main)
        .map_err(|_| not_cached(format!("{} does not exist", refs_main.display())))?;
    let snapshot = repo.join("snapshots").join(revision.trim());
    if !snapshot.is_dir() {
        return Err(not_cached(format!("snapshot {} is missing", snapshot.display())));
    }
    if snapshot.join("config.json").is_file() {
        return Ok(ModelSource::HfFolder(snapshot));
    }
    let gguf = std::fs::read_dir(&snapshot)
        .map_err(|source| ModelError::Io { path: snapshot.clone(), source })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|ext| ext == "gguf"));
    gguf.map(ModelSource::Gguf)
        .ok_or_else(|| not_cached(format!("snapshot {} has neither config.json nor a .gguf file", snapshot.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hicra-source-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir is writable");
        dir
    }

    #[test]
    fn finds_a_snapshot_in_a_hub_cache_offline() {
        let cache = temp_dir("hub");
        let repo = cache.join("models--Org--Tiny");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).expect("mkdir");
        std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
        std::fs::write(repo.join("refs/main"), "abc123\n").expect("write");
        std::fs::write(snap.join("config.json"), "{}").expect("write");
        assert_eq!(from_hub_cache(&cache, "Org", "Tiny").ok(), Some(ModelSource::HfFolder(snap)));
        let missing = from_hub_cache(&cache, "Org", "Other");
        assert!(matches!(missing, Err(ModelError::NotFound { ref hint, .. }) if hint.contains("huggingface-cli download Org/Other")));
    }

    #[test]
    fn unknown_names_and_folders_without_config_are_explained() {
        assert!(matches!(resolve("no-such-model"), Err(ModelError::NotFound { .. })));
        let dir = temp_dir("noconfig");
        let err = resolve(dir.to_str().unwrap_or_default());
        assert!(matches!(err, Err(ModelError::MissingFile { ref path, .. }) if path.ends_with("config.json")));
    }
}
