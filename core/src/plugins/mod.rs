//! The host side of the plugin ABI: loading plugin libraries and calling them under guards.
//!
//! Loading copies the library to a uniquely named file first: `dlopen` of a path that is
//! already open returns the old handle, and abi_stable's `RootModule::load_from*` caches the
//! first module of a type for the life of the process, so a new generation of a plugin must be
//! a new file opened with `lib_header_from_path` and checked with `init_root_module` (which
//! runs abi_stable's version and type-layout checks). Libraries are never unloaded, but their
//! copies are deleted as soon as they are opened (a mapped library outlives its file), so
//! reloads leave nothing on disk.
//!
//! Every host->plugin call is guarded, loading and `configure` included: it runs on its own
//! thread with a time-out, and its output is checked (one finite score per item). A failing
//! item is reported as failed, never as a reward of 0. Threads of calls that timed out are
//! counted until they return, and a generation with too many of them refuses new calls.

pub mod step;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use abi_stable::library::lib_header_from_path;
use abi_stable::std_types::{RResult, RStr};
use abi_stable::std_types::{RString, RVec};
use hicra_sdk::{CreditEpisodes, CreditEpisodesFn, CreditGroup, DetectItem, PluginInfo, PluginKind, PluginModRef, RewardItem, RewardScore, ABI_VERSION, OLDEST_ABI_VERSION};

/// The time-out of [`load`], for callers without their own (offline `hicra train`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How many calls of one plugin generation may still be running after their time-out before
/// the generation refuses new calls.
///
/// Counted per generation rather than process-wide: one plugin stuck in a loop must not stop
/// the others (a hung detector would otherwise also block reward scoring), and a reload that
/// fixes the plugin starts with a clean count, so service recovers without a restart. Leftover
/// threads stay bounded: this many per generation (plus calls already running when the cap
/// was reached), and generations come only from reloads. [`hung_calls`] reports the total.
pub const MAX_HUNG_CALLS: usize = 8;

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
    /// A call failed as a whole (panic, error, malformed output).
    #[error("plugin '{name}': {message}")]
    Call {
        /// The plugin.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// A call did not return in time; its thread keeps running and is counted as hung.
    #[error("plugin '{name}': {call} timed out after {} ms", timeout.as_millis())]
    TimedOut {
        /// The plugin.
        name: String,
        /// Which call (`configure`, `score`, ...).
        call: &'static str,
        /// The time-out it ran under.
        timeout: Duration,
    },
    /// Refused without calling: too many earlier calls are still hung.
    #[error("plugin '{name}': {hung} calls are still hung after their time-out; refusing new calls until they return (reload the plugin)")]
    Hung {
        /// The plugin.
        name: String,
        /// Calls of this generation still running after their time-out.
        hung: usize,
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
    /// The ABI-2 credit entry point for episodes, when the plugin has one.
    credit_episodes: Option<CreditEpisodesFn>,
    /// Shared by the clones of this generation, and by its call threads.
    hung: Arc<HungCalls>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("version", &self.version)
            .field("source", &self.source)
            .field("generation", &self.generation)
            .field("hung_calls", &self.hung_calls())
            .finish_non_exhaustive()
    }
}

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Call threads of all generations still running after their time-out.
static HUNG_TOTAL: AtomicUsize = AtomicUsize::new(0);

/// Calls of any plugin generation (including ones discarded, say, by a failed reload) whose
/// threads are still running after their time-out.
pub fn hung_calls() -> usize {
    HUNG_TOTAL.load(Ordering::Acquire)
}

/// The timed-out calls of one generation whose threads have not returned yet.
#[derive(Debug)]
struct HungCalls {
    count: AtomicUsize,
    max: usize,
}

