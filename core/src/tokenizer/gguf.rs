//! Tokenizers from GGUF metadata, built to tokenize exactly as llama.cpp does.
//!
//! Only `tokenizer.ggml.model = "gpt2"` (byte-level BPE) is implemented. The vocabulary is
//! stored already byte-level encoded ("Ġthe"), so it becomes a `tokenizers` BPE model as is;
//! the pre-tokenizer follows `tokenizer.ggml.pre` with the regexes of llama.cpp's
//! `llama-vocab.cpp`. An unknown `pre` is an error naming it rather than a silent fallback to
//! GPT-2 splitting, because a wrong split gives plausible but different ids, which a served
//! model turns into quietly worse output. SentencePiece (`"llama"`) vocabularies are refused
//! with an error that says so.

use std::collections::{HashMap, HashSet};

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::TokenizerError;
use crate::model::gguf::{GgufFile, GgufValue};

/// `tokenizer.ggml.token_type` of control tokens (`<|im_start|>`): special, matched verbatim.
const TOKEN_TYPE_CONTROL: i32 = 3;
/// `tokenizer.ggml.token_type` of user-defined tokens: matched verbatim, not special.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3` split regex.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2` split regex: Llama 3's with single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer part of a GGUF file's metadata (`tokenizer.ggml.*` keys).
#[derive(Debug, Clone, Default)]
pub struct GgufTokenizerSpec {
    /// `tokenizer.ggml.model`, e.g. "gpt2" (byte-level BPE) or "llama" (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`, the pre-tokenizer name, e.g. "smollm", "llama-bpe", "qwen2".
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by id, in the vocabulary's own encoding.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`, "left right", highest priority first.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` (end of turn).
    pub eot_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`; when absent llama.cpp's default for the `pre` applies.
    pub add_bos: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// `tokenizer.ggml.scores` (SentencePiece piece scores; unused for BPE).
    pub scores: Option<Vec<f32>>,
}

/// How text is split before BPE, per `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreKind {
    /// The GPT-2 regex (HF `ByteLevel(use_regex=true)`).
    Gpt2,
    /// Every digit alone, then the GPT-2 regex (SmolLM, StarCoder).
    DigitsThenGpt2,
    /// Llama 3's regex, numbers in runs of up to three digits.
    Llama3,
    /// Llama 3's regex with single digits (Qwen2, Qwen2.5, Qwen3).
    Qwen2,
}

impl PreKind {
    fn from_name(pre: Option<&str>) -> Result<Self, TokenizerError> {
        match pre {
            None | Some("gpt2") | Some("gpt-2") => Ok(Self::Gpt2),
            Some("smollm") | Some("starcoder") => Ok(Self::DigitsThenGpt2),
            Some("llama-bpe") | Some("llama3") | Some("llama-v3") => Ok(Self::Llama3),
            Some("qwen2") | Some("deepseek-r1-qwen") => Ok(Self::Qwen2),
            Some(other) => Err(TokenizerError::UnsupportedGguf(format!(
                "tokenizer.ggml.pre = {other:?} is not implemented (known: gpt2, smollm, \
                 starcoder, llama-bpe, qwen2, deepseek-r1-qwen)"
            ))),
        }
    }

