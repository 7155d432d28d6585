//! Plugins built inside the test, as a plugin author builds them: the tutorial's starter crate
//! is compiled, loaded into a running server, used for a training step, then changed,
//! rebuilt and reloaded without a restart; libraries built against an incompatible copy of
//! the SDK are refused with a clear error while the server keeps serving.
//!
//! Each scratch crate is its own cargo workspace under `target/plugin-builds/` with the
//! repository's `Cargo.lock`, so builds are offline and incremental across runs.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{last_step, start_server, tiny_model_file, wait_for_steps};
use reqwest::blocking::Client;
use serde_json::{json, Value};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn builds() -> PathBuf {
    repo().join("target/plugin-builds")
}

/// Writes a standalone crate `name` (Cargo.toml from `manifest`, `src/lib.rs` from `source`)
/// and returns its folder.
fn write_crate(name: &str, manifest: &str, source: &str) -> PathBuf {
    let dir = builds().join(name);
    std::fs::create_dir_all(dir.join("src")).expect("scratch crate folder");
    // Rewrite only on change, so cargo's fingerprints keep rebuilds incremental.
    let write = |path: PathBuf, text: &str| {
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text) {
            std::fs::write(&path, text).expect("write scratch file");
        }
    };
    write(dir.join("Cargo.toml"), manifest);
    write(dir.join("src/lib.rs"), source);
    write(dir.join("Cargo.lock"), &std::fs::read_to_string(repo().join("Cargo.lock")).expect("workspace Cargo.lock"));
    dir
}

/// A copy of the SDK at `version`, its source transformed by `edit`.
fn sdk_copy(name: &str, version: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let manifest = format!(
        "[package]\nname = \"hicra-sdk\"\nversion = \"{version}\"\nedition = \"2021\"\n\n[workspace]\n\n[dependencies]\nabi_stable = \"0.11\"\nserde_json = {{ version = \"1\", features = [\"preserve_order\"] }}\n"
    );
    let source = edit(std::fs::read_to_string(repo().join("sdk/src/lib.rs")).expect("sdk source"));
    let dir = write_crate(name, &manifest, &source);
    let sandbox = std::fs::read_to_string(repo().join("sdk/src/sandbox.rs")).expect("sdk sandbox source");
    if std::fs::read_to_string(dir.join("src/sandbox.rs")).ok() != Some(sandbox.clone()) {
        std::fs::write(dir.join("src/sandbox.rs"), sandbox).expect("write sandbox");
    }
    dir
}

