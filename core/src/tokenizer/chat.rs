//! Chat templates rendered the way transformers' `apply_chat_template(tokenize=False)` does.
//!
//! transformers compiles templates in a Jinja2 sandbox with `trim_blocks`, `lstrip_blocks`
//! and loop controls, and adds `raise_exception`, `strftime_now` and its own `tojson`
//! (`json.dumps(x, ensure_ascii=False, indent=..)`, no HTML escaping, keys in input order).
//! [`ChatTemplate`] sets up minijinja to match: the same options and functions, Python string
//! methods through `minijinja_contrib::pycompat`, Python's `str()` for printed values (`None`,
//! `True`, `1.0`), and JSON objects passed as insertion-ordered maps so `tojson` keeps the
//! caller's key order (which holds end to end only when serde_json's `preserve_order` feature
//! is on; without it serde_json itself sorts keys while parsing).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt::{self, Write as _};
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Value as JValue, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Output, State};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::TokenizerError;

/// The name the template is registered under (no extension: no auto-escaping).
const TEMPLATE_NAME: &str = "chat";

/// One message of a conversation, as OpenAI-style requests and chat templates see it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// "system", "user", "assistant", "tool", ...
    pub role: String,
    /// A string, a list of content parts, or null (an assistant turn with only tool calls).
    #[serde(default)]
    pub content: Option<Value>,
    /// The assistant's tool calls, passed to the template as given (arguments may be a JSON
    /// object or a JSON string; templates handle either).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// For role "tool": the call this message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Optional participant or tool name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any other fields (e.g. `reasoning_content`), visible to the template by name.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl ChatMessage {
    /// A message with text content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Some(Value::String(content.into())),
            ..Self::default()
        }
    }

    /// The message as the template sees it: keys in declaration order, absent options left out
    /// (so `'tool_calls' in message` is false), `content` always present (null when `None`).
    fn to_jinja(&self) -> JValue {
        let mut entries = vec![
            (JValue::from("role"), JValue::from(self.role.as_str())),
            (
                JValue::from("content"),
                self.content.as_ref().map_or(JValue::from(()), to_jinja),
            ),
        ];
        if let Some(calls) = &self.tool_calls {
            entries.push((JValue::from("tool_calls"), to_jinja(calls)));
        }
        if let Some(id) = &self.tool_call_id {
            entries.push((JValue::from("tool_call_id"), JValue::from(id.as_str())));
        }
        if let Some(name) = &self.name {
            entries.push((JValue::from("name"), JValue::from(name.as_str())));
        }
        for (k, v) in &self.extra {
            entries.push((JValue::from(k.as_str()), to_jinja(v)));
        }
        JValue::from_object(OrderedMap { entries })
    }
}

/// A compiled chat template plus the special tokens it is rendered with.
///
/// # Examples
///
/// ```
/// use hicra_core::tokenizer::{ChatMessage, ChatTemplate};
/// # fn main() -> Result<(), hicra_core::tokenizer::TokenizerError> {
/// let source = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}\
///               {% if add_generation_prompt %}<|assistant|>{% endif %}";
/// let template = ChatTemplate::new(source, None, None)?;
/// let text = template.render(&[ChatMessage::new("user", "Hi")], None, true, None)?;
/// assert_eq!(text, "<|user|>Hi\n<|assistant|>");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token`/`eos_token` are passed to every render (as
    /// transformers passes the tokenizer's special tokens); `None` leaves them undefined.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        // Python's None is not iterable (minijinja iterates none as empty).
        env.add_test("iterable", |v: &JValue| {
            !v.is_none() && v.try_iter().is_ok()
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(template_error)?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token,
            eos_token,
        })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders a conversation. `tools` are JSON tool schemas; `extra_context` is a JSON object
    /// whose keys become template variables (e.g. `enable_thinking`, `date_string`) and may
    /// override `bos_token`/`eos_token`, as `apply_chat_template(**kwargs)` does.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
        extra_context: Option<&Value>,
    ) -> Result<String, TokenizerError> {
        let mut ctx: BTreeMap<String, JValue> = BTreeMap::new();
        if let Some(bos) = &self.bos_token {
            ctx.insert("bos_token".into(), JValue::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            ctx.insert("eos_token".into(), JValue::from(eos.as_str()));
        }
        match extra_context {
            None | Some(Value::Null) => {}
            Some(Value::Object(extra)) => {
                for (k, v) in extra {
                    ctx.insert(k.clone(), to_jinja(v));
                }
            }
            Some(other) => {
                return Err(TokenizerError::Template(format!(
                    "extra context must be a JSON object, got {other}"
                )))
            }
        }
        // A template that knows nothing of tool calls (SmolLM2's) concatenates `content` as a
        // string; give it the calls as text instead of a null it cannot add.
        let knows_tool_calls = self.source.contains("tool_calls");
        let messages: Vec<JValue> = messages
            .iter()
            .map(|m| match (&m.content, knows_tool_calls) {
                (None, false) => ChatMessage { content: Some(Value::String(tool_calls_as_text(m.tool_calls.as_ref()))), ..m.clone() }.to_jinja(),
                _ => m.to_jinja(),
            })
            .collect();
        ctx.insert("messages".into(), JValue::from(messages));
        let tools = tools.map_or(JValue::from(()), |t| {
            JValue::from(t.iter().map(to_jinja).collect::<Vec<_>>())
        });
        ctx.insert("tools".into(), tools);
        ctx.insert("documents".into(), JValue::from(()));
        ctx.insert(
            "add_generation_prompt".into(),
            JValue::from(add_generation_prompt),
        );
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        template.render(JValue::from(ctx)).map_err(template_error)
    }
}

