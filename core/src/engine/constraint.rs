//! Constrained decoding: a grammar decides, token by token, which tokens may come next.
//!
//! The grammar engine is llguidance (what llama.cpp, vLLM and SGLang use): a [`Constraint`]
//! (JSON object, JSON schema, regex or Lark grammar) compiles into a [`ConstraintMatcher`]
//! per sequence, which answers the set of allowed next tokens as a bitmask and follows the
//! tokens actually sampled. The sampler turns the bitmask into `-inf` logits on the device
//! ([`super::logits`]); the trainer replays the same matcher over a rollout's tokens, so a
//! constrained rollout is trained under the distribution it was drawn from.
//!
//! [`Constraints`] holds what every matcher of one tokenizer shares: the token trie (every
//! token's bytes), built on first use because most servers never need it.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::tokenizer::{TokenBytes, Tokenizer};

/// What a sequence's output must match, as the request asked for it. Recorded with the
/// rollout: it is part of the behaviour policy.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Constraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against this schema (`response_format: {"type": "json_schema"}`).
    JsonSchema {
        /// The JSON Schema.
        schema: Value,
    },
    /// Text matching this regular expression (vLLM's `guided_regex`).
    Regex {
        /// The pattern, matched against the whole output.
        pattern: String,
    },
    /// Text of this Lark grammar, in llguidance's dialect (vLLM's `guided_grammar`; also how
    /// forced tool calls are expressed).
    Lark {
        /// The grammar's source.
        grammar: String,
    },
}

/// `schema` with JSON written on one line, `", "` and `": "` between items (as Python's
/// `json.dumps` writes it), unless the schema sets its own `x-guidance` options. llguidance's
/// default lets whitespace run freely, and small models spend their tokens on it.
pub fn with_compact_whitespace(mut schema: Value) -> Value {
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
    }
    schema
}

impl Constraint {
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            Self::JsonObject => TopLevelGrammar::from_json_schema(with_compact_whitespace(serde_json::json!({"type": "object"}))),
            Self::JsonSchema { schema } => TopLevelGrammar::from_json_schema(with_compact_whitespace(schema.clone())),
            Self::Regex { pattern } => TopLevelGrammar::from_regex(pattern),
            Self::Lark { grammar } => TopLevelGrammar::from_lark(grammar.clone()),
        }
    }
}

/// Why a constraint could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    /// The schema, pattern or grammar does not compile; the message names the problem.
    #[error("{0}")]
    Invalid(String),
    /// The tokenizer's vocabulary could not be mapped to bytes.
    #[error("constrained decoding is unavailable for this tokenizer: {0}")]
    Vocabulary(String),
    /// A token the grammar does not allow was fed to the matcher.
    #[error("token {token} is not allowed here by the constraint: {reason}")]
    Rejected {
        /// The token.
        token: u32,
        /// llguidance's explanation.
        reason: String,
    },
}

/// Compiles constraints for one tokenizer and vocabulary size.
pub struct Constraints {
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
}

impl std::fmt::Debug for Constraints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraints").field("vocab_size", &self.vocab_size).field("ready", &self.factory.get().is_some()).finish()
    }
}

impl Constraints {
    /// Constraints over `vocab_size` logits (the model's, which may exceed the tokenizer's:
    /// the extra ids are never allowed).
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Self {
        Self { tokenizer, vocab_size, factory: OnceLock::new() }
    }

