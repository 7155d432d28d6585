//! Word n-grams of a solution, in the words the Strategic-Gram matcher uses
//! ([`crate::train::planning`]): letters and digits form words, case folded, apostrophes
//! dropped ("Let's" -> "lets"), and every other visible character is a word of its own
//! (`x = 2` is three words, "wait, but" is three). Sentence ends (`.` `!` `?` `;` and line
//! breaks) end a segment, so no n-gram spans two sentences; mined phrases therefore match
//! back in text exactly as the paper's list does.
//!
//! Also the count-min sketch that bounds memory while counting document frequencies of
//! millions of distinct n-grams.

use std::hash::{Hash, Hasher};

use crate::train::planning::for_each_word;

/// Words that end a sentence-like segment (and are not part of any n-gram).
const SEGMENT_ENDS: [&str; 4] = [".", "!", "?", ";"];

/// The normalised word segments of `text`.
pub fn segments(text: &str) -> Vec<Vec<String>> {
    let mut segments = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut previous_end = 0;
    for_each_word(text, |start, end, word| {
        let line_break = text.get(previous_end..start).is_some_and(|gap| gap.contains('\n'));
        previous_end = end;
        if (line_break || SEGMENT_ENDS.contains(&word)) && !current.is_empty() {
            segments.push(std::mem::take(&mut current));
        }
        if !SEGMENT_ENDS.contains(&word) {
            current.push(word.to_string());
        }
    });
    if !current.is_empty() {
        segments.push(current);
    }
    segments
}

/// An n-gram as a phrase: words joined by spaces, without a space before punctuation
/// ("wait, let me"); the matcher reads it back as the same words.
pub fn phrase(tokens: &[String]) -> String {
    let mut out = String::new();
    for (i, token) in tokens.iter().enumerate() {
        let punctuation = token.chars().all(|c| !c.is_alphanumeric()) && !matches!(token.as_str(), "=" | "+" | "-" | "*" | "/" | "^" | "<" | ">");
        if i > 0 && !punctuation {
            out.push(' ');
        }
        out.push_str(token);
    }
    out
}

/// A stable 64-bit hash of an n-gram (the same in every run and on every machine).
pub fn hash_ngram(tokens: &[String]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    tokens.hash(&mut hasher);
    hasher.finish()
}

/// Calls `visit(tokens)` for every n-gram with `n` in `sizes` that starts and ends with a word
/// or number (", that is" is not a phrase), in order of appearance.
pub fn for_each_ngram(segments: &[Vec<String>], sizes: std::ops::RangeInclusive<usize>, mut visit: impl FnMut(&[String])) {
    for segment in segments {
        for n in sizes.clone() {
            if n == 0 || n > segment.len() {
                continue;
            }
            for window in segment.windows(n) {
                if window.first().is_some_and(|t| is_alphanumeric(t)) && window.last().is_some_and(|t| is_alphanumeric(t)) {
                    visit(window);
                }
            }
        }
    }
}

fn is_alphanumeric(token: &str) -> bool {
    token.chars().any(char::is_alphanumeric)
}

/// Whether a token is a word (has a letter) rather than a number or symbol.
pub fn is_word(token: &str) -> bool {
    token.chars().any(char::is_alphabetic)
}

/// A count-min sketch of `u32` counters: estimates never undercount, so pruning with
/// `estimate(x) < floor` never drops an n-gram whose true count reaches the floor.
#[derive(Debug)]
pub struct CountMinSketch {
    counters: Vec<u32>,
    width: usize,
    depth: usize,
}

impl CountMinSketch {
    /// `depth` rows of `width` counters (`4 * depth * width` bytes).
    pub fn new(width: usize, depth: usize) -> Self {
        let (width, depth) = (width.max(1), depth.max(1));
        Self { counters: vec![0; width * depth], width, depth }
    }

    /// Row `row`'s counter for `hash` (double hashing: row r probes h1 + r * h2).
    fn cell(&self, row: usize, hash: u64) -> usize {
        let step = hash.rotate_left(32) | 1;
        row * self.width + (hash.wrapping_add((row as u64).wrapping_mul(step)) % self.width as u64) as usize
    }

    /// Counts one more occurrence of `hash`.
    pub fn add(&mut self, hash: u64) {
        for row in 0..self.depth {
            let cell = self.cell(row, hash);
            self.counters[cell] = self.counters[cell].saturating_add(1);
        }
    }

    /// An upper bound of the count of `hash`.
    pub fn estimate(&self, hash: u64) -> u32 {
        (0..self.depth).map(|row| self.counters[self.cell(row, hash)]).min().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_fold_case_and_apostrophes_keep_symbols_and_split_sentences() {
        let got = segments("Let's try: x = 2. But WAIT, it’s 3+4!\nDone");
        let expected: Vec<Vec<&str>> = vec![vec!["lets", "try", ":", "x", "=", "2"], vec!["but", "wait", ",", "its", "3", "+", "4"], vec!["done"]];
        assert_eq!(got, expected);
        assert!(segments("...  \n").is_empty());
        let words: Vec<String> = ["wait", ",", "x", "=", "2"].map(String::from).to_vec();
        assert_eq!(phrase(&words), "wait, x = 2");
    }

    #[test]
    fn ngrams_stay_inside_segments() {
        let mut seen = Vec::new();
        for_each_ngram(&segments("a b c d. e f g, h"), 3..=4, |g| seen.push(g.join(" ")));
        assert_eq!(seen, vec!["a b c", "b c d", "a b c d", "e f g", "g , h", "f g , h"]);
    }

    #[test]
    fn the_sketch_never_undercounts() {
        let mut sketch = CountMinSketch::new(64, 4);
        for i in 0..1000u64 {
            for _ in 0..(i % 5) {
                sketch.add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            }
        }
        for i in 0..1000u64 {
            assert!(sketch.estimate(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) >= (i % 5) as u32);
        }
    }
}
