//! Planning-token detection with Strategic Grams (SGs), the phrase list of the HICRA paper.
//!
//! A token is a planning token when its text overlaps an SG occurrence in its own trajectory
//! (hicra.md section 1). Matching works on a normalised *word sequence*, never on raw substrings:
//! - letters and digits (Unicode) form words, folded to lower case;
//! - apostrophes (`'` and `’`) are dropped, so "Let's" and "Let’s" both read as the paper's
//!   "lets" (the published list had its apostrophes stripped);
//! - whitespace only separates words, so multi-word phrases match across any run of it;
//! - every other character (`,` `?` `-` `#` ...) is a word of its own, because the paper's list
//!   contains phrases such as "wait, but", "double-checking the logic" and "## step" whose
//!   punctuation is part of the intent.
//!
//! Word boundaries come for free: "but" is one word and never matches inside "butter".
//! Phrases are interned to integer ids and indexed by their first word, so `find` costs one
//! hash lookup per text word plus a comparison per candidate phrase: a few hundred phrases over
//! a few thousand characters takes microseconds.

use std::collections::{HashMap, HashSet};

/// The paper's list (Appendix A, Listing 1), one phrase a line.
const PAPER_LIST: &str = include_str!("../../data/strategic_grams.txt");

/// A compiled set of Strategic Grams.
#[derive(Clone, Debug, Default)]
pub struct StrategicGrams {
    /// Normalised word -> id, over the words that occur in some phrase.
    vocab: HashMap<String, u32>,
    /// First word id -> indices into `phrases` starting with it.
    by_first: HashMap<u32, Vec<usize>>,
    phrases: Vec<Phrase>,
}

#[derive(Clone, Debug)]
struct Phrase {
    /// The phrase as written in the list (trimmed), reported in matches.
    text: String,
    /// Its normalised words as vocab ids; never empty.
    words: Vec<u32>,
}

/// One occurrence of a phrase in a text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SgMatch {
    /// Byte offset in the original text where the first matched word starts.
    pub start: usize,
    /// Byte offset in the original text just past the last matched word.
    pub end: usize,
    /// The phrase as written in the list.
    pub phrase: String,
}

impl StrategicGrams {
    /// The paper's 249 phrases, compiled into the binary from `core/data/strategic_grams.txt`.
    pub fn paper() -> Self {
        Self::from_phrases(PAPER_LIST.lines())
    }

    /// The paper's phrases as written in the list.
    pub fn paper_phrases() -> Vec<String> {
        phrases_in(PAPER_LIST)
    }

    /// Builds a set from phrases, one per item.
    ///
    /// Blank items and comments are skipped. A comment is a line that is `#` alone or starts
    /// with `# ` (hash, space): the paper's list contains the phrase "## step", which a plain
    /// "starts with #" rule would throw away. Phrases that normalise to the same word sequence
    /// (e.g. "let's" and "lets") are kept once, under the first spelling.
    pub fn from_phrases<I: IntoIterator<Item = S>, S: AsRef<str>>(phrases: I) -> Self {
        let mut set = StrategicGrams::default();
        let mut seen: HashSet<Vec<u32>> = HashSet::new();
        for line in phrases {
            let text = line.as_ref().trim();
            if !is_phrase(text) {
                continue;
            }
            let mut words = Vec::new();
            let vocab = &mut set.vocab;
            for_each_word(text, |_, _, word| {
                let next = vocab.len() as u32;
                words.push(*vocab.entry(word.to_owned()).or_insert(next));
            });
            if words.is_empty() || !seen.insert(words.clone()) {
                continue;
            }
            set.by_first.entry(words[0]).or_default().push(set.phrases.len());
            set.phrases.push(Phrase { text: text.to_owned(), words });
        }
        set
    }

    /// Number of distinct phrases.
    pub fn len(&self) -> usize {
        self.phrases.len()
    }

    /// True when the set has no phrases (every mask is then all-false).
    pub fn is_empty(&self) -> bool {
        self.phrases.is_empty()
    }

