//! hicra-sdk: write hicra plugins in ordinary safe Rust, load them into a running server.
//!
//! A plugin is a `cdylib` crate that depends on this crate only. It implements one of the
//! plugin traits ([`RewardPlugin`], [`SgDetectorPlugin`], [`CreditPlugin`]) and exports it
//! with one macro:
//!
//! ```
//! use hicra_sdk::{export_reward_plugin, RewardItem, RewardPlugin, RewardScore};
//!
//! #[derive(Default)]
//! struct Shouty;
//!
//! impl RewardPlugin for Shouty {
//!     const NAME: &'static str = "shouty";
//!     const VERSION: &'static str = "1.0.0";
//!     fn configure(&mut self, _config: &serde_json::Value) -> Result<(), String> {
//!         Ok(())
//!     }
//!     fn score_one(&self, item: &RewardItem) -> Result<RewardScore, String> {
//!         Ok(RewardScore::new(item.completion.contains('!') as u8 as f32))
//!     }
//! }
//!
//! export_reward_plugin!(Shouty);
//! # fn main() {}
//! ```
//!
//! What crosses the boundary is plain data (`RString`, `RVec`, `f32`, JSON text), in batches.
//! The host checks the ABI layout and this crate's version (abi_stable's checks) before any
//! call; a panic inside a plugin is caught by the exported functions and becomes an error, so
//! nothing unwinds across the FFI.
//!
//! ABI evolution rule: [`PluginMod`] is a prefix type, but abi_stable's check refuses a library
//! whose prefix type has fewer fields than the host's, so appending a field would lock every
//! older plugin out. New entry points are separate exported symbols instead (see
//! [`CREDIT_EPISODES_SYMBOL`]), which the host looks up by [`ABI_VERSION`]: a plugin of an older
//! revision loads as before and gets the host's fallback.

#![warn(missing_docs)]

pub mod sandbox;

pub use abi_stable;
use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RResult, RSlice, RStr, RString, RVec, Tuple2};
use abi_stable::{declare_root_module_statics, package_version_strings, StableAbi};
pub use serde_json;

/// The version of this crate a plugin or host was built with (abi_stable compares it too).
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The ABI revision this crate defines. The host loads revisions
/// [`OLDEST_ABI_VERSION`]`..=ABI_VERSION` and refuses others.
///
/// - 1: rewards, detectors, credit schemes over single completions.
/// - 2: credit plugins also export [`CREDIT_EPISODES_SYMBOL`], which sees multi-turn episodes.
///
/// [`PluginMod`] itself stays as it was: abi_stable refuses a library whose prefix type has
/// fewer fields than the host's, so appending a field would lock every ABI-1 plugin out.
/// Additions are separate exported symbols instead, looked up by revision.
pub const ABI_VERSION: u32 = 2;

/// The symbol of the ABI-2 credit entry point for episodes: a [`CreditEpisodesFn`].
pub const CREDIT_EPISODES_SYMBOL: &[u8] = b"hicra_plugin_credit_episodes\0";

/// The type of [`CREDIT_EPISODES_SYMBOL`]: per-token advantages for a group of episodes.
pub type CreditEpisodesFn = extern "C" fn(&CreditEpisodes) -> RResult<RVec<RVec<f32>>, RString>;

/// The oldest ABI revision a host of this crate still loads (its plugins lack the symbols
/// added since, and the host falls back for them).
pub const OLDEST_ABI_VERSION: u32 = 1;

/// What a plugin does.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginKind {
    /// Scores completions.
    Reward,
    /// Marks planning tokens.
    SgDetector,
    /// Turns rewards into per-token advantages.
    Credit,
}

/// One completion to score.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default)]
pub struct RewardItem {
    /// The prompt as text (chat-templated for chat requests).
    pub prompt: RString,
    /// The completion as returned to the client.
    pub completion: RString,
    /// The completion's exact token ids.
    pub token_ids: RVec<u32>,
    /// Metadata from the dataset row or the request, as JSON text (`{}` when none).
    pub metadata_json: RString,
}