/// Builds a plugin crate with `source` as its lib.rs against the SDK at `sdk`; returns the
/// library.
fn build_plugin(name: &str, source: &str, sdk: &Path) -> PathBuf {
    let manifest = format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nhicra-sdk = {{ path = {:?} }}\n",
        sdk.display().to_string()
    );
    let dir = write_crate(name, &manifest, source);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let output = Command::new(cargo)
        .args(["build", "--offline", "--quiet", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", builds().join("target"))
        .output()
        .expect("cargo runs");
    assert!(output.status.success(), "building {name} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let library = builds().join("target/debug").join(format!("lib{}.{}", name.replace('-', "_"), std::env::consts::DLL_EXTENSION));
    assert!(library.exists(), "{} missing after the build", library.display());
    library
}

fn starter_source() -> String {
    std::fs::read_to_string(repo().join("examples/reward-starter/src/lib.rs")).expect("starter source")
}

/// `text` with `from` replaced by `to`; the edit must apply.
fn edited(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the source no longer contains {from:?}");
    text.replace(from, to)
}

/// Copies `library` over `target` the way an author should: a temp file, then a rename, so
/// the server never sees a half-written file.
fn install(library: &Path, target: &Path) {
    let partial = target.with_extension("partial");
    std::fs::copy(library, &partial).expect("copy library");
    std::fs::rename(&partial, target).expect("install library");
}

fn post(client: &Client, url: String, key: &str, body: Value) -> (u16, Value) {
    let response = client.post(url).bearer_auth(key).json(&body).send().expect("request");
    (response.status().as_u16(), response.json().unwrap_or(Value::Null))
}

fn get(client: &Client, url: String, key: &str) -> Value {
    client.get(url).bearer_auth(key).send().expect("request").json().expect("json")
}

fn scratch(tag: &str) -> PathBuf {
    common::scratch_dir(&format!("plugin-builds-{tag}"))
}

/// Builds happen one at a time (cargo would serialise them on its lock anyway).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn the_starter_plugin_trains_then_a_rebuild_changes_its_behaviour_without_a_restart() {
    let _turn = serial();
    let sdk = repo().join("sdk");
    let first = build_plugin("starter-v1", &starter_source(), &sdk);
    let dir = scratch("rebuild");
    let installed = dir.join("libconcise.so");
    install(&first, &installed);
    let config = dir.join("serve.toml");
    std::fs::write(&config, format!("plugins = [{installed:?}]\nadmin_key = \"admin\"\ntrain = true\nmax_context = 128\n\n[plugin_config.concise]\nmax_chars = 4\n")).expect("config");
    let server = start_server(&[OsString::from("--config"), config.into(), "--model".into(), tiny_model_file().into()]);
    let client = common::http_client();
    let url = |path: &str| format!("{}{path}", server.url);

    // Version 1 scores min(1, 4 / characters); four such scores complete a group, which the
    // step worker trains on.
    let (status, body) = post(&client, url("/v1/chat/completions"), "", json!({"model": "model", "messages": [{"role": "user", "content": "hi"}], "n": 4, "temperature": 1.0, "max_tokens": 12, "seed": 11}));
    assert_eq!(status, 200, "{body}");
    let mut last = Value::Null;
    for choice in body["choices"].as_array().expect("choices") {
        let id = choice["hicra"]["rollout_id"].as_str().expect("rollout id");
        let characters = choice["message"]["content"].as_str().expect("content").chars().count();
        let (status, scored) = post(&client, url(&format!("/v1/rollouts/{id}/score")), "", json!({}));
        assert_eq!(status, 200, "{scored}");
        let expected = if characters <= 4 { 1.0 } else { 4.0 / characters as f64 };
        assert!((scored["score"].as_f64().unwrap_or(-1.0) - expected).abs() < 1e-6, "{characters} characters: {scored}");
        last = scored;
    }
    assert_eq!(last["training"]["training"], true, "{last}");
    assert_eq!(last["training"]["groups_completed"], 1, "the fourth score must complete the group: {last}");
    assert_eq!(last["training"]["rewards"][0]["status"], "complete", "{last}");
    let status = wait_for_steps(&server.url, None, 1);
    assert_eq!(last_step(&status)["updated"], true, "the plugin's scores must train: {status}");
    assert_eq!(status["counters"]["trained"], 1, "{status}");

    // Change the code (a stricter rule, a new version), rebuild, install, reload while
    // requests are being served.
    let changed = edited(&starter_source(), "max_chars as f32 / length as f32", "0.0");
    let changed = edited(&changed, "const VERSION: &'static str = \"1.0.0\"", "const VERSION: &'static str = \"2.0.0\"");
    let second = build_plugin("starter-v2", &changed, &sdk);
    install(&second, &installed);
    let chat_url = url("/v1/chat/completions");
    let reloaded = std::thread::scope(|scope| {
        let during: Vec<_> = (0..3)
            .map(|_| {
                let chat_url = chat_url.clone();
                scope.spawn(move || post(&common::http_client(), chat_url, "", json!({"model": "model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8})).0)
            })
            .collect();
        let reloaded = post(&client, url("/admin/plugins/reload"), "admin", json!({}));
        for handle in during {
            assert_eq!(handle.join().expect("request thread"), 200);
        }
        reloaded
    });
    assert_eq!(reloaded.0, 200, "{}", reloaded.1);
    assert_eq!(reloaded.1["plugins"][0]["version"], "2.0.0", "{}", reloaded.1);
    assert!(reloaded.1["plugins"][0]["generation"].as_u64() > Some(1));

    // The new behaviour: over budget now earns 0 where version 1 gave a share. Two sampled
    // choices, so the scored rollout can join a group (an n = 1 rollout never could).
    let (_, body) = post(&client, url("/v1/chat/completions"), "", json!({"model": "model", "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 12, "temperature": 1.0, "seed": 3}));
    let choice = &body["choices"][0];
    let characters = choice["message"]["content"].as_str().expect("content").chars().count();
    assert!(characters > 4, "the probe completion must exceed the budget ({characters} characters)");
    let id = choice["hicra"]["rollout_id"].as_str().expect("rollout id");
    let (status, scored) = post(&client, url(&format!("/v1/rollouts/{id}/score")), "", json!({}));
    assert_eq!(status, 200, "{scored}");
    assert_eq!(scored["score"].as_f64(), Some(0.0), "{scored}");
    assert_eq!(scored["training"]["rewards"][0]["status"], "collecting", "{scored}");
    let listed = get(&client, url("/admin/plugins"), "admin");
    assert!(listed["pinned_bytes"].as_u64() > Some(0), "{listed}");
}

#[test]
fn libraries_built_against_an_incompatible_sdk_are_refused_and_the_server_keeps_serving() {
    let _turn = serial();
    // A newer SDK release (0.2 is not compatible with 0.1 under semver) and a same-version SDK
    // whose RewardItem gained a field: abi_stable's version and layout checks refuse both.
    let newer = sdk_copy("sdk-0.2", "0.2.0", |s| s);
    let reshaped = sdk_copy("sdk-reshaped", env!("CARGO_PKG_VERSION"), |s| {
        edited(&s, "pub struct RewardItem {\n", "pub struct RewardItem {\n    /// Added by the test: changes the layout.\n    pub priority: u32,\n")
    });
    let newer_plugin = build_plugin("starter-newer-sdk", &starter_source(), &newer);
    let reshaped_plugin = build_plugin("starter-reshaped-sdk", &starter_source(), &reshaped);

    let dir = scratch("incompatible");
    let installed = dir.join("libconcise.so");
    install(&build_plugin("starter-v1", &starter_source(), &repo().join("sdk")), &installed);
    let config = dir.join("serve.toml");
    std::fs::write(&config, format!("plugins = [{installed:?}]\nadmin_key = \"admin\"\nmax_context = 128\n")).expect("config");
    let server = start_server(&[OsString::from("--config"), config.into(), "--model".into(), tiny_model_file().into()]);
    let client = common::http_client();
    let url = |path: &str| format!("{}{path}", server.url);

    for (library, expected) in [(&newer_plugin, "built against hicra-sdk 0.2.0"), (&reshaped_plugin, "too many fields (expected 4, found 5) in RewardItem")] {
        install(library, &installed);
        let (status, refused) = post(&client, url("/admin/plugins/reload"), "admin", json!({}));
        assert_eq!(status, 400, "{refused}");
        let message = refused["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains("incompatible plugin") && message.contains(expected), "{message}");
        assert!(message.contains("previous plugins keep serving"), "{message}");
        // Still serving, with the original generation.
        let listed = get(&client, url("/admin/plugins"), "admin");
        assert_eq!(listed["plugins"][0]["version"], "1.0.0", "{listed}");
        let (status, _) = post(&client, url("/v1/chat/completions"), "", json!({"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}));
        assert_eq!(status, 200);
    }
}

#[test]
fn a_watched_plugin_folder_loads_new_libraries_by_itself() {
    let _turn = serial();
    let dir = scratch("watch");
    let folder = dir.join("plugins");
    std::fs::create_dir_all(&folder).expect("plugin folder");
    install(&build_plugin("starter-v1", &starter_source(), &repo().join("sdk")), &folder.join("libconcise.so"));
    let server = start_server(&[
        OsString::from("--plugin-dir"),
        folder.clone().into(),
        "--watch-plugins".into(),
        "--admin-key".into(),
        "admin".into(),
        "--model".into(),
        tiny_model_file().into(),
    ]);
    let client = common::http_client();
    let names = || -> Vec<String> {
        let listed = get(&client, format!("{}/admin/plugins", server.url), "admin");
        listed["plugins"].as_array().map(|a| a.iter().filter_map(|p| p["name"].as_str().map(String::from)).collect()).unwrap_or_default()
    };
    assert_eq!(names(), vec!["concise"]);
    // Drop a second library into the folder: the watcher loads it without any request.
    let math = common::built_plugin("hicra_math_reward");
    install(&math, &folder.join("libmath.so"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while names().len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(names(), vec!["concise", "math"]);
    // A broken file in the folder does not take the loaded plugins down.
    std::fs::write(folder.join("libbroken.so"), b"not a library").expect("broken file");
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(names(), vec!["concise", "math"]);
}
