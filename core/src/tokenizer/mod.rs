//! Tokenizers and chat templates: text in, token ids out, and back, for generation.
//!
//! A [`Tokenizer`] wraps a `tokenizers::Tokenizer` built either from a Hugging Face folder
//! (`tokenizer.json` plus `tokenizer_config.json`) or from GGUF metadata ([`gguf`]), and keeps
//! what generation needs beside it: BOS/EOS tokens, every end-of-sequence id, whether BOS is
//! added, the special-token set and the model's [`ChatTemplate`].
//!
//! Invariants:
//! - `encode` behaves like the reference (HF `tokenizers` for HF folders, llama.cpp for GGUF):
//!   special tokens written in the text become their ids, and BOS is added only when the
//!   pipeline's post-processor adds it (`add_special_tokens = true` and [`Tokenizer::add_bos`]).
//! - [`DecodeStream`] outputs, concatenated, equal `decode` of all ids.
//!
//! This module never touches tensors or files other than the tokenizer files it is given.

pub mod bytes;
pub mod chat;
pub mod gguf;
pub mod splice;
pub mod tool_calls;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

pub use bytes::TokenBytes;
pub use chat::{ChatMessage, ChatTemplate};
pub use gguf::{spec_from_gguf, GgufTokenizerSpec};

/// Names of tokens that end a turn or a sequence in the model families we serve; when such a
/// token is special in a vocabulary it is an end-of-sequence id (as llama.cpp's EOG set does).
const TURN_TERMINATORS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
];

/// `(start, end)` byte ranges in the encoded text, one per token.
pub type ByteOffsets = Vec<(usize, usize)>;

/// Errors from loading tokenizers, encoding, decoding and rendering chat templates.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A tokenizer file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A tokenizer file is not valid JSON or not a valid tokenizer.
    #[error("cannot parse {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// GGUF tokenizer metadata is missing a key or is inconsistent.
    #[error("invalid GGUF tokenizer metadata: {0}")]
    InvalidGguf(String),
    /// The GGUF tokenizer type or pre-tokenizer is not implemented.
    #[error("unsupported GGUF tokenizer: {0}")]
    UnsupportedGguf(String),
    /// Building the tokenization pipeline failed.
    #[error("cannot build tokenizer: {0}")]
    Build(String),
    /// Encoding text failed.
    #[error("encode failed: {0}")]
    Encode(String),
    /// Decoding ids failed (for example an id outside the vocabulary).
    #[error("decode failed: {0}")]
    Decode(String),
    /// The chat template does not compile or failed while rendering.
    #[error("chat template error: {0}")]
    Template(String),
    /// The chat template called `raise_exception(message)`: the input does not fit the model's
    /// conversation format (for example roles that do not alternate).
    #[error("chat template rejected the conversation: {0}")]
    TemplateException(String),
}