impl RewardItem {
    /// The metadata parsed as JSON (`Null` if it is not valid JSON).
    pub fn metadata(&self) -> serde_json::Value {
        serde_json::from_str(self.metadata_json.as_str()).unwrap_or(serde_json::Value::Null)
    }
}

/// A plugin's verdict on one completion.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq)]
pub struct RewardScore {
    /// The reward; must be finite.
    pub score: f32,
    /// Named parts of the score, for metrics.
    pub subscores: RVec<Tuple2<RString, f32>>,
    /// A human-readable explanation.
    pub message: RString,
}

impl RewardScore {
    /// A score with no parts and no message.
    pub fn new(score: f32) -> Self {
        Self { score, ..Self::default() }
    }
}

/// Name, kind and version of a plugin.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct PluginInfo {
    /// The plugin's name.
    pub name: RString,
    /// What it does.
    pub kind: PluginKind,
    /// The plugin's own version.
    pub version: RString,
}

/// Per-item result of a batch call.
pub type ItemResult = RResult<RewardScore, RString>;

/// One completion to mark planning tokens in.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default)]
pub struct DetectItem {
    /// The completion's text.
    pub text: RString,
    /// Byte span of each token within `text` (empty spans for special tokens).
    pub token_spans: RVec<Tuple2<u32, u32>>,
}

/// A detector's answer for one item: 1 marks a planning token, one entry per token span.
pub type MaskResult = RResult<RVec<u8>, RString>;

/// A GRPO group for a credit scheme.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default)]
pub struct CreditGroup {
    /// One reward per response.
    pub rewards: RVec<f32>,
    /// Per response, per token: 1 for planning tokens.
    pub planning_masks: RVec<RVec<u8>>,
    /// Per response, per token entropy (may be empty when not computed).
    pub entropies: RVec<RVec<f32>>,
}

/// A GRPO group of multi-turn episodes for a credit scheme (ABI 2). Each response's tokens
/// run from its first sampled token to its last: the model's turns with the context between
/// them (tool results, user turns, template tokens), which carries no loss.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default)]
pub struct CreditEpisodes {
    /// Rewards, and per-token planning masks and entropies over each response's tokens (0 on
    /// context tokens), as for single completions.
    pub group: CreditGroup,
    /// Per response, per token: 1 where the model sampled the token, 0 for context.
    pub sampled: RVec<RVec<u8>>,
    /// Per response: the turns, as `[start, end)` token ranges of the sampled runs, in order.
    pub turns: RVec<RVec<Tuple2<u32, u32>>>,
}

impl CreditEpisodes {
    /// Response `i`'s turns as ranges.
    pub fn turn_ranges(&self, i: usize) -> Vec<std::ops::Range<usize>> {
        self.turns.get(i).map(|t| t.iter().map(|r| r.0 as usize..r.1 as usize).collect()).unwrap_or_default()
    }
}