/// An assistant turn's tool calls as plain text, one JSON object per call
/// (`{"name": ..., "arguments": ...}`), for templates without a tool-call format; empty when
/// there are none.
fn tool_calls_as_text(calls: Option<&Value>) -> String {
    let Some(Value::Array(calls)) = calls else { return String::new() };
    calls
        .iter()
        .map(|call| {
            let function = call.get("function").unwrap_or(call);
            let arguments = match function.get("arguments") {
                Some(Value::String(text)) => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone())),
                Some(other) => other.clone(),
                None => Value::Object(Default::default()),
            };
            serde_json::json!({"name": function.get("name").cloned().unwrap_or(Value::Null), "arguments": arguments}).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A JSON object for the template: a map that keeps its keys in insertion order whatever
/// minijinja's own map type does.
#[derive(Debug)]
struct OrderedMap {
    entries: Vec<(JValue, JValue)>,
}

impl Object for OrderedMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.entries.iter().map(|(k, _)| k.clone()).collect())
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// Converts JSON to a template value, keeping object key order.
fn to_jinja(value: &Value) -> JValue {
    match value {
        Value::Null => JValue::from(()),
        Value::Bool(b) => JValue::from(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => JValue::from(i),
            (_, Some(u), _) => JValue::from(u),
            (_, _, Some(f)) => JValue::from(f),
            _ => JValue::from(()),
        },
        Value::String(s) => JValue::from(s.as_str()),
        Value::Array(items) => JValue::from(items.iter().map(to_jinja).collect::<Vec<_>>()),
        Value::Object(map) => JValue::from_object(OrderedMap {
            entries: map
                .iter()
                .map(|(k, v)| (JValue::from(k.as_str()), to_jinja(v)))
                .collect(),
        }),
    }
}

/// What `raise_exception(message)` throws; found again in the error's source chain.
#[derive(Debug)]
struct RaisedException(String);

impl fmt::Display for RaisedException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

fn raise_exception(message: String) -> Result<JValue, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedException(message)))
}

fn template_error(err: Error) -> TokenizerError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<RaisedException>() {
            return TokenizerError::TemplateException(raised.0.clone());
        }
        source = e.source();
    }
    TokenizerError::Template(err.to_string())
}

/// The local time formatted by the C library's `strftime`, which is what Python's
/// `datetime.now().strftime` calls too.
fn strftime_now(format: String) -> Result<String, Error> {
    if format.is_empty() {
        return Ok(String::new());
    }
    let c_format = CString::new(format).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            "strftime_now: format contains NUL",
        )
    })?;
    // SAFETY: `time` accepts a null pointer; `localtime_r` writes only into the zeroed `tm`
    // we own and reports failure with a null return, which is checked.
    let tm = unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "strftime_now: no local time",
            ));
        }
        tm
    };
    let mut capacity = 128;
    loop {
        let mut buf = vec![0u8; capacity];
        // SAFETY: `buf` is writable for `buf.len()` bytes, `c_format` is NUL-terminated and
        // `tm` is initialised; strftime writes at most `buf.len()` bytes and returns how many.
        let n =
            unsafe { libc::strftime(buf.as_mut_ptr().cast(), buf.len(), c_format.as_ptr(), &tm) };
        if n > 0 || capacity >= 16 * 1024 {
            buf.truncate(n);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        capacity *= 4;
    }
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: &JValue, indent: Option<JValue>, kwargs: Kwargs) -> Result<JValue, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<JValue>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(usize::try_from(v.as_i64().unwrap_or(0)).unwrap_or(0))),
        },
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators = kwargs.get::<Option<Vec<String>>>("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators needs two strings",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let writer = PyJson {
        indent,
        item_sep,
        key_sep,
        ensure_ascii,
        sort_keys,
    };
    let mut out = String::new();
    writer.write(&mut out, value, 0)?;
    Ok(JValue::from(out))
}