/// A tokenizer plus the special-token facts that generation and chat rendering need.
///
/// # Examples
///
/// ```no_run
/// use hicra_core::model::gguf::GgufFile;
/// use hicra_core::tokenizer::{spec_from_gguf, ChatMessage, DecodeStream, Tokenizer};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let file = GgufFile::open("smollm2-135m-instruct.gguf".as_ref())?;
/// let tok = Tokenizer::from_gguf_spec(spec_from_gguf(&file)?)?;
/// let prompt = tok.chat_template().expect("template").render(
///     &[ChatMessage::new("user", "Hi")], None, true, None)?;
/// // The rendered text already holds its special tokens: encode without adding more.
/// let ids = tok.encode(&prompt, false)?;
/// let mut stream = DecodeStream::new(&tok, true);
/// for &id in &ids {
///     if let Some(text) = stream.step(id)? {
///         print!("{text}");
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    bos_id: Option<u32>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
    pad_id: Option<u32>,
    add_bos: bool,
    special_ids: HashSet<u32>,
    chat_template: Option<ChatTemplate>,
    tool_use_template: Option<ChatTemplate>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when given, `tokenizer_config.json` (special tokens,
    /// `add_bos_token`, `added_tokens_decoder`, `chat_template` as a string or as a list of
    /// named templates, of which "default" and "tool_use" are kept).
    pub fn from_hf_files(
        tokenizer_json: &Path,
        tokenizer_config_json: Option<&Path>,
    ) -> Result<Self, TokenizerError> {
        let bytes = std::fs::read(tokenizer_json).map_err(|source| TokenizerError::Io {
            path: tokenizer_json.to_path_buf(),
            source,
        })?;
        let mut inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Parse {
                path: tokenizer_json.to_path_buf(),
                message: e.to_string(),
            })?;
        let config = match tokenizer_config_json {
            Some(path) => read_json(path)?,
            None => Value::Null,
        };
        // tokenizer.json normally lists every added token already; add only those it lacks.
        if let Some(decoder) = config
            .get("added_tokens_decoder")
            .and_then(Value::as_object)
        {
            for (id, entry) in decoder {
                let Some(content) = entry.get("content").and_then(Value::as_str) else {
                    continue;
                };
                if inner.token_to_id(content).is_some() {
                    continue;
                }
                let special = entry
                    .get("special")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let token = tokenizers::AddedToken::from(content, special);
                if special {
                    inner.add_special_tokens(&[token]);
                } else {
                    inner.add_tokens(&[token]);
                }
                if inner.token_to_id(content).map(|got| got.to_string()) != Some(id.clone()) {
                    tracing::warn!(
                        content,
                        id,
                        "added token got a different id than configured"
                    );
                }
            }
        }
        let bos_token = config_token(&config, "bos_token");
        let eos_token = config_token(&config, "eos_token");
        let pad_token = config_token(&config, "pad_token");
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let eos_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let pad_id = pad_token.as_deref().and_then(|t| inner.token_to_id(t));
        // What the post-processor does is what encode does; the config flag only describes it.
        let observed_bos = match bos_id {
            Some(bos) => inner
                .encode("", true)
                .map(|e| e.get_ids().first() == Some(&bos))
                .unwrap_or(false),
            None => false,
        };
        let add_bos = observed_bos;
        if let Some(flag) = config.get("add_bos_token").and_then(Value::as_bool) {
            if flag != observed_bos && bos_id.is_some() {
                tracing::warn!(
                    add_bos_token = flag,
                    post_processor_adds_bos = observed_bos,
                    "tokenizer_config.json disagrees with tokenizer.json; following tokenizer.json"
                );
            }
        }
        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let (default_src, tool_src) = config_templates(config.get("chat_template"));
        let mut tok = Self {
            inner,
            bos_token,
            bos_id,
            eos_token,
            eos_ids: Vec::new(),
            pad_id,
            add_bos,
            special_ids,
            chat_template: None,
            tool_use_template: None,
        };
        tok.eos_ids = tok.collect_eos_ids(eos_id.into_iter().collect());
        tok.chat_template = tok.compile_template(default_src.as_deref())?;
        tok.tool_use_template = tok.compile_template(tool_src.as_deref())?;
        Ok(tok)
    }

    /// Builds the tokenizer llama.cpp would use for GGUF metadata (see [`GgufTokenizerSpec`]).
    pub fn from_gguf_spec(spec: GgufTokenizerSpec) -> Result<Self, TokenizerError> {
        let built = gguf::build(&spec)?;
        let token = |id: Option<u32>| id.and_then(|i| spec.tokens.get(i as usize).cloned());
        let mut tok = Self {
            inner: built.tokenizer,
            bos_token: token(spec.bos_id),
            bos_id: spec.bos_id,
            eos_token: token(spec.eos_id),
            eos_ids: Vec::new(),
            pad_id: spec.pad_id,
            add_bos: built.add_bos,
            special_ids: built.special_ids,
            chat_template: None,
            tool_use_template: None,
        };
        let seed = spec.eos_id.into_iter().chain(spec.eot_id).collect();
        tok.eos_ids = tok.collect_eos_ids(seed);
        tok.chat_template = tok.compile_template(spec.chat_template.as_deref())?;
        Ok(tok)
    }

    /// Encodes `text`; with `add_special_tokens` the post-processor may add BOS (see
    /// [`Tokenizer::add_bos`]). Special tokens written in the text become their ids.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Like [`Tokenizer::encode`], also returning each token's `(start, end)` byte range in
    /// `text` (added tokens such as BOS get `(0, 0)`).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, ByteOffsets), TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Decodes ids to text; invalid UTF-8 (a character cut between tokens) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string (in its vocabulary form, e.g. "Ġthe"), if any.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary form of an id, if the id exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The BOS token text, if the model has one.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The main EOS token text, if the model has one.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The BOS id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The padding id, if the model names one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Every id that ends generation: EOS first, then turn terminators such as `<|im_end|>`,
    /// `<|eot_id|>` and `<|endoftext|>` that are special tokens here, then any added with
    /// [`Tokenizer::add_eos_ids`]. No duplicates.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Adds end-of-sequence ids (e.g. `generation_config.json`'s `eos_token_id` list).
    pub fn add_eos_ids(&mut self, ids: &[u32]) {
        for &id in ids {
            if !self.eos_ids.contains(&id) {
                self.eos_ids.push(id);
            }
        }
    }

    /// Whether `encode(text, true)` puts BOS first.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The model's chat template (the "default" one when the config names several).
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Replaces the chat template (`hicra serve --chat-template FILE`).
    pub fn set_chat_template(&mut self, source: &str) -> Result<(), TokenizerError> {
        self.chat_template = self.compile_template(Some(source))?;
        Ok(())
    }

    /// The "tool_use" template, for models that ship a separate one for tool calling.
    pub fn tool_use_template(&self) -> Option<&ChatTemplate> {
        self.tool_use_template.as_ref()
    }

    /// Whether `id` is a special (control) token, which `decode(.., true)` drops.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    fn collect_eos_ids(&self, mut ids: Vec<u32>) -> Vec<u32> {
        ids.dedup();
        for name in TURN_TERMINATORS {
            if let Some(id) = self.inner.token_to_id(name) {
                if self.special_ids.contains(&id) && !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    fn compile_template(
        &self,
        source: Option<&str>,
    ) -> Result<Option<ChatTemplate>, TokenizerError> {
        source
            .map(|s| ChatTemplate::new(s, self.bos_token.clone(), self.eos_token.clone()))
            .transpose()
    }
}

/// Incremental detokenizer for streaming: feed ids one at a time and get the text that is
/// final. Text ending in an incomplete UTF-8 character (a byte-level token holding part of
/// it) is held back until the character completes, as HF's `DecodeStream` and vLLM's
/// incremental detokenizer do: each step decodes a short window of ids and returns what it
/// adds beyond the window's already-returned prefix, so decoders that treat the first token
/// specially (SentencePiece's leading space) stay exact.
#[derive(Debug)]
pub struct DecodeStream<'a> {
    tok: &'a Tokenizer,
    skip_special_tokens: bool,
    /// Ids from the start of the current window.
    ids: Vec<u32>,
    /// `ids[..read]` decode to text already returned.
    read: usize,
}