/// The root module every plugin exports (a versioned prefix type; see the crate docs).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// [`ABI_VERSION`] as the plugin was built.
    pub abi_version: extern "C" fn() -> u32,
    /// Name, kind, version.
    pub info: extern "C" fn() -> PluginInfo,
    /// Applies the plugin's configuration (a JSON object from the server's TOML).
    pub configure: extern "C" fn(RStr<'_>) -> RResult<(), RString>,
    /// Scores a batch: one result per item, or an error for the whole batch.
    pub score_batch: extern "C" fn(RSlice<'_, RewardItem>) -> RResult<RVec<ItemResult>, RString>,
    /// Marks planning tokens: one mask per item, or an error for the whole batch.
    pub detect_batch: extern "C" fn(RSlice<'_, DetectItem>) -> RResult<RVec<MaskResult>, RString>,
    /// Per-token advantages for a group: one vector per response, one value per token.
    #[sabi(last_prefix_field)]
    pub credit_group: extern "C" fn(&CreditGroup) -> RResult<RVec<RVec<f32>>, RString>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "hicra_plugin";
    const NAME: &'static str = "hicra_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// A reward function. Implement it, then [`export_reward_plugin!`] the type.
pub trait RewardPlugin: Default + Send + Sync + 'static {
    /// The plugin's name.
    const NAME: &'static str;
    /// The plugin's version.
    const VERSION: &'static str;
    /// Checks and applies its configuration; an error refuses the load.
    fn configure(&mut self, config: &serde_json::Value) -> Result<(), String>;
    /// Scores one item; an `Err` fails just that item (it is left out of training, never
    /// scored 0). Implement this for item-by-item rewards, or override [`RewardPlugin::score`]
    /// to see the whole batch at once (one of the two must be implemented).
    fn score_one(&self, item: &RewardItem) -> Result<RewardScore, String> {
        let _ = item;
        Err(format!("plugin '{}' implements neither score_one nor score", Self::NAME))
    }
    /// One result per item, in order. By default, [`RewardPlugin::score_one`] for each item.
    fn score(&self, items: &[RewardItem]) -> Vec<Result<RewardScore, String>> {
        items.iter().map(|item| self.score_one(item)).collect()
    }
}

/// A Strategic-Gram (planning-token) detector. Export with [`export_sg_detector_plugin!`].
///
/// A detector that marks every token of the word "wait" as planning:
///
/// ```
/// use hicra_sdk::{export_sg_detector_plugin, DetectItem, SgDetectorPlugin};
///
/// #[derive(Default)]
/// struct Waits;
///
/// impl SgDetectorPlugin for Waits {
///     const NAME: &'static str = "waits";
///     const VERSION: &'static str = "0.1.0";
///     fn configure(&mut self, _config: &serde_json::Value) -> Result<(), String> {
///         Ok(())
///     }
///     fn detect(&self, items: &[DetectItem]) -> Vec<Result<Vec<bool>, String>> {
///         items
///             .iter()
///             .map(|item| {
///                 let text = item.text.as_str().to_ascii_lowercase();
///                 let hits: Vec<usize> = text.match_indices("wait").map(|(at, _)| at).collect();
///                 // A token is planning when its byte span overlaps a hit.
///                 Ok(item.token_spans.iter().map(|span| hits.iter().any(|&at| (span.0 as usize) < at + 4 && at < span.1 as usize)).collect())
///             })
///             .collect()
///     }
/// }
///
/// export_sg_detector_plugin!(Waits);
/// # fn main() {}
/// ```
pub trait SgDetectorPlugin: Default + Send + Sync + 'static {
    /// The plugin's name.
    const NAME: &'static str;
    /// The plugin's version.
    const VERSION: &'static str;
    /// Checks and applies its configuration; an error refuses the load.
    fn configure(&mut self, config: &serde_json::Value) -> Result<(), String>;
    /// Per item, one flag per token span (true = planning token).
    fn detect(&self, items: &[DetectItem]) -> Vec<Result<Vec<bool>, String>>;
}

/// A credit-assignment scheme. Export with [`export_credit_plugin!`].
///
/// Plain GRPO (reward minus the group mean, on every token), with planning tokens doubled:
///
/// ```
/// use hicra_sdk::{export_credit_plugin, CreditGroup, CreditPlugin};
///
/// #[derive(Default)]
/// struct DoublePlanning;
///
/// impl CreditPlugin for DoublePlanning {
///     const NAME: &'static str = "double_planning";
///     const VERSION: &'static str = "0.1.0";
///     fn configure(&mut self, _config: &serde_json::Value) -> Result<(), String> {
///         Ok(())
///     }
///     fn advantages(&self, group: &CreditGroup) -> Result<Vec<Vec<f32>>, String> {
///         if group.rewards.len() != group.planning_masks.len() {
///             return Err("one planning mask per reward expected".into());
///         }
///         let mean = group.rewards.iter().sum::<f32>() / group.rewards.len().max(1) as f32;
///         Ok(group
///             .rewards
///             .iter()
///             .zip(group.planning_masks.iter())
///             .map(|(reward, mask)| mask.iter().map(|&planning| (reward - mean) * if planning == 1 { 2.0 } else { 1.0 }).collect())
///             .collect())
///     }
/// }
///
/// export_credit_plugin!(DoublePlanning);
/// # fn main() {}
/// ```
pub trait CreditPlugin: Default + Send + Sync + 'static {
    /// The plugin's name.
    const NAME: &'static str;
    /// The plugin's version.
    const VERSION: &'static str;
    /// Checks and applies its configuration; an error refuses the load.
    fn configure(&mut self, config: &serde_json::Value) -> Result<(), String>;
    /// Per response, one advantage per token (same lengths as the planning masks).
    fn advantages(&self, group: &CreditGroup) -> Result<Vec<Vec<f32>>, String>;
    /// Per-token advantages for a group of multi-turn episodes (one value per token of each
    /// response, context tokens included; they carry no loss). By default, [`Self::advantages`]
    /// of the episodes' group: override it to shape credit by turn.
    fn episode_advantages(&self, episodes: &CreditEpisodes) -> Result<Vec<Vec<f32>>, String> {
        self.advantages(&episodes.group)
    }
}