    /// A matcher at the start of `constraint`'s output; an invalid schema, pattern or grammar
    /// is an [`ConstraintError::Invalid`] naming the problem.
    pub fn matcher(&self, constraint: &Constraint) -> Result<ConstraintMatcher, ConstraintError> {
        let factory = self.factory()?;
        let parser = factory.create_parser(constraint.grammar()).map_err(|e| ConstraintError::Invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(err) = matcher.get_error() {
            return Err(ConstraintError::Invalid(err));
        }
        Ok(ConstraintMatcher { matcher, eos: self.tokenizer.eos_ids().to_vec(), words: self.vocab_size.div_ceil(32) })
    }

    fn factory(&self) -> Result<&Arc<ParserFactory>, ConstraintError> {
        self.factory
            .get_or_init(|| {
                let env = TrieEnv::new(self.tokenizer.clone(), self.vocab_size)?;
                let env: TokEnv = Arc::new(env);
                let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                factory.quiet();
                Ok(Arc::new(factory))
            })
            .as_ref()
            .map_err(|e| ConstraintError::Vocabulary(e.clone()))
    }
}

/// One sequence's position in its grammar.
pub struct ConstraintMatcher {
    matcher: Matcher,
    /// The tokenizer's end-of-sequence ids: allowed once the grammar is complete.
    eos: Vec<u32>,
    /// Mask length in 32-bit words.
    words: usize,
}

impl std::fmt::Debug for ConstraintMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintMatcher").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl ConstraintMatcher {
    /// The tokens allowed next: bit `i % 32` of word `i / 32` is set for allowed id `i`.
    /// Once the output is complete only end-of-sequence remains.
    pub fn allowed(&mut self) -> Result<Vec<u32>, ConstraintError> {
        let mask = self.matcher.compute_mask_or_eos().map_err(|e| ConstraintError::Invalid(e.to_string()))?;
        let mut words = vec![0u32; self.words];
        let bits = mask.as_slice();
        let n = words.len().min(bits.len());
        words[..n].copy_from_slice(&bits[..n]);
        // The grammar's own end allows its EOS token; every end-of-sequence id of the
        // tokenizer ends the sequence alike.
        if self.eos.iter().any(|&e| is_set(&words, e)) {
            for &e in &self.eos {
                set(&mut words, e);
            }
        }
        Ok(words)
    }

    /// [`ConstraintMatcher::allowed`], or only end-of-sequence when the grammar failed (one of
    /// llguidance's limits, a rejected token) or allows nothing: the output ends there
    /// instead of failing the batch it decodes in. Deterministic, so the trainer's replay
    /// sees the same mask.
    pub fn allowed_or_end(&mut self) -> Vec<u32> {
        match self.allowed() {
            Ok(words) if words.iter().any(|&w| w != 0) => return words,
            Ok(_) => tracing::warn!("a constraint allows no token here; ending the output"),
            Err(err) => tracing::warn!(%err, "a constraint failed; ending the output"),
        }
        let mut words = vec![0u32; self.words];
        for &e in &self.eos {
            set(&mut words, e);
        }
        words
    }

    /// Follows a sampled token. End-of-sequence ids end the output and are not fed.
    pub fn advance(&mut self, token: u32) -> Result<(), ConstraintError> {
        if self.eos.contains(&token) || self.matcher.is_stopped() {
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| ConstraintError::Rejected { token, reason: e.to_string() })
    }
}

fn is_set(words: &[u32], id: u32) -> bool {
    words.get(id as usize / 32).is_some_and(|w| w >> (id % 32) & 1 == 1)
}

fn set(words: &mut [u32], id: u32) {
    if let Some(w) = words.get_mut(id as usize / 32) {
        *w |= 1 << (id % 32);
    }
}