impl HungCalls {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { count: AtomicUsize::new(0), max })
    }

    fn enter(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
        HUNG_TOTAL.fetch_add(1, Ordering::AcqRel);
    }

    fn leave(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        HUNG_TOTAL.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a guarded call gave no answer.
#[derive(Debug)]
enum Unanswered {
    /// Still running after the time-out (now counted as hung).
    TimedOut,
    /// Not started: this many calls are hung already.
    Refused(usize),
    /// The call thread could not be started.
    NoThread(std::io::Error),
    /// The call thread ended without sending an answer (it panicked on the host side).
    Lost,
}

impl Unanswered {
    /// A sentence for errors that have no plugin name yet (loading).
    fn describe(&self, call: &str, timeout: Duration) -> String {
        match self {
            Self::TimedOut => format!("{call} timed out after {} ms", timeout.as_millis()),
            Self::Refused(hung) => format!("{call} refused: {hung} calls are still hung after their time-out"),
            Self::NoThread(e) => format!("cannot start a thread for {call}: {e}"),
            Self::Lost => format!("{call} ended without an answer"),
        }
    }
}

// The life of one guarded call, shared by its thread and the caller waiting for it: whichever
// moves it out of RUNNING first decides whether the call counts as hung.
const RUNNING: u8 = 0;
const FINISHED: u8 = 1;
const ABANDONED: u8 = 2;

/// Runs `call` on its own thread and waits at most `timeout`. A call that times out keeps its
/// thread (a thread cannot be killed) and counts in `hung` until it returns; while `hung` is
/// full, calls are refused before any thread starts, so hung threads cannot pile up.
fn run_guarded<T: Send + 'static>(hung: &Arc<HungCalls>, thread: String, timeout: Duration, call: impl FnOnce() -> T + Send + 'static) -> Result<T, Unanswered> {
    let already = hung.count.load(Ordering::Acquire);
    if already >= hung.max {
        return Err(Unanswered::Refused(already));
    }
    let state = Arc::new(AtomicU8::new(RUNNING));
    let (send, receive) = std::sync::mpsc::channel();
    let (thread_state, thread_hung) = (state.clone(), hung.clone());
    std::thread::Builder::new()
        .name(thread)
        .spawn(move || {
            let _ = send.send(call());
            if thread_state.compare_exchange(RUNNING, FINISHED, Ordering::AcqRel, Ordering::Acquire).is_err() {
                // The caller gave up on this call and counted it hung: it has returned now.
                thread_hung.leave();
            }
        })
        .map_err(Unanswered::NoThread)?;
    match receive.recv_timeout(timeout) {
        Ok(value) => Ok(value),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(Unanswered::Lost),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            // Counted before it is marked abandoned, so the thread's `leave` never comes first.
            hung.enter();
            if state.compare_exchange(RUNNING, ABANDONED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return Err(Unanswered::TimedOut);
            }
            // It returned just now: its answer is already in the channel.
            hung.leave();
            receive.recv().map_err(|_| Unanswered::Lost)
        }
    }
}

/// Folders of copies are named `hicra-plugins-PID`, one per process.
const COPIES_PREFIX: &str = "hicra-plugins-";

/// Where this process keeps the uniquely named copies it loads (one per generation). Each
/// copy lives only from the copy to the `dlopen`, and the folder only while a copy is in it.
fn copies_dir() -> PathBuf {
    std::env::temp_dir().join(format!("{COPIES_PREFIX}{}", std::process::id()))
}

/// Serialises making the copies folder and copying into it against removing the folder once
/// empty, so that one load never removes the folder under another.
static COPIES: Mutex<()> = Mutex::new(());

/// Copies `path` to a new file in [`copies_dir`] named after its generation.
fn make_copy(path: &Path, generation: u64) -> Result<PathBuf, String> {
    let _copies = COPIES.lock().unwrap_or_else(|p| p.into_inner());
    let copies = copies_dir();
    std::fs::create_dir_all(&copies).map_err(|e| format!("cannot create {}: {e}", copies.display()))?;
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "plugin".into());
    let copy = copies.join(format!("{stem}.gen{generation}.so"));
    std::fs::copy(path, &copy).map_err(|e| {
        discard(&copy);
        format!("cannot copy to {}: {e}", copy.display())
    })?;
    Ok(copy)
}

/// Deletes a copy once it is opened (or failed to open): a mapped library stays usable after
/// its file is unlinked, and nothing reads the file again (`pinned_bytes` reads the mapping,
/// which keeps the path). Only backtraces through plugin frames lose their symbols.
fn remove_copy(copy: &Path) {
    let _copies = COPIES.lock().unwrap_or_else(|p| p.into_inner());
    discard(copy);
}