    /// Every phrase occurrence in `text`, ordered by start offset.
    ///
    /// Matching is case-folded, ignores apostrophes and respects word boundaries (see the module
    /// doc). Spans are byte offsets into the original `text`, always on char boundaries.
    /// Overlapping and nested matches ("but" inside "but wait") are all reported: for masks the
    /// union is what counts, and for semantic-entropy metrics each phrase occurrence matters.
    pub fn find(&self, text: &str) -> Vec<SgMatch> {
        if self.phrases.is_empty() {
            return Vec::new();
        }
        // (start, end, id); `None` for words that occur in no phrase, which breaks any match.
        let mut words: Vec<(usize, usize, Option<u32>)> = Vec::new();
        for_each_word(text, |start, end, word| words.push((start, end, self.vocab.get(word).copied())));
        let mut out = Vec::new();
        for (i, &(start, _, id)) in words.iter().enumerate() {
            let Some(candidates) = id.and_then(|id| self.by_first.get(&id)) else {
                continue;
            };
            for &p in candidates {
                let phrase = &self.phrases[p];
                let n = phrase.words.len();
                let Some(window) = words.get(i..i + n) else {
                    continue;
                };
                if window.iter().zip(&phrase.words).all(|(w, &pid)| w.2 == Some(pid)) {
                    out.push(SgMatch { start, end: window[n - 1].1, phrase: phrase.text.clone() });
                }
            }
        }
        out
    }

    /// Planning mask over tokens: token `i` is planning when its byte span `[start, end)`
    /// overlaps any match span. `token_spans` are byte offsets of each token's text in `text`;
    /// empty spans (special tokens, tokens that decode to nothing) are never planning. Spans need
    /// not be sorted, and out-of-range spans are simply compared, never used to index `text`.
    pub fn token_mask(&self, text: &str, token_spans: &[(usize, usize)]) -> Vec<bool> {
        let merged = merge_spans(self.find(text).into_iter().map(|m| (m.start, m.end)).collect());
        token_spans
            .iter()
            .map(|&(start, end)| {
                if start >= end {
                    return false;
                }
                // First merged interval ending after the token's start; it overlaps iff it
                // starts before the token's end.
                let k = merged.partition_point(|&(_, e)| e <= start);
                merged.get(k).is_some_and(|&(s, _)| s < end)
            })
            .collect()
    }
}

/// Whether a trimmed line of a phrase file is a phrase (not blank, not a `# ` comment; see
/// [`StrategicGrams::from_phrases`]).
fn is_phrase(line: &str) -> bool {
    !line.is_empty() && line != "#" && !line.starts_with("# ")
}

/// The phrases of a phrase file (one per line), trimmed, without blanks and comments.
pub fn phrases_in(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| is_phrase(l)).map(str::to_string).collect()
}

/// Shannon entropy (nats) of the frequency distribution of Strategic Grams over a batch of
/// generations: the paper's "semantic entropy"; rising means more diverse strategies.
pub fn semantic_entropy<'a>(counts: impl IntoIterator<Item = &'a usize>) -> f64 {
    let counts: Vec<f64> = counts.into_iter().map(|&c| c as f64).filter(|&c| c > 0.0).collect();
    let total: f64 = counts.iter().sum();
    if total == 0.0 {
        return 0.0;
    }
    counts.iter().map(|c| -(c / total) * (c / total).ln()).sum()
}

/// Byte spans of each piece within the concatenation of `pieces` (for callers that decode
/// tokens one at a time, e.g. incremental detokenisation, and match on the joined text).
pub fn spans_from_pieces(pieces: &[&str]) -> Vec<(usize, usize)> {
    let mut offset = 0;
    pieces
        .iter()
        .map(|p| {
            let span = (offset, offset + p.len());
            offset += p.len();
            span
        })
        .collect()
}

fn is_apostrophe(c: char) -> bool {
    c == '\'' || c == '\u{2019}'
}

/// Calls `emit(start, end, normalised_word)` for each word of `text` (rules in the module doc).
/// One buffer is reused for all words, so tokenising a text allocates only as it grows.
pub(crate) fn for_each_word(text: &str, mut emit: impl FnMut(usize, usize, &str)) {
    let mut buf = String::new();
    // Start and end (byte offsets) of the word being built, if any.
    let mut current: Option<(usize, usize)> = None;
    for (i, c) in text.char_indices() {
        let end = i + c.len_utf8();
        if c.is_alphanumeric() {
            buf.extend(c.to_lowercase());
            current = Some((current.map_or(i, |(s, _)| s), end));
        } else if is_apostrophe(c) {
            // Inside a word the apostrophe joins it ("let's" -> "lets"); elsewhere it vanishes.
            if let Some((s, _)) = current {
                current = Some((s, end));
            }
        } else {
            if let Some((s, e)) = current.take() {
                emit(s, e, &buf);
                buf.clear();
            }
            if !c.is_whitespace() {
                buf.extend(c.to_lowercase());
                emit(i, end, &buf);
                buf.clear();
            }
        }
    }
    if let Some((s, e)) = current {
        emit(s, e, &buf);
    }
}

