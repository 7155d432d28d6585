//! Word problems of graded difficulty: the procedural task of `DataConfig::WordProblems`.
//!
//! A person starts with some items and then a number of things happen, one sentence each:
//!
//! > Maya has 7 marbles. She buys 5 more marbles. Then she gives 3 marbles to a friend.
//! > How many marbles does Maya have now?
//!
//! The number of events is the difficulty. Numbers are small (a start of 2 to 9, changes of 1 to
//! 5, at most 3 boxes of 4) so no step needs more than one-digit arithmetic and the answer is
//! never negative; what grows with the difficulty is the bookkeeping, which is what a small
//! model fails at first and what planning ("first..., then..., so...") helps with.

use super::{splitmix, DataError, Example};

const PEOPLE: [(&str, &str); 12] = [
    ("Maya", "She"), ("Tom", "He"), ("Lena", "She"), ("Omar", "He"), ("Sofia", "She"), ("Ben", "He"),
    ("Aisha", "She"), ("Leo", "He"), ("Nina", "She"), ("Ravi", "He"), ("Emma", "She"), ("Jack", "He"),
];
const ITEMS: [&str; 10] = ["marbles", "apples", "stickers", "books", "pencils", "coins", "cookies", "stamps", "shells", "cards"];
const FRIENDS: [&str; 6] = ["a friend", "a cousin", "a neighbour", "the teacher", "a classmate", "the librarian"];

/// `count` problems with 1 to `max_steps` events each, drawn from `seed`.
pub(super) fn generate(count: usize, max_steps: u32, seed: u64) -> Result<Vec<Example>, DataError> {
    if !(1..=6).contains(&max_steps) {
        return Err(DataError::Parameters(format!("word_problems: max_steps must be 1 to 6 (got {max_steps})")));
    }
    let mut state = seed;
    Ok((0..count).map(|_| problem(&mut state, max_steps)).collect())
}

fn pick<'a, T>(state: &mut u64, from: &'a [T]) -> &'a T {
    &from[(splitmix(state) % from.len() as u64) as usize]
}

fn between(state: &mut u64, low: i64, high: i64) -> i64 {
    low + (splitmix(state) % (high - low + 1) as u64) as i64
}

fn problem(state: &mut u64, max_steps: u32) -> Example {
    let (name, pronoun) = *pick(state, &PEOPLE);
    let item = *pick(state, &ITEMS);
    let steps = between(state, 1, max_steps as i64);
    let mut have = between(state, 2, 9);
    let mut text = format!("{name} has {have} {item}.");
    for i in 0..steps {
        let then = if i == 0 { "" } else { "Then " };
        let subject = if i == 0 { pronoun.to_string() } else { pronoun.to_lowercase() };
        let sentence = match splitmix(state) % 3 {
            // Giving away needs something to give; otherwise the event is a purchase.
            0 if have >= 2 => {
                let n = between(state, 1, (have - 1).min(5));
                have -= n;
                format!("{subject} gives {n} {item} to {}.", pick(state, &FRIENDS))
            }
            2 => {
                let (boxes, each) = (between(state, 2, 3), between(state, 2, 4));
                have += boxes * each;
                format!("{subject} gets {boxes} boxes with {each} {item} in each box.")
            }
            _ => {
                let n = between(state, 1, 5);
                have += n;
                format!("{subject} buys {n} more {item}.")
            }
        };
        text.push(' ');
        text.push_str(then);
        text.push_str(&sentence);
    }
    text.push_str(&format!(" How many {item} does {name} have now?"));
    Example { prompt: text, answer: have.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Solves a generated problem from its text alone: the answer must follow from the words.
    fn solve(prompt: &str) -> i64 {
        let numbers = |s: &str| s.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse::<i64>().ok()).collect::<Vec<_>>();
        let mut have = 0;
        for sentence in prompt.split(". ").map(|s| s.trim_end_matches('.')) {
            let n = numbers(sentence);
            if sentence.contains(" has ") && !sentence.starts_with("How") {
                have = n[0];
            } else if sentence.contains(" gives ") {
                have -= n[0];
            } else if sentence.contains(" boxes with ") {
                have += n[0] * n[1];
            } else if sentence.contains(" buys ") {
                have += n[0];
            }
        }
        have
    }

    #[test]
    fn answers_follow_from_the_text_at_every_difficulty() {
        let problems = generate(600, 4, 7).unwrap_or_default();
        assert_eq!(problems.len(), 600);
        let mut by_events = [0usize; 5];
        for p in &problems {
            assert_eq!(p.answer, solve(&p.prompt).to_string(), "{}", p.prompt);
            let value: i64 = p.answer.parse().unwrap_or(-1);
            // At most 9 + 4 events of at most 12 each.
            assert!((1..=9 + 4 * 12).contains(&value), "{}", p.prompt);
            by_events[(p.prompt.matches(". ").count() - 1).min(4)] += 1;
        }
        // Uniform difficulty: each of the 4 levels holds about a quarter.
        for (level, n) in by_events.iter().enumerate().skip(1) {
            assert!((100..=200).contains(n), "level {level}: {n} of 600");
        }
    }

    #[test]
    fn the_seed_fixes_the_problems() {
        let a = generate(20, 3, 1).unwrap_or_default();
        assert_eq!(a, generate(20, 3, 1).unwrap_or_default());
        assert_ne!(a, generate(20, 3, 2).unwrap_or_default());
    }

    #[test]
    fn out_of_range_difficulty_is_refused_by_name() {
        let err = generate(5, 0, 1).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("max_steps"), "{err}");
    }
}