/// What the export macro drives; implemented by the adapters of the three plugin traits.
#[doc(hidden)]
pub trait AnyPlugin: Default + Send + Sync + 'static {
    const NAME: &'static str;
    const VERSION: &'static str;
    const KIND: PluginKind;
    fn configure(&mut self, config: &serde_json::Value) -> Result<(), String>;
    fn score(&self, _items: &[RewardItem]) -> Result<Vec<Result<RewardScore, String>>, String> {
        Err(format!("{} is not a reward plugin", Self::NAME))
    }
    fn detect(&self, _items: &[DetectItem]) -> Result<Vec<Result<Vec<bool>, String>>, String> {
        Err(format!("{} is not a planning-token detector", Self::NAME))
    }
    fn credit(&self, _group: &CreditGroup) -> Result<Vec<Vec<f32>>, String> {
        Err(format!("{} is not a credit scheme", Self::NAME))
    }
    fn credit_episodes(&self, _episodes: &CreditEpisodes) -> Result<Vec<Vec<f32>>, String> {
        Err(format!("{} is not a credit scheme", Self::NAME))
    }
}

macro_rules! adapter {
    ($adapter:ident, $trait:ident, $kind:expr, $method:ident($arg:ty) -> $ret:ty => |$this:ident, $input:ident| $body:expr) => {
        #[doc(hidden)]
        #[derive(Default)]
        pub struct $adapter<T>(pub T);

        impl<T: $trait> AnyPlugin for $adapter<T> {
            const NAME: &'static str = T::NAME;
            const VERSION: &'static str = T::VERSION;
            const KIND: PluginKind = $kind;
            fn configure(&mut self, config: &serde_json::Value) -> Result<(), String> {
                self.0.configure(config)
            }
            fn $method(&self, $input: $arg) -> $ret {
                let $this = &self.0;
                $body
            }
        }
    };
}

adapter!(RewardAdapter, RewardPlugin, PluginKind::Reward, score(&[RewardItem]) -> Result<Vec<Result<RewardScore, String>>, String> => |p, items| Ok(p.score(items)));
adapter!(DetectorAdapter, SgDetectorPlugin, PluginKind::SgDetector, detect(&[DetectItem]) -> Result<Vec<Result<Vec<bool>, String>>, String> => |p, items| Ok(p.detect(items)));
/// Drives a [`CreditPlugin`] (two methods, so written out rather than by `adapter!`).
#[doc(hidden)]
#[derive(Default)]
pub struct CreditAdapter<T>(pub T);