    fn pre_tokenizer(self) -> Result<PreTokenizerWrapper, TokenizerError> {
        let byte_level = |use_regex| ByteLevel::new(false, true, use_regex);
        let split = |regex: &str| {
            Split::new(
                SplitPattern::Regex(regex.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| TokenizerError::Build(format!("split regex: {e}")))
        };
        Ok(match self {
            Self::Gpt2 => byte_level(true).into(),
            Self::DigitsThenGpt2 => {
                Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into()
            }
            Self::Llama3 => {
                Sequence::new(vec![split(LLAMA3_REGEX)?.into(), byte_level(false).into()]).into()
            }
            Self::Qwen2 => {
                Sequence::new(vec![split(QWEN2_REGEX)?.into(), byte_level(false).into()]).into()
            }
        })
    }
}

/// A built pipeline and the facts [`super::Tokenizer`] keeps beside it.
pub(super) struct Built {
    pub(super) tokenizer: tokenizers::Tokenizer,
    pub(super) special_ids: HashSet<u32>,
    pub(super) add_bos: bool,
}

/// Builds the `tokenizers` pipeline llama.cpp's tokenizer is equivalent to.
pub(super) fn build(spec: &GgufTokenizerSpec) -> Result<Built, TokenizerError> {
    if spec.model != "gpt2" {
        return Err(TokenizerError::UnsupportedGguf(format!(
            "tokenizer.ggml.model = {:?}: only \"gpt2\" (byte-level BPE) vocabularies are \
             implemented; SentencePiece (\"llama\") GGUFs are not supported yet, use the \
             model's Hugging Face folder instead",
            spec.model
        )));
    }
    let kind = PreKind::from_name(spec.pre.as_deref())?;
    let n_tokens = u32::try_from(spec.tokens.len())
        .map_err(|_| TokenizerError::InvalidGguf("more than 2^32 tokens".into()))?;
    for (what, id) in [
        ("bos", spec.bos_id),
        ("eos", spec.eos_id),
        ("eot", spec.eot_id),
        ("pad", spec.pad_id),
    ] {
        if let Some(id) = id.filter(|&id| id >= n_tokens) {
            return Err(TokenizerError::InvalidGguf(format!(
                "{what} token id {id} is outside the vocabulary of {n_tokens}"
            )));
        }
    }
    let mut vocab = HashMap::with_capacity(spec.tokens.len());
    let mut duplicates = 0usize;
    for (id, token) in (0..n_tokens).zip(&spec.tokens) {
        // A repeated string keeps its first id, so text maps to the lowest one; the later
        // ids then decode to nothing.
        if vocab.contains_key(token) {
            duplicates += 1;
        } else {
            vocab.insert(token.clone(), id);
        }
    }
    if duplicates > 0 {
        tracing::warn!(duplicates, "GGUF vocabulary repeats token strings");
    }
    let merges = spec
        .merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| TokenizerError::InvalidGguf(format!("merge {m:?} has no space")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
        // llama.cpp looks a Llama 3 word up whole before merging (HF: ignore_merges).
        .ignore_merges(kind == PreKind::Llama3)
        .build()
        .map_err(|e| TokenizerError::Build(format!("BPE model: {e}")))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(kind.pre_tokenizer()?));
    tokenizer.with_decoder(Some(ByteLevel::default()));

    let mut special_ids = HashSet::new();
    if let Some(types) = &spec.token_types {
        if types.len() != spec.tokens.len() {
            return Err(TokenizerError::InvalidGguf(format!(
                "{} token types for {} tokens",
                types.len(),
                spec.tokens.len()
            )));
        }
        let (mut control, mut user) = (Vec::new(), Vec::new());
        for ((id, token), &ty) in (0..n_tokens).zip(&spec.tokens).zip(types) {
            if ty == TOKEN_TYPE_CONTROL {
                special_ids.insert(id);
                control.push(AddedToken::from(token.as_str(), true).normalized(false));
            } else if ty == TOKEN_TYPE_USER_DEFINED {
                user.push(AddedToken::from(token.as_str(), false).normalized(false));
            }
        }
        tokenizer.add_special_tokens(&control);
        tokenizer.add_tokens(&user);
    }

    // llama.cpp adds BOS by default only for Llama 3 style BPE vocabularies.
    let add_bos = spec.add_bos.unwrap_or(kind == PreKind::Llama3) && spec.bos_id.is_some();
    if let (true, Some(bos_id)) = (add_bos, spec.bos_id) {
        let bos = spec.tokens[bos_id as usize].clone();
        let special = SpecialToken::new("BOS".into(), vec![bos_id], vec![bos])
            .map_err(|e| TokenizerError::Build(format!("BOS post-processor: {e}")))?;
        let template = TemplateProcessing::builder()
            .try_single("BOS $A")
            .and_then(|b| b.try_pair("BOS $A BOS:1 $B:1"))
            .map_err(|e| TokenizerError::Build(format!("BOS post-processor: {e}")))?
            .special_tokens(vec![special])
            .build()
            .map_err(|e| TokenizerError::Build(format!("BOS post-processor: {e}")))?;
        tokenizer.with_post_processor(Some(template));
    }
    Ok(Built {
        tokenizer,
        special_ids,
        add_bos,
    })
}

/// Reads the tokenizer metadata of an opened GGUF file.
pub fn spec_from_gguf(file: &GgufFile) -> Result<GgufTokenizerSpec, TokenizerError> {
    let missing = |key: &str| TokenizerError::InvalidGguf(format!("missing or mistyped key {key}"));
    let string = |key: &str| {
        file.get(key)
            .and_then(GgufValue::as_str)
            .map(str::to_string)
    };
    let id = |key: &str| -> Result<Option<u32>, TokenizerError> {
        file.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| missing(key))
            })
            .transpose()
    };
    let strings = |key: &str| -> Result<Option<Vec<String>>, TokenizerError> {
        file.get(key)
            .map(|v| {
                v.as_array()
                    .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_string)).collect())
                    .ok_or_else(|| missing(key))
            })
            .transpose()
    };
    let token_types = file
        .get("tokenizer.ggml.token_type")
        .map(|v| {
            v.as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|x| x.as_i64().and_then(|n| i32::try_from(n).ok()))
                        .collect()
                })
                .ok_or_else(|| missing("tokenizer.ggml.token_type"))
        })
        .transpose()?;
    let scores = file
        .get("tokenizer.ggml.scores")
        .map(|v| {
            v.as_array()
                .and_then(|a| a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect())
                .ok_or_else(|| missing("tokenizer.ggml.scores"))
        })
        .transpose()?;
    Ok(GgufTokenizerSpec {
        model: string("tokenizer.ggml.model").ok_or_else(|| missing("tokenizer.ggml.model"))?,
        pre: string("tokenizer.ggml.pre"),
        tokens: strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| missing("tokenizer.ggml.tokens"))?,
        token_types,
        merges: strings("tokenizer.ggml.merges")?.unwrap_or_default(),
        bos_id: id("tokenizer.ggml.bos_token_id")?,
        eos_id: id("tokenizer.ggml.eos_token_id")?,
        eot_id: id("tokenizer.ggml.eot_token_id")?,
        pad_id: id("tokenizer.ggml.padding_token_id")?,
        add_bos: file
            .get("tokenizer.ggml.add_bos_token")
            .and_then(GgufValue::as_bool),
        chat_template: string("tokenizer.chat_template"),
        scores,
    })
}

