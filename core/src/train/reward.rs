//! Verifiable rewards: final-answer extraction, answer normalisation and exact-match scoring.
//!
//! These are the built-in reward functions for math-style tasks (GSM8K `#### n`, MATH/AIME
//! `\boxed{...}`), pure string functions that cannot fail: a completion with no recognisable
//! answer scores 0. Normalisation is deliberately conservative (the paper's evaluation uses
//! strict `\boxed{}` matching): it removes notation that never changes the value (`$`, spacing
//! commands, `\left`/`\right`, trailing units in `\text{}`, thousands separators, degree and
//! percent signs, a leading `x =`) and compares numerically when both sides are numbers. It does
//! not attempt symbolic equivalence (`\sqrt{8}` vs `2\sqrt{2}`).

/// Text-style commands whose braced argument is either a unit (dropped when it trails a value)
/// or the answer itself (unwrapped), e.g. `5 \text{ cm}` -> `5`, `\text{(A)}` -> `(A)`.
const TEXT_COMMANDS: [&str; 6] = ["\\textbf", "\\textrm", "\\text", "\\mbox", "\\mathrm", "\\mathbf"];

/// Spacing and sizing commands that never change an answer's value.
const NOISE_COMMANDS: [&str; 5] = ["\\displaystyle", "\\left", "\\right", "\\qquad", "\\quad"];

/// Final answer of a math solution: the content of the LAST `\boxed{...}` or `\fbox{...}`
/// (balanced braces, escaped `\{`/`\}` not counted; `\boxed 5` accepted), else the rest of the
/// line after the last `####` (GSM8K), else `None`. Empty boxes are skipped.
pub fn extract_answer(text: &str) -> Option<String> {
    let mut starts: Vec<(usize, usize)> = Vec::new();
    for cmd in ["\\boxed", "\\fbox"] {
        starts.extend(text.match_indices(cmd).map(|(i, _)| (i, i + cmd.len())));
    }
    starts.sort_unstable();
    for &(_, after) in starts.iter().rev() {
        let rest = &text[after..];
        if rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
            continue; // another command, e.g. `\boxedsymbol`
        }
        let trimmed = rest.trim_start();
        let content = if trimmed.starts_with('{') {
            braced_group(trimmed).map(|(inner, _)| inner)
        } else if trimmed.len() < rest.len() {
            // `\boxed 5`: the argument is the next run up to whitespace or `$`.
            trimmed.split(|c: char| c.is_whitespace() || c == '$').next()
        } else {
            None
        };
        if let Some(c) = content.map(str::trim).filter(|c| !c.is_empty()) {
            return Some(c.to_owned());
        }
    }
    let (_, after) = text.rsplit_once("####")?;
    let line = after.lines().next().unwrap_or("").trim();
    (!line.is_empty()).then(|| line.to_owned())
}

/// Canonical form of an answer for comparison (see the module doc for what is removed).
///
/// `\frac{a}{b}`, `\dfrac`, `\tfrac` become `a/b` (arguments that are not a single number or
/// symbol are parenthesised); a plain number is rewritten in a canonical decimal form
/// (`5.00` -> `5`, `0.50` -> `0.5`), and so are both sides of a numeric fraction.
pub fn normalize_answer(answer: &str) -> String {
    let mut s = answer.trim().replace('\u{2212}', "-").replace("\\$", "").replace('$', "");
    s = strip_text_commands(&s);
    for spacing in ["\\!", "\\,", "\\;", "\\:", "\\ "] {
        s = s.replace(spacing, "");
    }
    s.retain(|c| !c.is_whitespace());
    for cmd in NOISE_COMMANDS {
        s = remove_command(&s, cmd);
    }
    for degree in ["^{\\circ}", "^\\circ", "\\circ", "\u{b0}", "\\%", "%"] {
        s = s.replace(degree, "");
    }
    let s = s.trim_end_matches('.');
    let s = strip_assignment(s);
    let s = remove_thousands_commas(&replace_fracs(s));
    canonical_numbers(&s)
}

/// 1.0 when the completion's final answer equals the reference, else 0.0 (also when no answer
/// is found). Numbers compare within 1e-6 relative (so `3/4` equals `0.75`); anything else
/// compares as normalised strings. A reference that is itself a full solution (`... #### 72`
/// or containing `\boxed{}`) is reduced to its final answer first.
pub fn math_reward(completion: &str, reference: &str) -> f32 {
    let Some(answer) = extract_answer(completion) else {
        return 0.0;
    };
    let reference = extract_answer(reference).unwrap_or_else(|| reference.to_owned());
    let (a, r) = (normalize_answer(&answer), normalize_answer(&reference));
    let equal = match (numeric_value(&a), numeric_value(&r)) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-6 * x.abs().max(y.abs()),
        _ => a == r,
    };
    if equal {
        1.0
    } else {
        0.0
    }
}

