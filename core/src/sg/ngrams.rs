//! Word n-grams of a solution, in the words the Strategic-Gram matcher uses
//! ([`crate::train::planning`]): letters and digits form words, case folded, apostrophes
//! dropped ("Let's" -> "lets"), and every other visible character is a word of its own
//! (`x = 2` is three words, "wait, but" is three). Sentence ends (`.` `!` `?` `;` and line
//! breaks) end a segment, so no n-gram spans two sentences; mined phrases therefore match
//! back in text exactly as the paper's list does.
//!
//! Also the count-min sketch that bounds memory while counting document frequencies of
//! millions of distinct n-grams.

use crate::train::planning::for_each_word;

/// Words that end a sentence-like segment (and are not part of any n-gram).
const SEGMENT_ENDS: [&str; 4] = [".", "!", "?", ";"];

/// A word of a segment, without its text: the hash of its normalised form, what kind of word
/// it is, and where it is in the original text (to spell it out only when needed).
#[derive(Clone, Copy, Debug)]
pub struct Word {
    /// Hash of the normalised word.
    hash: u64,
    /// Has a letter or a digit (n-grams start and end with such words).
    alphanumeric: bool,
    /// Has a letter (counts toward `min_words`).
    letter: bool,
    /// Byte span in the original text.
    start: usize,
    end: usize,
}

/// FNV-1a, then a SplitMix64 finaliser: a fast, stable 64-bit hash of a word.
fn hash_word(word: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in word.bytes() {
        h = (h ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The word segments of `text` (rules in the module docs). Allocates per segment, not per word.
pub fn word_segments(text: &str) -> Vec<Vec<Word>> {
    let mut segments = Vec::new();
    let mut current: Vec<Word> = Vec::new();
    let mut previous_end = 0;
    for_each_word(text, |start, end, word| {
        let line_break = text.get(previous_end..start).is_some_and(|gap| gap.contains('\n'));
        previous_end = end;
        let ends_segment = SEGMENT_ENDS.contains(&word);
        if (line_break || ends_segment) && !current.is_empty() {
            segments.push(std::mem::take(&mut current));
        }
        if !ends_segment {
            let alphanumeric = word.chars().any(char::is_alphanumeric);
            current.push(Word { hash: hash_word(word), alphanumeric, letter: alphanumeric && word.chars().any(char::is_alphabetic), start, end });
        }
    });
    if !current.is_empty() {
        segments.push(current);
    }
    segments
}

/// The normalised words of `window`, spelled out from `text`.
pub fn spell(text: &str, window: &[Word]) -> Vec<String> {
    window
        .iter()
        .map(|w| {
            let mut word = String::new();
            for_each_word(text.get(w.start..w.end).unwrap_or_default(), |_, _, normalised| word.push_str(normalised));
            word
        })
        .collect()
}

/// Words with a letter in `window`.
pub fn letter_words(window: &[Word]) -> usize {
    window.iter().filter(|w| w.letter).count()
}

/// The normalised word segments of `text`, spelled out.
pub fn segments(text: &str) -> Vec<Vec<String>> {
    word_segments(text).iter().map(|segment| spell(text, segment)).collect()
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

/// Calls `visit(words, hash)` for every n-gram with `n` in `sizes` that starts and ends with a
/// word or number (", that is" is not a phrase), in order of appearance. The hash depends on
/// the words and their order only.
pub fn for_each_ngram(segments: &[Vec<Word>], sizes: std::ops::RangeInclusive<usize>, mut visit: impl FnMut(&[Word], u64)) {
    for segment in segments {
        for n in sizes.clone() {
            if n == 0 || n > segment.len() {
                continue;
            }
            for window in segment.windows(n) {
                let edges_are_words = window.first().is_some_and(|w| w.alphanumeric) && window.last().is_some_and(|w| w.alphanumeric);
                if edges_are_words {
                    let hash = window.iter().fold(mix(0x9E37_79B9_7F4A_7C15 ^ n as u64), |h, w| mix(h ^ w.hash));
                    visit(window, hash);
                }
            }
        }
    }
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
        let text = "a b c d. e f g, h";
        for_each_ngram(&word_segments(text), 3..=4, |g, _| seen.push(spell(text, g).join(" ")));
        assert_eq!(seen, vec!["a b c", "b c d", "a b c d", "e f g", "g , h", "f g , h"]);
    }

    #[test]
    fn ngram_hashes_depend_on_the_words_only() {
        let hashes = |text: &str| {
            let mut out = Vec::new();
            for_each_ngram(&word_segments(text), 3..=3, |_, h| out.push(h));
            out
        };
        // Same words, different case, apostrophes and spacing: same hashes; reordered: different.
        assert_eq!(hashes("Let's try  AGAIN now"), hashes("lets try again now"));
        assert_ne!(hashes("try lets again"), hashes("lets try again"));
        // An n-gram of the same words at another size differs.
        assert_ne!(hashes("a b c")[0], { let mut h = 0; for_each_ngram(&word_segments("a b c"), 2..=2, |_, x| h = x); h });
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