/// Sorts spans and merges overlapping or touching ones.
fn merge_spans(mut spans: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    spans.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
    for (s, e) in spans {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(set: &StrategicGrams, text: &str) -> Vec<(String, String)> {
        set.find(text).into_iter().map(|m| (text[m.start..m.end].to_owned(), m.phrase)).collect()
    }

    #[test]
    fn paper_list_has_249_phrases() {
        let set = StrategicGrams::paper();
        assert_eq!(set.len(), 249);
        // "## step" is a phrase, not a comment.
        assert_eq!(spans(&set, "## Step 1")[0].1, "## step");
    }

    #[test]
    fn multi_word_phrase_with_apostrophes_and_case() {
        let set = StrategicGrams::from_phrases(["lets try a different approach"]);
        for text in ["Let's try a different approach.", "LET’S TRY a\n  different\tapproach"] {
            let got = spans(&set, text);
            assert_eq!(got.len(), 1, "{text}");
            assert!(got[0].0.starts_with("Let") || got[0].0.starts_with("LET"));
            assert!(got[0].0.ends_with("approach"));
        }
        // Punctuation between the words breaks the phrase.
        assert!(set.find("lets try, a different approach").is_empty());
    }

    #[test]
    fn word_boundaries() {
        let set = StrategicGrams::from_phrases(["but", "check if"]);
        assert!(set.find("butter and rebut; checking iffy").is_empty());
        assert_eq!(spans(&set, "(but)").len(), 1);
        assert_eq!(spans(&set, "x but1").len(), 0);
        assert_eq!(spans(&set, "Check  if it holds")[0].0, "Check  if");
    }

    #[test]
    fn overlapping_phrases_all_reported() {
        let set = StrategicGrams::from_phrases(["but", "but wait", "wait", "wait, but"]);
        let text = "Hmm wait, but wait";
        let got = spans(&set, text);
        let expect = [
            ("wait", "wait"),
            ("wait, but", "wait, but"),
            ("but", "but"),
            ("but wait", "but wait"),
            ("wait", "wait"),
        ];
        let expect: Vec<(String, String)> =
            expect.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn unicode_text_around_and_inside() {
        let set = StrategicGrams::from_phrases(["the key insight is", "étape"]);
        let text = "数学 — the KEY insight is ε → 0; Étape suivante";
        let got = set.find(text);
        assert_eq!(got.len(), 2);
        assert_eq!(&text[got[0].start..got[0].end], "the KEY insight is");
        assert_eq!(&text[got[1].start..got[1].end], "Étape");
    }

    #[test]
    fn comments_blank_lines_and_duplicates() {
        let set = StrategicGrams::from_phrases(["# a comment", "", "   ", "#", "let's", "Lets", "wait"]);
        assert_eq!(set.len(), 2);
        assert!(StrategicGrams::from_phrases(Vec::<String>::new()).is_empty());
    }

    #[test]
    fn mask_marks_tokens_overlapping_a_phrase() {
        let set = StrategicGrams::from_phrases(["but wait"]);
        // Tokens: "So" | " bu" | "t wa" | "it" | "," | " 2" | <eos>; the phrase spans bytes 3..11.
        let pieces = ["So", " bu", "t wa", "it", ",", " 2", ""];
        let text = pieces.concat();
        let token_spans = spans_from_pieces(&pieces);
        assert_eq!(token_spans, vec![(0, 2), (2, 5), (5, 9), (9, 11), (11, 12), (12, 14), (14, 14)]);
        let mask = set.token_mask(&text, &token_spans);
        assert_eq!(mask, vec![false, true, true, true, false, false, false]);
    }

    #[test]
    fn mask_handles_unsorted_and_out_of_range_spans() {
        let set = StrategicGrams::from_phrases(["wait"]);
        let mask = set.token_mask("ok wait", &[(3, 7), (0, 2), (100, 200), (5, 5)]);
        assert_eq!(mask, vec![true, false, false, false]);
    }

    #[test]
    fn empty_text() {
        let set = StrategicGrams::paper();
        assert!(set.find("").is_empty());
        assert!(set.token_mask("", &[]).is_empty());
        assert!(spans_from_pieces(&[]).is_empty());
    }

    #[test]
    fn semantic_entropy_of_sg_frequencies() {
        assert_eq!(semantic_entropy(&[]), 0.0);
        assert_eq!(semantic_entropy(&[5]), 0.0);
        assert!((semantic_entropy(&[3, 3]) - std::f64::consts::LN_2).abs() < 1e-12);
        // p = (1/4, 3/4): -(0.25 ln 0.25 + 0.75 ln 0.75)
        let expected = -(0.25f64 * 0.25f64.ln() + 0.75 * 0.75f64.ln());
        assert!((semantic_entropy(&[1, 3, 0]) - expected).abs() < 1e-12);
    }
}