/// The tokenizer as llguidance sees it: every id's bytes in a trie, and tokenization for the
/// text a grammar forces.
struct TrieEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TrieEnv {
    fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Result<Self, String> {
        let table = tokenizer.token_bytes().map_err(|e| e.to_string())?;
        if table.len() > vocab_size {
            return Err(format!("the tokenizer has {} tokens but the model only {vocab_size} logits", table.len()));
        }
        // Special tokens carry llguidance's marker byte so that text never produces them;
        // ids the tokenizer lacks (padding of the embedding) become unreachable specials.
        let words: Vec<Vec<u8>> = (0..vocab_size)
            .map(|id| match table.get(id) {
                Some(TokenBytes::Text(bytes)) => bytes.clone(),
                Some(TokenBytes::Special(name)) => [&[TokTrie::SPECIAL_TOKEN_MARKER], name.as_bytes()].concat(),
                Some(TokenBytes::Missing) | None => [&[TokTrie::SPECIAL_TOKEN_MARKER], format!("<[{id}]>").as_bytes()].concat(),
            })
            .collect();
        let eos = tokenizer.eos_ids().to_vec();
        let first_eos = eos.first().copied().ok_or("the tokenizer has no end-of-sequence token")?;
        let mut info = TokRxInfo::new(vocab_size as u32, first_eos);
        info.tok_bos = tokenizer.bos_id();
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(&eos);
        }
        Ok(Self { trie, tokenizer })
    }
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| self.tokenizer.encode(text, false).unwrap_or_else(|_| self.trie.greedy_tokenize(text.as_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed_ids(words: &[u32], vocab: usize) -> Vec<u32> {
        (0..vocab as u32).filter(|&i| is_set(words, i)).collect()
    }

    /// Walks a matcher by always taking the lowest allowed id that is not end-of-sequence,
    /// until only end-of-sequence is left; returns the text.
    fn walk(tok: &Tokenizer, matcher: &mut ConstraintMatcher, vocab: usize, limit: usize) -> String {
        let mut ids = Vec::new();
        for _ in 0..limit {
            let allowed = allowed_ids(&matcher.allowed().expect("mask"), vocab);
            let Some(&next) = allowed.iter().find(|id| !tok.eos_ids().contains(id)) else { break };
            matcher.advance(next).expect("advance");
            ids.push(next);
        }
        tok.decode(&ids, true).expect("decode")
    }

    #[test]
    fn a_json_schema_mask_only_allows_text_that_stays_valid() {
        let Some(tok) = crate::tokenizer::default_model_tokenizer() else { return };
        let vocab = 49_152;
        let constraints = Constraints::new(tok.clone(), vocab);
        let schema = serde_json::json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": false});
        let mut matcher = constraints.matcher(&Constraint::JsonSchema { schema }).expect("compiles");
        let first = allowed_ids(&matcher.allowed().expect("mask"), vocab);
        assert!(!first.is_empty());
        for id in &first {
            let text = tok.decode(&[*id], false).expect("decode");
            assert!(text.trim_start().is_empty() || text.trim_start().starts_with('{'), "token {id} ({text:?}) cannot start the object");
        }
        let text = walk(&tok, &mut matcher, vocab, 40);
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
        // The lowest-id walk writes `-0`: an integer by JSON Schema, a float to serde_json.
        assert!(value["n"].as_f64().is_some_and(|n| n.fract() == 0.0), "{text}");
        // Complete: only end-of-sequence is left.
        let rest = allowed_ids(&matcher.allowed().expect("mask"), vocab);
        assert!(!rest.is_empty() && rest.iter().all(|id| tok.eos_ids().contains(id)), "{rest:?}");
    }

    #[test]
    fn a_failed_grammar_ends_the_output_instead_of_failing() {
        let Some(tok) = crate::tokenizer::default_model_tokenizer() else { return };
        let vocab = 49_152;
        let constraints = Constraints::new(tok.clone(), vocab);
        let mut matcher = constraints.matcher(&Constraint::Regex { pattern: "[0-9]+".into() }).expect("compiles");
        let letter = tok.encode("a", false).expect("encode")[0];
        assert!(matcher.advance(letter).is_err());
        let allowed = allowed_ids(&matcher.allowed_or_end(), vocab);
        assert_eq!(allowed, tok.eos_ids().iter().copied().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn a_token_outside_the_grammar_is_rejected_by_name() {
        let Some(tok) = crate::tokenizer::default_model_tokenizer() else { return };
        let constraints = Constraints::new(tok.clone(), 49_152);
        let mut matcher = constraints.matcher(&Constraint::Regex { pattern: "[0-9]+".into() }).expect("compiles");
        let letter = tok.encode("a", false).expect("encode")[0];
        let err = matcher.advance(letter).expect_err("a letter is not a digit");
        assert!(err.to_string().contains(&format!("token {letter}")), "{err}");
    }

    #[test]
    fn invalid_constraints_are_errors_that_name_the_problem() {
        let Some(tok) = crate::tokenizer::default_model_tokenizer() else { return };
        let constraints = Constraints::new(tok, 49_152);
        let bad_schema = Constraint::JsonSchema { schema: serde_json::json!({"type": "object", "properties": {"a": {"type": "no-such-type"}}}) };
        let err = constraints.matcher(&bad_schema).expect_err("unknown type");
        assert!(matches!(err, ConstraintError::Invalid(_)), "{err}");
        assert!(err.to_string().contains("no-such-type"), "{err}");
        let err = constraints.matcher(&Constraint::Lark { grammar: "start: foo".into() }).expect_err("undefined rule");
        assert!(err.to_string().contains("foo"), "{err}");
    }
}
