//! A sweep: one base run configuration, the arms that differ from it (credit scheme, alpha,
//! learning rate, ...), crossed with an optional grid of further settings and with seeds.
//!
//! ```toml
//! base = "run.toml"              # a `hicra train` configuration, or an inline [base] table
//! output_dir = "runs/compare"
//! seeds = [1, 2, 3]
//!
//! [[arms]]
//! name = "grpo"
//! set = { "trainer.credit" = { scheme = "grpo" } }
//!
//! [[arms]]
//! name = "hicra"
//! set = { "trainer.credit" = { scheme = "hicra", alpha = 0.2 } }
//!
//! [grid]                         # optional: every arm at every value
//! "trainer.optim.lr" = [1e-5, 1e-4]
//! ```
//!
//! Equal compute is a property of the sweep, enforced here: an arm or grid setting may not
//! change what the arms are compared on: the data, the prompts per step, the samples per
//! prompt, the token budget, the steps, the evaluation, the seed. So every arm of a seed sees
//! the same prompts in the same order (the seed orders the data) and samples as many tokens.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::train::run::RunConfig;

/// Why a sweep cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The sweep (or a run configuration it builds) is invalid.
    #[error("invalid sweep: {0}")]
    Invalid(String),
}

/// The sweep file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// The run every arm starts from: a path (relative to the sweep file) or a table.
    pub base: Base,
    /// Where every run and the report go: `<output_dir>/<arm>/seed-<seed>/`.
    pub output_dir: PathBuf,
    /// Seeds; each arm runs once per seed.
    pub seeds: Vec<u64>,
    /// The arms; the first is the baseline of the paired differences.
    pub arms: Vec<ArmConfig>,
    /// Settings crossed with every arm: dotted key -> values.
    #[serde(default)]
    pub grid: toml::Table,
}

/// [`SweepConfig::base`].
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Base {
    /// A `hicra train` configuration file.
    File(PathBuf),
    /// The configuration itself.
    Inline(toml::Table),
}

/// One arm: a name and the settings it changes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmConfig {
    /// A short name (a folder name: letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Dotted keys of the run configuration and their values.
    #[serde(default)]
    pub set: toml::Table,
}

/// One run of the sweep.
#[derive(Clone, Debug)]
pub struct PlannedRun {
    /// The arm's name, with its grid values (`hicra@lr=0.0001`).
    pub arm: String,
    /// The seed.
    pub seed: u64,
    /// The complete run configuration.
    pub config: RunConfig,
}

/// Settings that would change what the arms are compared on.
const FIXED_BY_THE_SWEEP: [&str; 15] = [
    "model", "seed", "steps", "prompts_per_step", "group_size", "max_new_tokens", "temperature", "data", "eval_fraction", "eval_data", "eval_every", "eval_prompts", "eval_samples",
    "eval_before_training", "output_dir",
];

impl SweepConfig {
    /// Reads a sweep file.
    pub fn load(path: &Path) -> Result<(Self, RunConfigBase), SweepError> {
        let text = std::fs::read_to_string(path).map_err(|source| SweepError::Io { path: path.to_path_buf(), source })?;
        let sweep: SweepConfig = toml::from_str(&text).map_err(|e| SweepError::Invalid(format!("{}: {e}", path.display())))?;
        let base = match &sweep.base {
            Base::Inline(table) => table.clone(),
            Base::File(file) => {
                let file = path.parent().map_or_else(|| file.clone(), |dir| dir.join(file));
                let text = std::fs::read_to_string(&file).map_err(|source| SweepError::Io { path: file.clone(), source })?;
                toml::from_str(&text).map_err(|e| SweepError::Invalid(format!("{}: {e}", file.display())))?
            }
        };
        Ok((sweep, RunConfigBase(base)))
    }