/// Specs for tests elsewhere in the tokenizer module.
#[cfg(test)]
pub(super) mod test_support {
    use std::path::PathBuf;

    use super::*;

    /// The SmolLM2-135M-Instruct GGUF the tests read, when present.
    pub(crate) fn smollm2_path() -> Option<PathBuf> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../.deps/models/smollm2-135m-instruct.gguf");
        if path.is_file() {
            Some(path)
        } else {
            eprintln!(
                "note: {} absent, skipping the real-GGUF tokenizer test",
                path.display()
            );
            None
        }
    }

    /// The real SmolLM2 tokenizer metadata, read through the GGUF reader.
    pub(crate) fn smollm2_spec() -> Option<GgufTokenizerSpec> {
        let file = GgufFile::open(&smollm2_path()?).expect("open GGUF");
        Some(spec_from_gguf(&file).expect("tokenizer metadata"))
    }

    /// A tiny byte-level BPE vocabulary: all 256 bytes, a few merges, control tokens and a
    /// user-defined one.
    pub(crate) fn synthetic_spec() -> GgufTokenizerSpec {
        let mut tokens: Vec<String> = (0..=255u8).map(|b| crate::tokenizer::bytes::byte_level_char(b).to_string()).collect();
        let merges = ["h e", "l l", "he ll", "Ġ w", "o r", "Ġw or"];
        for m in merges {
            tokens.push(m.replace(' ', ""));
        }
        let mut token_types = vec![1; tokens.len()];
        for (t, ty) in [
            ("<|im_start|>", 3),
            ("<|im_end|>", 3),
            ("<|endoftext|>", 3),
            ("<tool>", 4),
        ] {
            tokens.push(t.to_string());
            token_types.push(ty);
        }
        let n = tokens.len() as u32;
        GgufTokenizerSpec {
            model: "gpt2".into(),
            pre: Some("gpt2".into()),
            tokens,
            token_types: Some(token_types),
            merges: merges.iter().map(|m| m.to_string()).collect(),
            bos_id: Some(n - 4),
            eos_id: Some(n - 3),
            chat_template: Some("{{ bos_token }}{{ messages[0].content }}".into()),
            ..GgufTokenizerSpec::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use crate::tokenizer::Tokenizer;

    #[derive(serde::Deserialize)]
    struct Fixture {
        cases: Vec<Case>,
    }

    #[derive(serde::Deserialize)]
    struct Case {
        pre: String,
        text: String,
        ids: Vec<u32>,
    }

    fn smollm2() -> Option<Tokenizer> {
        smollm2_spec().map(|spec| Tokenizer::from_gguf_spec(spec).expect("tokenizer"))
    }

    #[test]
    fn smollm2_matches_python_tokenizers_for_every_pre() {
        let Some(spec) = smollm2_spec() else { return };
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tokenizer/smollm2_gguf_ids.json"
        );
        let fixture: Fixture =
            serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
        let mut checked = 0;
        for pre in ["smollm", "gpt2", "llama-bpe", "qwen2"] {
            let spec = GgufTokenizerSpec {
                pre: Some(pre.into()),
                add_bos: Some(false),
                ..spec.clone()
            };
            let tok = Tokenizer::from_gguf_spec(spec).expect("tokenizer");
            for case in fixture.cases.iter().filter(|c| c.pre == pre) {
                let ids = tok.encode(&case.text, false).expect("encode");
                assert_eq!(ids, case.ids, "pre={pre} text={:?}", case.text);
                assert_eq!(tok.decode(&ids, false).expect("decode"), case.text);
                checked += 1;
            }
        }
        assert_eq!(checked, fixture.cases.len());
    }

    #[test]
    fn smollm2_special_tokens_and_digits() {
        let Some(tok) = smollm2() else { return };
        assert_eq!(tok.encode("12345", false).expect("encode").len(), 5);
        assert_eq!(tok.encode("<|im_start|>", false).expect("encode"), vec![1]);
        assert_eq!(tok.encode("<|im_end|>", false).expect("encode"), vec![2]);
        assert_eq!(tok.bos_id(), Some(1));
        assert_eq!(tok.bos_token(), Some("<|im_start|>"));
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        assert_eq!(tok.eos_ids(), &[2, 0]);
        assert!(!tok.add_bos());
        assert!(tok.is_special(1) && tok.is_special(0) && !tok.is_special(100));
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
        assert_eq!(
            tok.token_to_id("Ġthe"),
            tok.encode(" the", false).expect("encode").first().copied()
        );
        // add_special_tokens changes nothing without add_bos, and control tokens are skippable.
        let text = "<|im_start|>user\nHi<|im_end|>";
        let ids = tok.encode(text, true).expect("encode");
        assert_eq!(ids, tok.encode(text, false).expect("encode"));
        assert_eq!(tok.decode(&ids, true).expect("decode"), "user\nHi");
        let rendered = tok
            .chat_template()
            .expect("template")
            .render(
                &[crate::tokenizer::ChatMessage::new("user", "Hi")],
                None,
                true,
                None,
            )
            .expect("render");
        assert!(rendered.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"));
    }

    #[test]
    fn smollm2_whitespace_and_unicode_round_trip() {
        let Some(tok) = smollm2() else { return };
        for text in [
            "  two leading, three trailing   ",
            "tab\there\n\nnewlines\r\nand\u{a0}nbsp",
            "\u{e0}\u{e9}\u{ee}\u{f5}\u{fc} \u{c7}a \u{e7}a",
            "\u{6f22}\u{5b57}\u{304b}\u{306a}\u{30ab}\u{30ca} \u{d55c}\u{ad6d}\u{c5b4}",
            "\u{1F600}\u{1F44D}\u{1F3FD} \u{1F9D1}\u{200D}\u{1F4BB}",
        ] {
            let ids = tok.encode(text, false).expect("encode");
            assert_eq!(tok.decode(&ids, false).expect("decode"), text);
        }
    }

    #[test]
    fn smollm2_offsets_are_byte_ranges() {
        let Some(tok) = smollm2() else { return };
        let text = "Hello <|im_start|>world 123, caf\u{e9} \u{1F389}!";
        let (ids, offsets) = tok.encode_with_offsets(text, false).expect("encode");
        assert_eq!(ids.len(), offsets.len());
        let mut end = 0;
        for &(s, e) in &offsets {
            assert!(s <= e && e <= text.len() && s >= end.min(s));
            assert!(text.is_char_boundary(s) && text.is_char_boundary(e));
            end = e;
        }
        assert_eq!(end, text.len());
        let im_start = ids.iter().position(|&id| id == 1).expect("special token");
        let (s, e) = offsets[im_start];
        assert_eq!(&text[s..e], "<|im_start|>");
        assert_eq!(&text[offsets[0].0..offsets[0].1], "Hello");
    }

    #[test]
    fn add_bos_prepends_bos_once() {
        let Some(spec) = smollm2_spec() else { return };
        let tok = Tokenizer::from_gguf_spec(GgufTokenizerSpec {
            add_bos: Some(true),
            ..spec
        })
        .expect("tokenizer");
        assert!(tok.add_bos());
        let hi = tok.token_to_id("Hi").expect("Hi is one token");
        assert_eq!(tok.encode("Hi", true).expect("encode"), vec![1, hi]);
        assert_eq!(tok.encode("Hi", false).expect("encode"), vec![hi]);
        // Like HF and llama.cpp, a BOS written in the text is not deduplicated.
        assert_eq!(
            tok.encode("<|im_start|>Hi", true).expect("encode"),
            vec![1, 1, hi]
        );
    }

    #[test]
    fn synthetic_merges_and_added_tokens() {
        let tok = Tokenizer::from_gguf_spec(synthetic_spec()).expect("tokenizer");
        let id = |t: &str| tok.token_to_id(t).expect("token");
        assert_eq!(
            tok.encode("hello world", false).expect("encode"),
            vec![id("hell"), id("o"), id("Ġwor"), id("l"), id("d")]
        );
        let ids = tok.encode("<tool>x<|im_end|>", false).expect("encode");
        assert_eq!(ids, vec![id("<tool>"), id("x"), id("<|im_end|>")]);
        assert!(!tok.is_special(id("<tool>")) && tok.is_special(id("<|im_end|>")));
        // Skipping special tokens keeps user-defined ones.
        assert_eq!(tok.decode(&ids, true).expect("decode"), "<tool>x");
        let rendered = tok.chat_template().expect("template");
        let msgs = [crate::tokenizer::ChatMessage::new("user", "hi")];
        assert_eq!(
            rendered.render(&msgs, None, false, None).expect("render"),
            "<|im_start|>hi"
        );
    }

    #[test]
    fn unsupported_and_invalid_specs_are_errors() {
        let err = Tokenizer::from_gguf_spec(GgufTokenizerSpec {
            pre: Some("falcon".into()),
            ..synthetic_spec()
        })
        .expect_err("unknown pre");
        assert!(err.to_string().contains("\"falcon\""), "{err}");
        let err = Tokenizer::from_gguf_spec(GgufTokenizerSpec {
            model: "llama".into(),
            ..synthetic_spec()
        })
        .expect_err("spm");
        assert!(
            matches!(err, TokenizerError::UnsupportedGguf(_)) && err.to_string().contains("llama")
        );
        let bad_merge = GgufTokenizerSpec {
            merges: vec!["nospace".into()],
            ..synthetic_spec()
        };
        assert!(matches!(
            Tokenizer::from_gguf_spec(bad_merge),
            Err(TokenizerError::InvalidGguf(_))
        ));
        let bad_eos = GgufTokenizerSpec {
            eos_id: Some(1_000_000),
            ..synthetic_spec()
        };
        assert!(matches!(
            Tokenizer::from_gguf_spec(bad_eos),
            Err(TokenizerError::InvalidGguf(_))
        ));
        let bad_types = GgufTokenizerSpec {
            token_types: Some(vec![1]),
            ..synthetic_spec()
        };
        assert!(matches!(
            Tokenizer::from_gguf_spec(bad_types),
            Err(TokenizerError::InvalidGguf(_))
        ));
    }
}