/// Removes a copy, and its folder if no other load has a copy in it. Callers hold `COPIES`.
fn discard(copy: &Path) {
    if let Err(e) = std::fs::remove_file(copy) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(copy = %copy.display(), %e, "cannot remove a plugin library copy");
        }
    }
    if let Some(folder) = copy.parent() {
        // Fails while another load's copy is there: that load removes it.
        let _ = std::fs::remove_dir(folder);
    }
}

/// Removes the copies folders under `temp` of processes that no longer run (a crash between
/// copying and opening leaves a copy behind); returns how many. Without `/proc` liveness is
/// unknown and nothing is removed. A live process in another PID namespace sharing `temp`
/// looks dead; removing its folder at worst fails a load that is copying at that instant,
/// since its opened libraries no longer need their files.
fn sweep_stale_copies(temp: &Path) -> usize {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(temp) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(COPIES_PREFIX)).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !proc.join(pid.to_string()).exists() && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Sweeps stale copies once per process, before its first load.
fn sweep_stale_copies_once() {
    static SWEPT: Once = Once::new();
    SWEPT.call_once(|| {
        let removed = sweep_stale_copies(&std::env::temp_dir());
        if removed > 0 {
            tracing::info!(removed, "removed plugin library copies left by processes that exited");
        }
    });
}

/// Bytes of address space mapped from plugin copies: the memory that generations, never
/// unloaded, pin. Read from `/proc/self/maps` (which keeps a deleted copy's path, marked
/// `(deleted)`); `None` where that file does not exist.
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

/// Loads a plugin library and applies `config` (a JSON object), each step within
/// [`DEFAULT_TIMEOUT`].
pub fn load(path: &Path, config: &serde_json::Value) -> Result<Plugin, PluginError> {
    load_within(path, config, DEFAULT_TIMEOUT)
}

/// Loads a plugin library and applies `config` (a JSON object), each step within `timeout`.
pub fn load_within(path: &Path, config: &serde_json::Value, timeout: Duration) -> Result<Plugin, PluginError> {
    let plugin = open(path, timeout)?;
    plugin.configure(config, timeout)?;
    Ok(plugin)
}

/// Loads a new generation of a plugin library without configuring it (its name is known
/// only once it is loaded, and configurations are keyed by name). Opening runs the library's
/// code (initialisers, root module, `info`), so it is guarded with `timeout` like any call.
pub fn open(path: &Path, timeout: Duration) -> Result<Plugin, PluginError> {
    let err = |message: String| PluginError::Load { path: path.to_path_buf(), message };
    sweep_stale_copies_once();
    let generation = GENERATION.fetch_add(1, Ordering::Relaxed) + 1;
    let copy = make_copy(path, generation).map_err(err)?;
    let hung = HungCalls::new(MAX_HUNG_CALLS);
    let opened = {
        let copy = copy.clone();
        run_guarded(&hung, "plugin-load".into(), timeout, move || open_copy(&copy))
    };
    // Opened, failed or still hanging in `dlopen` (which then fails): the file is done with.
    remove_copy(&copy);
    let (module, info, credit_episodes) = opened.map_err(|u| err(u.describe("loading", timeout)))?.map_err(err)?;
    Ok(Plugin { name: info.name.to_string(), kind: info.kind, version: info.version.to_string(), source: path.to_path_buf(), generation, module, credit_episodes, hung })
}

/// Opens a copy and checks it: abi_stable's version and layout checks, then the SDK's ABI
/// number; returns the module, the plugin's info and, for an ABI-2 credit plugin, its
/// entry point for episodes.
fn open_copy(copy: &Path) -> Result<(PluginModRef, PluginInfo, Option<CreditEpisodesFn>), String> {
    let header = lib_header_from_path(copy).map_err(|e| format!("not a hicra plugin: {e}"))?;
    let module = header.init_root_module::<PluginModRef>().map_err(|e| {
        let built_with = header.version_strings().version;
        format!("incompatible plugin: built against hicra-sdk {built_with}, this server uses {}: {}", hicra_sdk::SDK_VERSION, summarize_incompatibility(&e))
    })?;
    let abi = (module.abi_version())();
    if !(OLDEST_ABI_VERSION..=ABI_VERSION).contains(&abi) {
        return Err(format!("plugin ABI version {abi}, this host speaks {OLDEST_ABI_VERSION} to {ABI_VERSION}"));
    }
    let info = (module.info())();
    let credit_episodes = if abi >= 2 && info.kind == PluginKind::Credit { Some(episodes_entry(copy)?) } else { None };
    Ok((module, info, credit_episodes))
}