impl<T: CreditPlugin> AnyPlugin for CreditAdapter<T> {
    const NAME: &'static str = T::NAME;
    const VERSION: &'static str = T::VERSION;
    const KIND: PluginKind = PluginKind::Credit;
    fn configure(&mut self, config: &serde_json::Value) -> Result<(), String> {
        self.0.configure(config)
    }
    fn credit(&self, group: &CreditGroup) -> Result<Vec<Vec<f32>>, String> {
        self.0.advantages(group)
    }
    fn credit_episodes(&self, episodes: &CreditEpisodes) -> Result<Vec<Vec<f32>>, String> {
        self.0.episode_advantages(episodes)
    }
}

/// Turns a caught panic's payload into a message.
pub fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("plugin panicked: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("plugin panicked: {s}")
    } else {
        "plugin panicked".to_string()
    }
}

/// Exports a [`RewardPlugin`] type as this library's hicra plugin.
#[macro_export]
macro_rules! export_reward_plugin {
    ($plugin:ty) => {
        $crate::__export_plugin!($crate::RewardAdapter<$plugin>);
    };
}

/// Exports a [`SgDetectorPlugin`] type as this library's hicra plugin.
#[macro_export]
macro_rules! export_sg_detector_plugin {
    ($plugin:ty) => {
        $crate::__export_plugin!($crate::DetectorAdapter<$plugin>);
    };
}

/// Exports a [`CreditPlugin`] type as this library's hicra plugin.
#[macro_export]
macro_rules! export_credit_plugin {
    ($plugin:ty) => {
        $crate::__export_plugin!($crate::CreditAdapter<$plugin>);
    };
}