/// Python's `json.dumps` output format.
struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }

    fn write(&self, out: &mut String, value: &JValue, depth: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&py_number(value, true)),
            ValueKind::String => {
                write_json_string(out, value.as_str().unwrap_or_default(), self.ensure_ascii)
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<JValue> = value.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.write(out, item, depth + 1)?;
                }
                self.newline(out, depth);
                out.push(']');
            }
            ValueKind::Map => {
                let mut keys: Vec<JValue> = value.try_iter()?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort();
                }
                out.push('{');
                for (i, key) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    // json.dumps turns non-string keys into their JSON text.
                    match key.as_str() {
                        Some(s) => write_json_string(out, s, self.ensure_ascii),
                        None => {
                            let mut text = String::new();
                            self.write(&mut text, key, depth + 1)?;
                            write_json_string(out, &text, self.ensure_ascii);
                        }
                    }
                    out.push_str(&self.key_sep);
                    self.write(out, &value.get_item(key)?, depth + 1)?;
                }
                self.newline(out, depth);
                out.push('}');
            }
            kind => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a value of type {kind} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }
}

/// A JSON string literal as Python's json module writes it.
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A number as Python prints it: integers plainly, floats with `repr` (`1.0`, `1e+16`);
/// `json` selects JSON's spelling of non-finite values.
fn py_number(value: &JValue, json: bool) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
    if f.is_nan() {
        return if json { "NaN" } else { "nan" }.to_string();
    }
    if f.is_infinite() {
        let sign = if f < 0.0 { "-" } else { "" };
        return format!("{sign}{}", if json { "Infinity" } else { "inf" });
    }
    py_float_repr(f)
}

/// Python's `repr(float)`: the shortest round-tripping digits, positional for exponents in
/// [-4, 16), scientific otherwise.
fn py_float_repr(f: f64) -> String {
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if f.is_sign_negative() { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let body = if exp >= 0 {
            let int_len = exp as usize + 1;
            let padded = format!("{digits:0<int_len$}");
            let (int_part, frac) = padded.split_at(int_len);
            format!("{int_part}.{}", if frac.is_empty() { "0" } else { frac })
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1.min(digits.len()));
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{exp_sign}{:02}", exp.abs())
    }
}

/// Python's `repr` of a template value, for lists and dicts printed with `{{ }}`.
fn py_repr(out: &mut String, value: &JValue) -> Result<(), Error> {
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let quote = if s.contains('\'') && !s.contains('"') {
                '"'
            } else {
                '\''
            };
            out.push(quote);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == quote => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if (c as u32) < 0x20 || c == '\u{7f}' => {
                        let _ = write!(out, "\\x{:02x}", c as u32);
                    }
                    c => out.push(c),
                }
            }
            out.push(quote);
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(out, &item)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(out, &key)?;
                out.push_str(": ");
                py_repr(out, &value.get_item(&key)?)?;
            }
            out.push('}');
        }
        _ => py_str(out, value),
    }
    Ok(())
}

/// Python's `str` of a scalar.
fn py_str(out: &mut String, value: &JValue) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => out.push_str(&py_number(value, false)),
        _ => {
            let _ = write!(out, "{value}");
        }
    }
}