/// The ABI-2 credit plugin's [`hicra_sdk::CREDIT_EPISODES_SYMBOL`]. The library stays loaded
/// for the process (plugins are never unloaded), so the pointer stays valid.
fn episodes_entry(copy: &Path) -> Result<CreditEpisodesFn, String> {
    let library = abi_stable::library::RawLibrary::load_at(copy).map_err(|e| format!("reopening the plugin: {e}"))?;
    // SAFETY: an ABI-2 plugin exports this symbol with exactly this type (the SDK's export
    // macro checks it against `CreditEpisodesFn` at compile time); the ABI number was checked.
    let entry = unsafe { library.get::<CreditEpisodesFn>(hicra_sdk::CREDIT_EPISODES_SYMBOL) }
        .map(|symbol| *symbol)
        .map_err(|e| format!("an ABI-2 credit plugin without its episode entry point: {e}"))?;
    std::mem::forget(library);
    Ok(entry)
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
    /// Applies a configuration (a JSON object) within `timeout`; the plugin validates it.
    pub fn configure(&self, config: &serde_json::Value, timeout: Duration) -> Result<(), PluginError> {
        let text = config.to_string();
        let call = self.module.configure();
        match self.run("configure", timeout, move || call(RStr::from(text.as_str())))? {
            RResult::ROk(()) => Ok(()),
            RResult::RErr(message) => Err(PluginError::Config { name: self.name.clone(), message: message.to_string() }),
        }
    }

    /// Calls of this generation still running after their time-out.
    pub fn hung_calls(&self) -> usize {
        self.hung.count.load(Ordering::Acquire)
    }

    fn fail(&self, message: impl Into<String>) -> PluginError {
        PluginError::Call { name: self.name.clone(), message: message.into() }
    }

    /// Runs `call` (named `what` in errors) under [`run_guarded`] with this generation's
    /// count of hung calls.
    fn run<T: Send + 'static>(&self, what: &'static str, timeout: Duration, call: impl FnOnce() -> T + Send + 'static) -> Result<T, PluginError> {
        run_guarded(&self.hung, format!("plugin-{}", self.name), timeout, call).map_err(|unanswered| match unanswered {
            Unanswered::TimedOut => PluginError::TimedOut { name: self.name.clone(), call: what, timeout },
            Unanswered::Refused(hung) => PluginError::Hung { name: self.name.clone(), hung },
            other => self.fail(other.describe(what, timeout)),
        })
    }

    /// A call of the plugin's kind, guarded; the plugin's own error fails the call.
    fn guarded<T: Send + 'static>(&self, kind: PluginKind, what: &'static str, timeout: Duration, call: impl FnOnce() -> RResult<T, RString> + Send + 'static) -> Result<T, PluginError> {
        if self.kind != kind {
            return Err(self.fail(format!("is a {:?} plugin, not {kind:?}", self.kind)));
        }
        match self.run(what, timeout, call)? {
            RResult::ROk(value) => Ok(value),
            RResult::RErr(message) => Err(self.fail(message.to_string())),
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
        let results = self.guarded(PluginKind::Reward, "score", timeout, move || call(items.as_slice().into()))?;
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
        let results = self.guarded(PluginKind::SgDetector, "detect", timeout, move || call(items.as_slice().into()))?;
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
        let rows = self.guarded(PluginKind::Credit, "credit", timeout, move || call(&group))?;
        self.checked_advantages(rows, &lengths)
    }

    /// Whether the plugin sees episodes' turns (ABI 2); older ones get the plain group.
    pub fn sees_turns(&self) -> bool {
        self.credit_episodes.is_some()
    }

    /// Per-token advantages for a group of multi-turn episodes: through the plugin's episode
    /// entry point (ABI 2), else its plain one with the episodes' group (ABI 1).
    pub fn credit_episodes(&self, episodes: CreditEpisodes, timeout: Duration) -> Result<Vec<Vec<f32>>, PluginError> {
        let Some(call) = self.credit_episodes else { return self.credit(episodes.group, timeout) };
        let lengths: Vec<usize> = episodes.group.planning_masks.iter().map(|m| m.len()).collect();
        let rows = self.guarded(PluginKind::Credit, "credit", timeout, move || call(&episodes))?;
        self.checked_advantages(rows, &lengths)
    }

    /// Checks a credit plugin's answer: one row per response, one finite value per token.
    fn checked_advantages(&self, rows: RVec<RVec<f32>>, lengths: &[usize]) -> Result<Vec<Vec<f32>>, PluginError> {
        self.check_count(&rows, lengths.len())?;
        for (i, (row, n)) in rows.iter().zip(lengths).enumerate() {
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

    /// A fresh, empty folder for one test.
    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hicra-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    /// Waits up to 10 s for `done`.
    fn eventually(done: impl Fn() -> bool) -> bool {
        let start = std::time::Instant::now();
        while !done() {
            if start.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Credit for two episodes of two turns each (sampled, context, sampled).
    fn two_episodes() -> CreditEpisodes {
        let sampled = vec![1u8, 1, 0, 0, 1];
        CreditEpisodes {
            group: CreditGroup { rewards: vec![1.0, 0.0].into(), planning_masks: vec![RVec::from(vec![0u8; 5]), RVec::from(vec![0u8; 5])].into(), entropies: RVec::new() },
            sampled: vec![RVec::from(sampled.clone()), RVec::from(sampled)].into(),
            turns: vec![RVec::from(vec![abi_stable::std_types::Tuple2(0u32, 2u32), abi_stable::std_types::Tuple2(4, 5)]); 2].into(),
        }
    }

    #[test]
    fn an_abi_1_plugin_still_loads_and_gets_the_plain_group_for_episodes() {
        // Built against the ABI-1 SDK (see the fixture's README).
        let old = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plugins/libhicra_credit_schemes_abi1.so");
        let plugin = load(&old, &serde_json::json!({"scheme": "grpo"})).expect("an ABI-1 plugin loads");
        assert!(!plugin.sees_turns());
        let rows = plugin.credit_episodes(two_episodes(), Duration::from_secs(10)).expect("falls back to the plain entry point");
        assert_eq!(rows.len(), 2);
        assert!(rows[0].iter().all(|&a| a > 0.0) && rows[1].iter().all(|&a| a < 0.0), "{rows:?}");
        // A current plugin gets the turns.
        let current = load(&built_plugin("hicra_test_turn_credit"), &serde_json::json!({})).expect("loads");
        assert!(current.sees_turns());
        let rows = current.credit_episodes(two_episodes(), Duration::from_secs(10)).expect("credit");
        assert_eq!(rows[0], vec![0.5, 0.5, 0.0, 0.0, 1.0], "turn 2 counts twice, context 0");
    }

    #[test]
    fn a_hung_configure_fails_the_load_naming_the_plugin_and_the_time_out() {
        let gate = scratch("configure-gate").join("gate");
        std::fs::write(&gate, b"").expect("gate");
        let timeout = Duration::from_millis(200);
        let started = std::time::Instant::now();
        // Opening (a copy and dlopen) gets the usual time; only configure hangs.
        let err = open(&built_plugin("hicra_test_misbehaving"), Duration::from_secs(30)).and_then(|p| p.configure(&serde_json::json!({"block_configure_while": gate}), timeout)).err();
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert!(matches!(&err, Some(PluginError::TimedOut { name, call: "configure", .. }) if name == "misbehaving"), "{err:?}");
        let message = err.map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(message, "plugin 'misbehaving': configure timed out after 200 ms");
        let _ = std::fs::remove_file(&gate);
    }

    #[test]
    fn hung_calls_are_capped_and_counted_until_they_return() {
        let gate = scratch("score-gate").join("gate");
        std::fs::write(&gate, b"").expect("gate");
        let plugin = load(&built_plugin("hicra_test_misbehaving"), &serde_json::json!({"mode": "per_item"})).expect("loads");
        let blocked = || vec![RewardItem { metadata_json: serde_json::json!({"misbehave": "block", "gate": gate}).to_string().into(), ..RewardItem::default() }];
        let timeout = Duration::from_millis(200);
        // As many calls as the cap hang at once; each times out and stays counted.
        std::thread::scope(|scope| {
            let calls: Vec<_> = (0..MAX_HUNG_CALLS).map(|_| scope.spawn(|| plugin.score(blocked(), timeout))).collect();
            for call in calls {
                assert!(matches!(call.join().expect("thread"), Err(PluginError::TimedOut { call: "score", .. })));
            }
        });
        assert_eq!(plugin.hung_calls(), MAX_HUNG_CALLS);
        assert!(hung_calls() >= MAX_HUNG_CALLS);
        // The next call is refused at once, without a thread: it does not wait out a long
        // time-out (the bound is loose for a loaded machine; the message is exact).
        let generous = Duration::from_secs(30);
        let started = std::time::Instant::now();
        let refused = plugin.score(vec![RewardItem::default()], generous).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert_eq!(refused, format!("plugin 'misbehaving': {MAX_HUNG_CALLS} calls are still hung after their time-out; refusing new calls until they return (reload the plugin)"));
        // Another generation of the same library is not held back by this one's hung calls.
        let fresh = load(&built_plugin("hicra_test_misbehaving"), &serde_json::json!({})).expect("reloads");
        assert!(fresh.score(vec![RewardItem::default()], generous).is_ok());
        // Once the hung calls return, the count drops and calls run again.
        std::fs::remove_file(&gate).expect("open the gate");
        assert!(eventually(|| plugin.hung_calls() == 0), "{} still hung", plugin.hung_calls());
        assert!(plugin.score(vec![RewardItem::default()], generous).is_ok());
    }

    #[test]
    fn copies_are_deleted_once_opened_even_when_loading_fails() {
        let dir = scratch("copies");
        let library = dir.join("libcopyprobe.so");
        std::fs::copy(built_plugin("hicra_test_misbehaving"), &library).expect("copy");
        let broken = dir.join("libcopyprobe_broken.so");
        std::fs::write(&broken, b"not a library").expect("broken");
        let kept: Vec<Plugin> = (0..3).map(|_| load(&library, &serde_json::json!({})).expect("loads")).collect();
        assert!(matches!(load(&library, &serde_json::json!({"mode": "reject"})), Err(PluginError::Config { .. })));
        assert!(matches!(load(&broken, &serde_json::json!({})), Err(PluginError::Load { .. })));
        // Other tests load concurrently: only this test's copies must be gone.
        let leftovers: Vec<String> = std::fs::read_dir(copies_dir())
            .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("libcopyprobe")).collect())
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // The generations run from their deleted files, and still count as pinned memory.
        for plugin in &kept {
            assert!(plugin.score(vec![RewardItem::default()], Duration::from_secs(5)).is_ok());
        }
        assert!(pinned_bytes().is_some_and(|b| b > 0));
    }

    #[test]
    fn copies_left_by_dead_processes_are_swept_and_others_kept() {
        let temp = scratch("sweep");
        // Above Linux's largest pid (2^22): never a live process.
        let dead = temp.join(format!("{COPIES_PREFIX}99999999"));
        let ours = temp.join(format!("{COPIES_PREFIX}{}", std::process::id()));
        let unrelated = temp.join(format!("{COPIES_PREFIX}e2e-1"));
        for folder in [&dead, &ours, &unrelated] {
            std::fs::create_dir_all(folder).expect("folder");
            std::fs::write(folder.join("libx.gen1.so"), b"x").expect("file");
        }
        assert_eq!(sweep_stale_copies(&temp), 1);
        assert!(!dead.exists() && ours.exists() && unrelated.exists());
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
        let enough = Duration::from_secs(30);
        let message = |r: Result<Vec<Result<RewardScore, String>>, PluginError>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message(with("panic").score(items(), enough)).contains("deliberate panic"));
        assert!(message(with("hang").score(items(), Duration::from_millis(300))).contains("timed out"));
        assert!(message(with("wrong_count").score(items(), enough)).contains("3 results for 2 items"));
        let nan = with("nan").score(items(), enough).expect("batch returns");
        assert!(nan.iter().all(|r| r.as_ref().err().is_some_and(|e| e.contains("non-finite"))));
        assert!(matches!(load(&path, &serde_json::json!({"mode": "reject"})), Err(PluginError::Config { .. })));
        // The host is unharmed: a well-behaved generation of the same library still works.
        let ok = with("ok").score(items(), enough).expect("batch");
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