/// The exported functions (each catching panics) and the root module, for any plugin kind.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_plugin {
    ($adapter:ty) => {
        mod __hicra_plugin_exports {
            use super::*;
            use std::sync::{OnceLock, RwLock};
            use $crate::abi_stable::std_types::{RErr, ROk, RResult, RSlice, RStr, RString, RVec};
            use $crate::{AnyPlugin, CreditEpisodes, CreditGroup, DetectItem, PluginInfo, PluginMod, PluginModRef, RewardItem};

            // Calls share the plugin (read lock): concurrent requests run in parallel, and a call
            // that hangs does not block the next ones. Only `configure` (once per load) writes.
            fn state() -> &'static RwLock<$adapter> {
                static STATE: OnceLock<RwLock<$adapter>> = OnceLock::new();
                STATE.get_or_init(|| RwLock::new(<$adapter as Default>::default()))
            }

            /// Turns panics and errors of `run` into `RErr`.
            fn catching<T>(run: impl FnOnce() -> Result<T, String>) -> RResult<T, RString> {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                    Ok(Ok(value)) => ROk(value),
                    Ok(Err(e)) => RErr(RString::from(e)),
                    Err(payload) => RErr(RString::from($crate::panic_message(payload))),
                }
            }

            /// Runs a call on the shared plugin.
            fn guarded<T>(f: impl FnOnce(&$adapter) -> Result<T, String>) -> RResult<T, RString> {
                catching(|| f(&state().read().unwrap_or_else(|p| p.into_inner())))
            }

            fn per_item<T, U>(results: Vec<Result<T, String>>, convert: impl Fn(T) -> U) -> RVec<RResult<U, RString>> {
                results.into_iter().map(|r| match r {
                    Ok(v) => ROk(convert(v)),
                    Err(e) => RErr(RString::from(e)),
                }).collect()
            }

            extern "C" fn abi_version() -> u32 {
                $crate::ABI_VERSION
            }

            extern "C" fn info() -> PluginInfo {
                PluginInfo {
                    name: RString::from(<$adapter as AnyPlugin>::NAME),
                    kind: <$adapter as AnyPlugin>::KIND,
                    version: RString::from(<$adapter as AnyPlugin>::VERSION),
                }
            }

            extern "C" fn configure(config: RStr<'_>) -> RResult<(), RString> {
                catching(|| {
                    let value: $crate::serde_json::Value =
                        $crate::serde_json::from_str(config.as_str()).map_err(|e| format!("plugin config is not JSON: {e}"))?;
                    state().write().unwrap_or_else(|p| p.into_inner()).configure(&value)
                })
            }

            extern "C" fn score_batch(items: RSlice<'_, RewardItem>) -> RResult<RVec<$crate::ItemResult>, RString> {
                guarded(|plugin| plugin.score(items.as_slice()).map(|r| per_item(r, |s| s)))
            }

            extern "C" fn detect_batch(items: RSlice<'_, DetectItem>) -> RResult<RVec<$crate::MaskResult>, RString> {
                guarded(|plugin| plugin.detect(items.as_slice()).map(|r| per_item(r, |mask| mask.into_iter().map(u8::from).collect())))
            }

            extern "C" fn credit_group(group: &CreditGroup) -> RResult<RVec<RVec<f32>>, RString> {
                guarded(|plugin| plugin.credit(group).map(|rows| rows.into_iter().map(RVec::from).collect()))
            }

            /// ABI 2's entry point for episodes ([`$crate::CREDIT_EPISODES_SYMBOL`]); the
            /// type check is `CreditEpisodesFn`'s.
            #[unsafe(no_mangle)]
            pub extern "C" fn hicra_plugin_credit_episodes(episodes: &CreditEpisodes) -> RResult<RVec<RVec<f32>>, RString> {
                guarded(|plugin| plugin.credit_episodes(episodes).map(|rows| rows.into_iter().map(RVec::from).collect()))
            }
            const _: $crate::CreditEpisodesFn = hicra_plugin_credit_episodes;

            fn get_library() -> PluginModRef {
                use $crate::abi_stable::prefix_type::PrefixTypeTrait;
                PluginMod { abi_version, info, configure, score_batch, detect_batch, credit_group }.leak_into_prefix()
            }

            // What abi_stable's `#[export_root_module]` generates, written out so that plugin
            // crates need no direct abi_stable dependency (the attribute expands to
            // `::abi_stable` paths). The symbol name is checked by a test in hicra-sdk.
            #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
            pub static LIB_HEADER: $crate::abi_stable::library::LibHeader = {
                extern "C" fn erased_module() -> $crate::abi_stable::library::RootModuleResult {
                    $crate::abi_stable::library::__call_root_module_loader(get_library)
                }
                // SAFETY: the constructor returns this library's root module type, as
                // `#[export_root_module]` guarantees for the functions it annotates.
                unsafe {
                    $crate::abi_stable::library::LibHeader::from_constructor::<PluginModRef>(
                        erased_module,
                        $crate::abi_stable::library::CheckTypeLayout::Yes,
                    )
                }
            };
        }
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn export_macro_uses_abi_stables_symbol_name() {
        assert_eq!(abi_stable::library::ROOT_MODULE_LOADER_NAME, "_1as_0lib_1header_0root_bmodule_bloader");
    }

    #[derive(Default)]
    struct Neither;

    impl super::RewardPlugin for Neither {
        const NAME: &'static str = "neither";
        const VERSION: &'static str = "0";
        fn configure(&mut self, _config: &serde_json::Value) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    fn a_reward_plugin_without_score_or_score_one_fails_each_item_clearly() {
        use super::RewardPlugin;
        let results = Neither.score(&[super::RewardItem::default(), super::RewardItem::default()]);
        assert_eq!(results.len(), 2);
        assert!(results.iter().all(|r| r.as_ref().err().is_some_and(|e| e.contains("implements neither score_one nor score"))));
    }
}