/// 1.0 if `pattern` matches anywhere in the completion, else 0.0.
pub fn regex_reward(completion: &str, pattern: &regex::Regex) -> f32 {
    if pattern.is_match(completion) {
        1.0
    } else {
        0.0
    }
}

/// 1.0 when the whole completion equals `expected` after trimming and collapsing every run of
/// whitespace to one space (and folding case unless `case_sensitive`), else 0.0.
///
/// Stands in for a regex reward until the workspace depends on the `regex` crate.
pub fn exact_match_reward(completion: &str, expected: &str, case_sensitive: bool) -> f32 {
    let collapse = |s: &str| {
        let joined = s.split_whitespace().collect::<Vec<_>>().join(" ");
        if case_sensitive {
            joined
        } else {
            joined.to_lowercase()
        }
    };
    if collapse(completion) == collapse(expected) {
        1.0
    } else {
        0.0
    }
}

/// For `s` starting with `{`: the content of the balanced group and the byte offset just past
/// its closing brace. Backslash escapes (`\{`, `\}`) do not count as braces.
fn braced_group(s: &str) -> Option<(&str, usize)> {
    let mut depth = 0usize;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '{' => depth += 1,
            '}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some((&s[1..i], i + 1));
                }
            }
            _ => {}
        }
    }
    None
}