impl<'a> DecodeStream<'a> {
    /// Starts an empty stream.
    pub fn new(tok: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tok,
            skip_special_tokens,
            ids: Vec::new(),
            read: 0,
        }
    }

    /// Adds one id; returns the newly final text, or `None` while it is incomplete or empty.
    pub fn step(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let prefix = self
            .tok
            .decode(&self.ids[..self.read], self.skip_special_tokens)?;
        let full = self.tok.decode(&self.ids, self.skip_special_tokens)?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let new_text = full.strip_prefix(prefix.as_str()).ok_or_else(|| {
            TokenizerError::Decode(format!(
                "stream prefix {prefix:?} is not a prefix of {full:?} (token {id})"
            ))
        })?;
        let new_text = new_text.to_string();
        // The next window starts at the first id whose text has not been returned before now.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        Ok(Some(new_text))
    }

    /// Returns text still held back (an incomplete character at the end), as decode would
    /// render it, and empties the stream. Call once after the last id.
    pub fn flush(&mut self) -> Result<Option<String>, TokenizerError> {
        let prefix = self
            .tok
            .decode(&self.ids[..self.read], self.skip_special_tokens)?;
        let full = self.tok.decode(&self.ids, self.skip_special_tokens)?;
        self.ids.clear();
        self.read = 0;
        Ok(full
            .strip_prefix(prefix.as_str())
            .filter(|rest| !rest.is_empty())
            .map(str::to_string))
    }
}