    /// Every run: arms (crossed with the grid) x seeds, arm-major, in file order.
    pub fn plan(&self, base: &RunConfigBase) -> Result<Vec<PlannedRun>, SweepError> {
        if self.arms.is_empty() || self.seeds.is_empty() {
            return Err(SweepError::Invalid("a sweep needs at least one arm and one seed".into()));
        }
        let mut names = std::collections::HashSet::new();
        let mut runs = Vec::new();
        for arm in &self.arms {
            check_name(&arm.name)?;
            for (grid_name, grid_settings) in grid_points(&self.grid)? {
                let name = if grid_name.is_empty() { arm.name.clone() } else { format!("{}@{grid_name}", arm.name) };
                if !names.insert(name.clone()) {
                    return Err(SweepError::Invalid(format!("two arms are named '{name}'")));
                }
                for &seed in &self.seeds {
                    let mut table = base.0.clone();
                    for (key, value) in arm.set.iter().chain(grid_settings.iter()) {
                        set_dotted(&mut table, key, value.clone())?;
                    }
                    table.insert("seed".into(), toml::Value::Integer(seed as i64));
                    table.insert("output_dir".into(), toml::Value::String(self.run_dir(&name, seed).display().to_string()));
                    let config: RunConfig = toml::Value::Table(table).try_into().map_err(|e| SweepError::Invalid(format!("arm '{name}': {e}")))?;
                    runs.push(PlannedRun { arm: name.clone(), seed, config });
                }
            }
        }
        Ok(runs)
    }

    /// The folder of one run.
    pub fn run_dir(&self, arm: &str, seed: u64) -> PathBuf {
        self.output_dir.join(arm).join(format!("seed-{seed}"))
    }
}

/// The base run configuration as a TOML table, before arms change it.
#[derive(Clone, Debug)]
pub struct RunConfigBase(toml::Table);

impl RunConfigBase {
    /// Changes the base itself, for every arm alike (so equal compute holds): how one sweep
    /// file moves to another model, device budget or step count (`hicra compare --set`).
    /// `KEY=VALUE` with a dotted key and a TOML value; a value that is not TOML is a string.
    pub fn override_with(&mut self, assignment: &str) -> Result<(), SweepError> {
        let (key, text) = assignment.split_once('=').ok_or_else(|| SweepError::Invalid(format!("--set '{assignment}': expected KEY=VALUE")))?;
        let key = key.trim();
        if matches!(key, "seed" | "output_dir") {
            return Err(SweepError::Invalid(format!("--set '{key}': the sweep sets it for every run (use `seeds` and --out)")));
        }
        let value = match toml::from_str::<toml::Table>(&format!("v = {}", text.trim())) {
            Ok(mut table) => table.remove("v").unwrap_or(toml::Value::String(text.trim().to_string())),
            Err(_) => toml::Value::String(text.trim().to_string()),
        };
        insert_dotted(&mut self.0, key, value)
    }

    /// A base from a run configuration.
    pub fn from_config(config: &RunConfig) -> Result<Self, SweepError> {
        match toml::Value::try_from(config) {
            Ok(toml::Value::Table(table)) => Ok(Self(table)),
            Ok(_) | Err(_) => Err(SweepError::Invalid("the base run configuration does not serialise to a table".into())),
        }
    }
}

fn check_name(name: &str) -> Result<(), SweepError> {
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(SweepError::Invalid(format!("arm name '{name}' must be letters, digits, '-', '_' or '.' (it names a folder)")))
    }
}

/// Every combination of the grid's values: a name (`lr=0.0001,alpha=0.1`) and its settings.
/// An empty grid is one point with no name.
fn grid_points(grid: &toml::Table) -> Result<Vec<(String, toml::Table)>, SweepError> {
    let mut points = vec![(String::new(), toml::Table::new())];
    for (key, values) in grid {
        let values = values.as_array().filter(|v| !v.is_empty()).ok_or_else(|| SweepError::Invalid(format!("grid '{key}' must be a non-empty list of values")))?;
        let short = key.rsplit('.').next().unwrap_or(key);
        points = points
            .into_iter()
            .flat_map(|(name, settings)| {
                values.iter().map(move |value| {
                    let label = format!("{short}={}", value_label(value));
                    let name = if name.is_empty() { label } else { format!("{name},{label}") };
                    let mut settings = settings.clone();
                    settings.insert(key.clone(), value.clone());
                    (name, settings)
                })
            })
            .collect();
    }
    Ok(points)
}

fn value_label(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Float(f) => format!("{f}"),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => serde_json::to_string(other).unwrap_or_default(),
    }
}

/// Sets `key` (dotted) in `table`, refusing the settings the sweep holds fixed.
fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), SweepError> {
    let first = key.split('.').next().unwrap_or(key);
    if FIXED_BY_THE_SWEEP.contains(&first) {
        return Err(SweepError::Invalid(format!(
            "'{key}' would change what the arms are compared on (equal compute: same data, prompts, samples, token budget, steps and evaluation); set it in the base configuration"
        )));
    }
    insert_dotted(table, key, value)
}