/// Removes `\name` where it is a whole command (not a prefix of a longer one like `\rightarrow`).
fn remove_command(s: &str, name: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(name) {
        let after = &rest[i + name.len()..];
        out.push_str(&rest[..i]);
        if after.starts_with(|c: char| c.is_ascii_alphabetic()) {
            out.push_str(name);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Drops `\text{...}`-style groups that trail a value (units, optionally squared or cubed) and
/// unwraps all others.
fn strip_text_commands(s: &str) -> String {
    let mut s = s.to_owned();
    loop {
        let Some((pos, cmd)) = TEXT_COMMANDS
            .iter()
            .filter_map(|cmd| command_pos(&s, cmd).map(|p| (p, *cmd)))
            .min_by_key(|&(p, _)| p)
        else {
            return s;
        };
        let after = &s[pos + cmd.len()..];
        let body = after.trim_start();
        let group = if body.starts_with('{') { braced_group(body) } else { None };
        let Some((content, len)) = group else {
            // A malformed group: drop the command name so the loop terminates.
            s = format!("{}{}", &s[..pos], after);
            continue;
        };
        let prefix = &s[..pos];
        let suffix = &body[len..];
        let unit_power = matches!(suffix.trim(), "" | "^2" | "^3" | "^{2}" | "^{3}");
        s = if !prefix.trim().is_empty() && unit_power {
            prefix.to_owned()
        } else {
            format!("{prefix}{content}{suffix}")
        };
    }
}

/// Position of a whole-command occurrence of `name` in `s`.
fn command_pos(s: &str, name: &str) -> Option<usize> {
    s.match_indices(name)
        .map(|(i, _)| i)
        .find(|&i| !s[i + name.len()..].starts_with(|c: char| c.is_ascii_alphabetic()))
}

/// `x=3` -> `3`, `x_1=3` -> `3`, `\theta=30` -> `30`: a single variable on the left of the
/// only `=`. Anything else (`y=2x+1` keeps its right side too; `a+b=3` is left alone).
fn strip_assignment(s: &str) -> &str {
    let Some((lhs, rhs)) = s.split_once('=') else {
        return s;
    };
    if rhs.contains('=') || rhs.is_empty() {
        return s;
    }
    let (head, sub) = lhs.split_once('_').unwrap_or((lhs, ""));
    let letter = head.len() == 1 && head.starts_with(|c: char| c.is_ascii_alphabetic());
    let greek =
        head.len() > 1 && head.starts_with('\\') && head[1..].chars().all(|c| c.is_ascii_alphabetic());
    let sub_ok = sub.chars().all(|c| c.is_ascii_alphanumeric() || c == '{' || c == '}');
    if (letter || greek) && sub_ok {
        rhs
    } else {
        s
    }
}

/// Rewrites every `\frac`, `\dfrac`, `\tfrac` (braced or single-token arguments) as `a/b`.
fn replace_fracs(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    loop {
        let next = ["\\dfrac", "\\tfrac", "\\frac"]
            .iter()
            .filter_map(|cmd| rest.find(cmd).map(|i| (i, cmd.len())))
            .min_by_key(|&(i, _)| i);
        let Some((i, len)) = next else { break };
        out.push_str(&rest[..i]);
        let after = &rest[i + len..];
        match frac_arg(after).and_then(|(num, n)| frac_arg(&after[n..]).map(|(den, d)| (num, den, n + d))) {
            Some((num, den, used)) => {
                out.push_str(&wrap(&replace_fracs(num)));
                out.push('/');
                out.push_str(&wrap(&replace_fracs(den)));
                rest = &after[used..];
            }
            None => {
                out.push_str(&rest[i..i + len]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// One `\frac` argument: a braced group, a `\command`, or one character; with bytes consumed.
fn frac_arg(s: &str) -> Option<(&str, usize)> {
    if s.starts_with('{') {
        return braced_group(s);
    }
    if let Some(name) = s.strip_prefix('\\') {
        let n = name.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(name.len());
        return (n > 0).then(|| (&s[..n + 1], n + 1));
    }
    let c = s.chars().next().filter(|c| !matches!(c, '}' | '{'))?;
    Some((&s[..c.len_utf8()], c.len_utf8()))
}

fn wrap(x: &str) -> String {
    if x.chars().all(|c| c.is_alphanumeric() || c == '.') {
        x.to_owned()
    } else {
        format!("({x})")
    }
}

/// `1,234,567` -> `1234567`: a comma is a thousands separator when a digit precedes it and
/// exactly three digits follow (so tuples like `(1,2)` keep theirs).
fn remove_thousands_commas(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let digit = |i: usize| chars.get(i).is_some_and(char::is_ascii_digit);
    chars
        .iter()
        .enumerate()
        .filter(|&(i, &c)| {
            !(c == ','
                && i > 0
                && digit(i - 1)
                && digit(i + 1)
                && digit(i + 2)
                && digit(i + 3)
                && !digit(i + 4))
        })
        .map(|(_, &c)| c)
        .collect()
}

/// A plain decimal number: optional sign, digits with at most one `.`, optional exponent.
/// Hand-checked because `f64::from_str` also accepts `inf` and `NaN`.
fn plain_number(s: &str) -> Option<f64> {
    let body = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e.strip_prefix(['-', '+']).unwrap_or(e))),
        None => (body, None),
    };
    let mantissa_ok = mantissa.chars().any(|c| c.is_ascii_digit())
        && mantissa.chars().all(|c| c.is_ascii_digit() || c == '.')
        && mantissa.matches('.').count() <= 1;
    let exponent_ok = exponent.is_none_or(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()));
    if !(mantissa_ok && exponent_ok) {
        return None;
    }
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

fn canonical(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Rewrites a plain number, or both sides of a numeric `a/b`, canonically; leaves others alone.
fn canonical_numbers(s: &str) -> String {
    if let Some(v) = plain_number(s) {
        return canonical(v);
    }
    if let Some((a, b)) = s.split_once('/') {
        if let (Some(x), Some(y)) = (plain_number(a), plain_number(b)) {
            return format!("{}/{}", canonical(x), canonical(y));
        }
    }
    s.to_owned()
}

/// The value of a normalised answer that is a number or a numeric fraction.
fn numeric_value(s: &str) -> Option<f64> {
    if let Some(v) = plain_number(s) {
        return Some(v);
    }
    let (a, b) = s.split_once('/')?;
    let (x, y) = (plain_number(a)?, plain_number(b)?);
    (y != 0.0).then(|| x / y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_hashes_with_thousands_comma() {
        let completion = "She pays 1,000 + 234 = 1,234 dollars.\n#### 1,234";
        assert_eq!(extract_answer(completion).as_deref(), Some("1,234"));
        assert_eq!(normalize_answer("1,234"), "1234");
        assert_eq!(math_reward(completion, "1234"), 1.0);
        // A full GSM8K reference solution is reduced to its answer too.
        assert_eq!(math_reward(completion, "1000 + 234 = 1234\n#### 1234"), 1.0);
        assert_eq!(normalize_answer("(1,2)"), "(1,2)");
    }

    #[test]
    fn boxed_nested_braces_and_frac_forms() {
        let text = r"So the answer is $\boxed{\frac{1}{2}}$.";
        assert_eq!(extract_answer(text).as_deref(), Some(r"\frac{1}{2}"));
        assert_eq!(normalize_answer(r"\frac{1}{2}"), "1/2");
        assert_eq!(normalize_answer(r"\dfrac{3}{4}"), "3/4");
        assert_eq!(normalize_answer(r"\tfrac12"), "1/2");
        assert_eq!(normalize_answer(r"\frac{\sqrt{2}}{2}"), r"(\sqrt{2})/2");
        assert_eq!(extract_answer(r"\fbox{\{1, 2\}}").as_deref(), Some(r"\{1, 2\}"));
        assert_eq!(math_reward(text, "0.5"), 1.0);
        assert_eq!(math_reward(r"\boxed{0.5}", r"\frac{1}{2}"), 1.0);
        assert_eq!(math_reward(r"\boxed{\dfrac{3}{4}}", "0.75"), 1.0);
        assert_eq!(math_reward(r"\boxed{\dfrac{3}{4}}", "0.76"), 0.0);
    }

    #[test]
    fn dollars_units_degrees_percent() {
        assert_eq!(normalize_answer(r"\$5"), "5");
        assert_eq!(normalize_answer(r"5 \text{ cm}"), "5");
        assert_eq!(normalize_answer(r"12\text{ cm}^2"), "12");
        assert_eq!(normalize_answer(r"\text{(B)}"), "(B)");
        assert_eq!(normalize_answer(r"30^\circ"), "30");
        assert_eq!(normalize_answer(r"30^{\circ}"), "30");
        assert_eq!(normalize_answer(r"25\%"), "25");
        assert_eq!(normalize_answer(r"\left( 1, 2 \right)"), "(1,2)");
        assert_eq!(normalize_answer(r"10\,000."), "10000");
        assert_eq!(math_reward(r"The total is \boxed{\$5}.", "5"), 1.0);
        assert_eq!(math_reward(r"\boxed{5 \text{ cm}}", "5"), 1.0);
    }

    #[test]
    fn no_answer_and_wrong_answer_score_zero() {
        assert_eq!(extract_answer("I think it is 5."), None);
        assert_eq!(extract_answer(r"\boxed{} and ####   "), None);
        assert_eq!(math_reward("I think it is 5.", "5"), 0.0);
        assert_eq!(math_reward(r"\boxed{6}", "5"), 0.0);
        assert_eq!(math_reward(r"\boxed{x+1}", "x+2"), 0.0);
    }

    #[test]
    fn last_boxed_wins() {
        let text = r"First \boxed{3}, then corrected: \boxed{4}.";
        assert_eq!(extract_answer(text).as_deref(), Some("4"));
        assert_eq!(math_reward(text, "4"), 1.0);
        assert_eq!(math_reward(text, "3"), 0.0);
        // A boxed answer beats a GSM8K marker; `\boxed 7` without braces is accepted.
        assert_eq!(extract_answer("#### 1\n\\boxed 7 done").as_deref(), Some("7"));
    }

    #[test]
    fn negative_numbers_and_assignments() {
        assert_eq!(normalize_answer("-3.0"), "-3");
        assert_eq!(normalize_answer("\u{2212}3"), "-3");
        assert_eq!(normalize_answer(r"-\frac{1}{2}"), "-1/2");
        assert_eq!(math_reward(r"\boxed{-\frac{1}{2}}", "-0.5"), 1.0);
        assert_eq!(math_reward(r"\boxed{-3}", "3"), 0.0);
        assert_eq!(normalize_answer("x = 3"), "3");
        assert_eq!(normalize_answer(r"\theta = 30^\circ"), "30");
        assert_eq!(normalize_answer("a+b=3"), "a+b=3");
        assert_eq!(math_reward(r"\boxed{x = 3}", "3"), 1.0);
    }

    #[test]
    fn numbers_compare_with_relative_tolerance_only() {
        assert_eq!(normalize_answer("0.50"), "0.5");
        assert_eq!(math_reward(r"\boxed{0.3333333}", r"\frac{1}{3}"), 1.0);
        assert_eq!(math_reward(r"\boxed{0.333}", r"\frac{1}{3}"), 0.0);
        assert_eq!(math_reward(r"\boxed{0}", "0"), 1.0);
        // `inf`/`nan` are not numbers here, so they only match literally.
        assert_eq!(math_reward(r"\boxed{nan}", "NaN"), 0.0);
        assert_eq!(numeric_value("1/0"), None);
    }

    #[test]
    fn exact_match_collapses_whitespace() {
        assert_eq!(exact_match_reward("  Paris \n is  nice ", "Paris is nice", true), 1.0);
        assert_eq!(exact_match_reward("paris is nice", "Paris is nice", true), 0.0);
        assert_eq!(exact_match_reward("paris is nice", "Paris is nice", false), 1.0);
        assert_eq!(exact_match_reward("Paris", "Paris!", false), 0.0);
    }
}