fn read_json(path: &Path) -> Result<Value, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| TokenizerError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A token in tokenizer_config.json: a string, or an AddedToken object with "content".
fn config_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `chat_template` as a string, or a list of `{name, template}`: (default, tool_use).
fn config_templates(value: Option<&Value>) -> (Option<String>, Option<String>) {
    match value {
        Some(Value::String(s)) => (Some(s.clone()), None),
        Some(Value::Array(list)) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(str::to_string)
            };
            (named("default"), named("tool_use"))
        }
        _ => (None, None),
    }
}

/// The default model's tokenizer (SmolLM2's, from the GGUF `scripts/setup.sh` installs),
/// for tests elsewhere in the crate; `None` when the file is absent.
#[cfg(test)]
pub(crate) fn default_model_tokenizer() -> Option<std::sync::Arc<Tokenizer>> {
    let spec = gguf::test_support::smollm2_spec()?;
    Tokenizer::from_gguf_spec(spec).ok().map(std::sync::Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::gguf::test_support::{smollm2_spec, synthetic_spec};

    const UNICODE_TEXTS: &[&str] = &[
        "caf\u{e9} na\u{ef}ve r\u{e9}sum\u{e9} \u{fc}ber Stra\u{df}e",
        "\u{4f60}\u{597d}\u{ff0c}\u{4e16}\u{754c}\u{ff01} \u{65e5}\u{672c}\u{8a9e}\u{306e}\u{30c6}\u{30ad}\u{30b9}\u{30c8}",
        "emoji \u{1F600}\u{1F389} family \u{1F468}\u{200d}\u{1F469}\u{200d}\u{1F467} flag \u{1F1EB}\u{1F1F7}!",
        "<|im_start|>assistant\nSure \u{2014} \u{3b1}\u{3b2}\u{3b3} \u{1F680}<|im_end|>\n",
        "tabs\tand\nnewlines\r\n  spaces  ",
    ];

    /// Feeds ids one by one; returns the concatenated output and how many steps held text back.
    fn stream(tok: &Tokenizer, ids: &[u32], skip: bool) -> (String, usize) {
        let mut s = DecodeStream::new(tok, skip);
        let mut out = String::new();
        let mut held = 0;
        for &id in ids {
            match s.step(id).expect("step") {
                Some(text) => out.push_str(&text),
                None => held += 1,
            }
        }
        if let Some(rest) = s.flush().expect("flush") {
            out.push_str(&rest);
        }
        (out, held)
    }

    #[test]
    fn decode_stream_matches_decode_on_unicode() {
        let Some(spec) = smollm2_spec() else { return };
        let tok = Tokenizer::from_gguf_spec(spec).expect("tokenizer");
        let mut held_total = 0;
        for text in UNICODE_TEXTS {
            let ids = tok.encode(text, false).expect("encode");
            for skip in [false, true] {
                let (streamed, held) = stream(&tok, &ids, skip);
                assert_eq!(
                    streamed,
                    tok.decode(&ids, skip).expect("decode"),
                    "{text:?} skip={skip}"
                );
                held_total += held;
            }
        }
        // Byte-level tokens split emoji and CJK characters, so some steps must have waited.
        assert!(held_total > 0);
    }

    #[test]
    fn decode_stream_synthetic_split_character() {
        let tok = Tokenizer::from_gguf_spec(synthetic_spec()).expect("tokenizer");
        let text = "hello \u{1F389} world";
        let ids = tok.encode(text, false).expect("encode");
        let mut s = DecodeStream::new(&tok, false);
        let outputs: Vec<Option<String>> =
            ids.iter().map(|&id| s.step(id).expect("step")).collect();
        // The emoji's four bytes are four tokens: three held back, then the whole character.
        assert_eq!(
            outputs.iter().filter(|o| o.is_none()).count(),
            3,
            "{outputs:?}"
        );
        assert!(outputs.iter().flatten().any(|o| o == "\u{1F389}"));
        assert_eq!(outputs.into_iter().flatten().collect::<String>(), text);
        // A character that never completes comes out of flush as decode renders it.
        let mut s = DecodeStream::new(&tok, false);
        let partial = &tok.encode("\u{1F389}", false).expect("encode")[..2];
        assert_eq!(s.step(partial[0]).expect("step"), None);
        assert_eq!(s.step(partial[1]).expect("step"), None);
        assert_eq!(
            s.flush().expect("flush"),
            Some(tok.decode(partial, false).expect("decode"))
        );
    }

    #[test]
    fn hf_files_round_trip_with_config() {
        let gguf_tok = Tokenizer::from_gguf_spec(synthetic_spec()).expect("tokenizer");
        let dir = std::env::temp_dir().join(format!("hicra-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let json = dir.join("tokenizer.json");
        gguf_tok.inner.save(&json, false).expect("save");
        let config = dir.join("tokenizer_config.json");
        let cfg = serde_json::json!({
            "bos_token": {"content": "<|im_start|>", "special": true},
            "eos_token": "<|im_end|>",
            "pad_token": null,
            "add_bos_token": false,
            "chat_template": [
                {"name": "default", "template": "{% for m in messages %}{{ m.content }}{% endfor %}"},
                {"name": "tool_use", "template": "tools={{ tools | length }}"}
            ]
        });
        std::fs::write(&config, cfg.to_string()).expect("write config");
        let tok = Tokenizer::from_hf_files(&json, Some(&config)).expect("load");
        std::fs::remove_dir_all(&dir).ok();

        assert_eq!(tok.bos_token(), Some("<|im_start|>"));
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        assert_eq!(tok.bos_id(), gguf_tok.bos_id());
        assert_eq!(tok.eos_ids(), gguf_tok.eos_ids());
        assert!(!tok.add_bos());
        let text = "<|im_start|>hello world<|im_end|>";
        assert_eq!(
            tok.encode(text, true).expect("hf"),
            gguf_tok.encode(text, true).expect("gguf")
        );
        let msgs = [ChatMessage::new("user", "hi")];
        let default = tok.chat_template().expect("default template");
        assert_eq!(
            default.render(&msgs, None, false, None).expect("render"),
            "hi"
        );
        let tools = [serde_json::json!({"type": "function"})];
        let tool_use = tok.tool_use_template().expect("tool_use template");
        assert_eq!(
            tool_use
                .render(&msgs, Some(&tools), false, None)
                .expect("render"),
            "tools=1"
        );
    }

    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn hf_files_missing_file_is_io_error() {
        let err = Tokenizer::from_hf_files(Path::new("/nonexistent/tokenizer.json"), None)
            .expect_err("missing file");
        assert!(matches!(err, TokenizerError::Io { .. }), "{err}");
    }

    #[test]
    fn eos_ids_collect_turn_terminators_once() {
        let mut tok = Tokenizer::from_gguf_spec(synthetic_spec()).expect("tokenizer");
        let im_end = tok.token_to_id("<|im_end|>").expect("im_end");
        let eot = tok.token_to_id("<|endoftext|>").expect("endoftext");
        assert_eq!(tok.eos_ids(), &[im_end, eot]);
        tok.add_eos_ids(&[eot, 7]);
        assert_eq!(tok.eos_ids(), &[im_end, eot, 7]);
    }
}