/// Sets `key` (dotted: `trainer.optim.lr`) in `table`, creating the tables on the way.
fn insert_dotted(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), SweepError> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().filter(|k| !k.is_empty()).ok_or_else(|| SweepError::Invalid(format!("empty key in '{key}'")))?;
    let mut node = table;
    for part in parts {
        let entry = node.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry.as_table_mut().ok_or_else(|| SweepError::Invalid(format!("'{key}': '{part}' is not a table")))?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep(text: &str) -> SweepConfig {
        toml::from_str(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn base() -> RunConfigBase {
        RunConfigBase::from_config(&RunConfig { steps: 8, prompts_per_step: 4, ..RunConfig::default() }).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn arms_cross_the_grid_and_the_seeds_and_change_only_what_they_name() -> Result<(), SweepError> {
        let s = sweep(
            r#"
            base = "unused.toml"
            output_dir = "out"
            seeds = [1, 2]
            [[arms]]
            name = "grpo"
            set = { "trainer.credit" = { scheme = "grpo" } }
            [[arms]]
            name = "hicra"
            set = { "trainer.credit" = { scheme = "hicra", alpha = 0.3 } }
            [grid]
            "trainer.optim.lr" = [1e-5, 1e-4]
            "#,
        );
        let runs = s.plan(&base())?;
        let names: Vec<(String, u64)> = runs.iter().map(|r| (r.arm.clone(), r.seed)).collect();
        assert_eq!(runs.len(), 8);
        assert_eq!(names[0], ("grpo@lr=0.00001".to_string(), 1));
        assert_eq!(names[7], ("hicra@lr=0.0001".to_string(), 2));
        let hicra = &runs[7].config;
        assert_eq!(hicra.trainer.optim.lr, 1e-4);
        assert!(matches!(hicra.trainer.credit, crate::train::credit::CreditScheme::Hicra { alpha, .. } if (alpha - 0.3).abs() < 1e-6));
        assert_eq!(hicra.output_dir, Path::new("out/hicra@lr=0.0001/seed-2"));
        // Equal compute: apart from the credit scheme, lr, seed and folder, the arms agree.
        for run in &runs {
            assert_eq!((run.config.steps, run.config.prompts_per_step, run.config.group_size, run.config.max_new_tokens), (8, 4, 8, 64));
        }
        Ok(())
    }

    #[test]
    fn an_arm_cannot_change_the_compute_or_name_a_wrong_setting() {
        for (set, needle) in [
            (r#"{ group_size = 4 }"#, "equal compute"),
            (r#"{ "data.kind" = "gsm8k" }"#, "equal compute"),
            (r#"{ "trainer.optim.lrr" = 1.0 }"#, "lrr"),
        ] {
            let s = sweep(&format!("base = \"b\"\noutput_dir = \"o\"\nseeds = [1]\n[[arms]]\nname = \"a\"\nset = {set}\n"));
            match s.plan(&base()) {
                Err(err) => assert!(err.to_string().contains(needle), "{err} should mention {needle}"),
                Ok(_) => panic!("{set} accepted"),
            }
        }
        let bad_name = sweep("base = \"b\"\noutput_dir = \"o\"\nseeds = [1]\n[[arms]]\nname = \"../x\"\n");
        assert!(bad_name.plan(&base()).is_err());
    }

    #[test]
    fn overrides_move_every_arm_alike() -> Result<(), SweepError> {
        let s = sweep("base = \"b\"\noutput_dir = \"o\"\nseeds = [1]\n[[arms]]\nname = \"a\"\n[[arms]]\nname = \"b\"\nset = { \"trainer.optim.lr\" = 0.5 }\n");
        let mut base = base();
        base.override_with("model=Qwen/Qwen2.5-7B-Instruct")?;
        base.override_with("steps = 200")?;
        base.override_with("trainer.optim.lr=0.25")?;
        let runs = s.plan(&base)?;
        assert!(runs.iter().all(|r| r.config.model == "Qwen/Qwen2.5-7B-Instruct" && r.config.steps == 200));
        assert_eq!((runs[0].config.trainer.optim.lr, runs[1].config.trainer.optim.lr), (0.25, 0.5), "the arm's own setting wins");
        for bad in ["steps", "seed=3", "output_dir=x"] {
            assert!(base.override_with(bad).is_err(), "{bad} accepted");
        }
        Ok(())
    }
}