/// Prints `{{ value }}` as Jinja2 does, i.e. with Python's `str()`.
fn python_formatter(out: &mut Output, state: &State, value: &JValue) -> Result<(), Error> {
    let mut text = String::new();
    match value.kind() {
        ValueKind::String => return minijinja::escape_formatter(out, state, value),
        ValueKind::Seq | ValueKind::Map => py_repr(&mut text, value)?,
        _ => py_str(&mut text, value),
    }
    out.write_str(&text)
        .map_err(|_| Error::new(ErrorKind::WriteFailure, "cannot write output"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Deserialize)]
    struct Fixture {
        cases: Vec<Case>,
    }

    #[derive(Deserialize)]
    struct Case {
        name: String,
        template: String,
        messages: Vec<ChatMessage>,
        tools: Option<Vec<Value>>,
        add_generation_prompt: bool,
        extra_context: Option<Value>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        expected: Option<String>,
        expected_error: Option<String>,
        #[serde(default)]
        raised: bool,
    }

    fn fixture_dir() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
    }

    /// Whether serde_json keeps object keys in input order (its `preserve_order` feature).
    fn serde_json_preserves_order() -> bool {
        let v: Value = serde_json::from_str(r#"{"b": 1, "a": 2}"#).expect("json");
        v.as_object()
            .and_then(|o| o.keys().next())
            .map(String::as_str)
            == Some("b")
    }

    #[test]
    fn renders_like_transformers() {
        let text = std::fs::read_to_string(fixture_dir().join("cases.json")).expect("cases.json");
        let fixture: Fixture = serde_json::from_str(&text).expect("fixture json");
        // The workspace enables serde_json's preserve_order; without it tool definitions
        // would render with sorted keys, unlike transformers.
        assert!(serde_json_preserves_order(), "serde_json must keep key order");
        let mut compared = 0;
        for case in &fixture.cases {
            let source =
                std::fs::read_to_string(fixture_dir().join(&case.template)).expect("template");
            let tmpl = ChatTemplate::new(&source, case.bos_token.clone(), case.eos_token.clone())
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let got = tmpl.render(
                &case.messages,
                case.tools.as_deref(),
                case.add_generation_prompt,
                case.extra_context.as_ref(),
            );
            match (&case.expected, &case.expected_error, got) {
                (Some(expected), _, Ok(got)) => assert_eq!(&got, expected, "{}", case.name),
                (None, Some(message), Err(err)) => {
                    if case.raised {
                        assert!(
                            matches!(&err, TokenizerError::TemplateException(m) if m == message),
                            "{}: {err}",
                            case.name
                        );
                    }
                }
                (_, _, got) => panic!("{}: unexpected outcome {got:?}", case.name),
            }
            compared += 1;
        }
        assert_eq!(compared, fixture.cases.len());
    }

    fn render_one(source: &str, ctx: Value) -> Result<String, TokenizerError> {
        ChatTemplate::new(source, None, None)?.render(&[], None, false, Some(&ctx))
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let ctx = json!({"x": {"b": [1, 2.5, 1.0, -0.0, 1e16, 1.5e-7], "a": "<&'\"\u{e9}\n>", "n": null, "t": true, "e": {}, "l": []}});
        // serde_json without preserve_order sorts keys, so the expectation follows it.
        let keys: Vec<String> = ctx["x"]
            .as_object()
            .expect("object")
            .keys()
            .cloned()
            .collect();
        let part = |k: &str| match k {
            "b" => r#""b": [1, 2.5, 1.0, -0.0, 1e+16, 1.5e-07]"#,
            "a" => "\"a\": \"<&'\\\"\u{e9}\\n>\"",
            "n" => r#""n": null"#,
            "t" => r#""t": true"#,
            "e" => r#""e": {}"#,
            _ => r#""l": []"#,
        };
        let expected = format!(
            "{{{}}}",
            keys.iter().map(|k| part(k)).collect::<Vec<_>>().join(", ")
        );
        assert_eq!(
            render_one("{{ x | tojson }}", ctx.clone()).expect("render"),
            expected
        );

        let ctx = json!({"x": {"k": [1, {"z": "é"}]}});
        assert_eq!(
            render_one("{{ x | tojson(indent=2) }}", ctx.clone()).expect("render"),
            "{\n  \"k\": [\n    1,\n    {\n      \"z\": \"é\"\n    }\n  ]\n}"
        );
        assert_eq!(
            render_one("{{ x | tojson(ensure_ascii=true) }}", ctx.clone()).expect("render"),
            r#"{"k": [1, {"z": "\u00e9"}]}"#
        );
        assert_eq!(
            render_one("{{ x | tojson(separators=[',', ':']) }}", ctx).expect("render"),
            r#"{"k":[1,{"z":"é"}]}"#
        );
        let ctx = json!({"x": {"b": 1, "a": 2}, "s": "\u{1F389}"});
        assert_eq!(
            render_one("{{ x | tojson(sort_keys=true) }}", ctx.clone()).expect("render"),
            r#"{"a": 2, "b": 1}"#
        );
        assert_eq!(
            render_one("{{ s | tojson(ensure_ascii=true) }}", ctx).expect("render"),
            r#""\ud83c\udf89""#
        );
    }

    #[test]
    fn object_key_order_is_kept() {
        // Built without parsing, so the map's order is the insertion order when serde_json
        // keeps it, and then tojson and iteration must keep it too.
        assert!(serde_json_preserves_order(), "serde_json must keep key order");
        let ctx: Value = serde_json::from_str(r#"{"x": {"z": 1, "a": 2, "m": 3}}"#).expect("json");
        assert_eq!(
            render_one("{{ x | tojson }}", ctx.clone()).expect("render"),
            r#"{"z": 1, "a": 2, "m": 3}"#
        );
        assert_eq!(
            render_one("{% for k, v in x.items() %}{{ k }}{% endfor %}", ctx).expect("render"),
            "zam"
        );
    }

    #[test]
    fn python_float_repr() {
        for (f, s) in [
            (0.1, "0.1"),
            (1.0, "1.0"),
            (-2.5, "-2.5"),
            (123456789.0, "123456789.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e20, "1.2345e+20"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (3.14159e-10, "3.14159e-10"),
            (1.0 / 3.0, "0.3333333333333333"),
        ] {
            assert_eq!(py_float_repr(f), s, "{f}");
        }
    }

    #[test]
    fn prints_values_like_python() {
        let ctx = json!({"n": null, "t": true, "f": false, "x": 2.0, "l": ["a", "it's", 1, null], "m": {"k": false}});
        assert_eq!(
            render_one(
                "{{ n }}|{{ t }}|{{ f }}|{{ x }}|{{ l }}|{{ m }}|{{ undefined_var }}|",
                ctx
            )
            .expect("render"),
            "None|True|False|2.0|['a', \"it's\", 1, None]|{'k': False}||"
        );
    }

    #[test]
    fn python_methods_and_tests() {
        let ctx = json!({"s": "  <think>a</think>\n\nb  ", "n": null, "c": "text"});
        let src = "{{ s.strip().split('</think>')[-1].lstrip('\\n') }}|{{ s.startswith('  <') }}|\
                   {{ n is iterable }}|{{ c is iterable }}|{{ c is string }}";
        assert_eq!(
            render_one(src, ctx).expect("render"),
            "b|True|False|True|True"
        );
    }

    #[test]
    fn whitespace_control_matches_transformers() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        let tmpl = ChatTemplate::new(src, None, None).expect("compile");
        let msgs = [
            ChatMessage::new("user", "a"),
            ChatMessage::new("assistant", "b"),
        ];
        assert_eq!(
            tmpl.render(&msgs, None, false, None).expect("render"),
            "[a]\n"
        );
    }

    #[test]
    fn raise_exception_is_a_typed_error() {
        let src = "{% if messages|length == 0 %}{{ raise_exception('need a message') }}{% endif %}";
        let err = render_one(src, json!({})).expect_err("raises");
        assert!(
            matches!(&err, TokenizerError::TemplateException(m) if m == "need a message"),
            "{err}"
        );
        let err = ChatTemplate::new("{% if %}", None, None).expect_err("syntax error");
        assert!(matches!(err, TokenizerError::Template(_)));
        let err = ChatTemplate::new("x", None, None).expect("compile").render(
            &[],
            None,
            false,
            Some(&json!([1])),
        );
        assert!(matches!(err, Err(TokenizerError::Template(_))));
    }

    #[test]
    fn strftime_now_formats_local_time() {
        let year = render_one("{{ strftime_now('%Y') }}", json!({})).expect("render");
        assert!(
            year.len() == 4 && year.chars().all(|c| c.is_ascii_digit()),
            "{year}"
        );
        let date = render_one("{{ strftime_now('%d %b %Y') }}", json!({})).expect("render");
        assert_eq!(date.len(), 11, "{date}");
    }

    #[test]
    fn chat_message_serde() {
        let m: ChatMessage = serde_json::from_value(json!({
            "role": "assistant", "content": null, "reasoning_content": "hmm",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]
        }))
        .expect("message");
        assert_eq!(m.content, None);
        assert_eq!(m.extra.get("reasoning_content"), Some(&json!("hmm")));
        let back = serde_json::to_value(&m).expect("serialize");
        assert!(back.get("tool_call_id").is_none() && back.get("tool_calls").is_some());
        let src = "{{ messages[0].reasoning_content }}|{{ 'tool_calls' in messages[0] }}|\
                   {{ 'name' in messages[0] }}|{{ messages[0].content is none }}";
        let tmpl = ChatTemplate::new(src, None, None).expect("compile");
        assert_eq!(
            tmpl.render(&[m], None, false, None).expect("render"),
            "hmm|True|False|True"
        );
    }
}
