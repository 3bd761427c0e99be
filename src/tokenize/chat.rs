//! Chat templates: Jinja templates rendered with minijinja the way transformers'
//! `apply_chat_template` renders them.
//!
//! transformers compiles a template in a sandboxed Jinja2 environment with `trim_blocks` and
//! `lstrip_blocks`, the loop-controls extension, a `raise_exception(msg)` global, a
//! `strftime_now(fmt)` global and a `tojson` filter that does not escape HTML and follows
//! Python's `json.dumps` spacing. The same environment is rebuilt here; Python string methods
//! (`strip`, `split`, `startswith`, `items`, ...) come from minijinja-contrib's pycompat layer.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The name under which the template is registered in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// One message of a conversation, as chat templates expect it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (or whatever the template knows).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template together with the special tokens it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compiles a template; a syntax error is reported with its line.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);

        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| Error::ChatTemplate(describe(&e)))?;
        Ok(ChatTemplate {
            source: source.to_string(),
            env,
        })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; `special_tokens` become template variables (`bos_token`, ...), and
    /// `add_generation_prompt` asks for the opening of the assistant's turn.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        special_tokens: &BTreeMap<String, String>,
    ) -> Result<String> {
        self.render_with(
            Value::from_serialize(messages),
            add_generation_prompt,
            special_tokens,
            &BTreeMap::new(),
        )
    }

    /// Renders arbitrary messages (any JSON-like value, e.g. with tool calls) and extra
    /// variables; `extra` overrides the special tokens, as transformers' kwargs do.
    pub fn render_with(
        &self,
        messages: Value,
        add_generation_prompt: bool,
        special_tokens: &BTreeMap<String, String>,
        extra: &BTreeMap<String, Value>,
    ) -> Result<String> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        ctx.insert("messages".into(), messages);
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        for (name, token) in special_tokens {
            ctx.insert(name.clone(), Value::from(token.as_str()));
        }
        for (name, value) in extra {
            ctx.insert(name.clone(), value.clone());
        }

        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::ChatTemplate(describe(&e)))?;
        template
            .render(Value::from_serialize(&ctx))
            .map_err(|e| Error::ChatTemplate(describe(&e)))
    }
}

/// The error with its line and the whole chain of causes.
fn describe(err: &minijinja::Error) -> String {
    let mut text = match err.line() {
        Some(line) => format!("line {line}: {err}"),
        None => err.to_string(),
    };
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// `raise_exception(msg)`: the template rejects its input.
fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `x | tojson(indent=None, sort_keys=False)` with `json.dumps(ensure_ascii=False)` output.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;

    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::BadSerialization, e.to_string()))?;
    let style = JsonStyle {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

/// Python `json.dumps` formatting options.
struct JsonStyle {
    indent: Option<usize>,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonStyle {
    /// Appends `value` to `out` at nesting `depth`.
    fn write(&self, value: &serde_json::Value, depth: usize, out: &mut String) {
        use serde_json::Value as J;
        match value {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Number(n) => out.push_str(&python_number(n)),
            J::String(s) => self.write_string(s, out),
            J::Array(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separator(i, depth + 1, out);
                    self.write(item, depth + 1, out);
                }
                self.close(depth, out);
                out.push(']');
            }
            J::Object(map) => {
                if map.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    self.separator(i, depth + 1, out);
                    self.write_string(key, out);
                    out.push_str(": ");
                    self.write(item, depth + 1, out);
                }
                self.close(depth, out);
                out.push('}');
            }
        }
    }

    /// The separator before item `i`: `", "` inline, `",\n" + indent` when indenting.
    fn separator(&self, i: usize, depth: usize, out: &mut String) {
        match self.indent {
            None if i > 0 => out.push_str(", "),
            None => {}
            Some(width) => {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                out.push_str(&" ".repeat(width * depth));
            }
        }
    }

    /// The newline and indent before a closing bracket.
    fn close(&self, depth: usize, out: &mut String) {
        if let Some(width) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    }

    /// A JSON string literal escaped as Python escapes it.
    fn write_string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
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
}

/// A number as Python prints it: integers plain, floats with a decimal point.
fn python_number(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() && f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 => {
            format!("{f:.1}")
        }
        _ => n.to_string(),
    }
}

/// `strftime_now(fmt)`: the current UTC date and time formatted with the common `%` codes
/// (`%Y %m %d %e %B %b %A %a %H %M %S %p %I %j %%`).
fn strftime_now(format: String) -> std::result::Result<Value, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(format_unix_time(secs, &format)))
}

/// Formats a Unix time (UTC) with a subset of C's `strftime` codes.
pub(crate) fn format_unix_time(secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];

    let days = secs.div_euclid(86_400);
    let seconds_of_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (
        seconds_of_day / 3600,
        (seconds_of_day / 60) % 60,
        seconds_of_day % 60,
    );
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:>2}"),
            Some('B') => write!(out, "{month_name}"),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('A') => write!(out, "{weekday}"),
            Some('a') => write!(out, "{}", &weekday[..3]),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{:02}", (hour + 11) % 12 + 1),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('j') => write!(out, "{day_of_year:03}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Day count since 1970-01-01 of a civil date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specials() -> BTreeMap<String, String> {
        BTreeMap::from([("bos_token".to_string(), "<s>".to_string())])
    }

    #[test]
    fn trim_and_lstrip_blocks_apply_as_in_transformers() {
        // Expected output from jinja2 3.1 with trim_blocks=True, lstrip_blocks=True.
        let template = ChatTemplate::new(
            "{% for m in messages %}\n  {% if true %}{{ m.role }}{% endif %}\n{% endfor %}\n",
        )
        .unwrap();
        let text = template
            .render(&[Message::new("user", "hi")], false, &specials())
            .unwrap();
        assert_eq!(text, "user");
    }

    #[test]
    fn raise_exception_becomes_a_chat_template_error() {
        let template = ChatTemplate::new("{{ raise_exception('roles must alternate') }}").unwrap();
        let err = template.render(&[], false, &specials()).unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    #[test]
    fn tojson_follows_python_json_dumps_spacing_without_html_escapes() {
        let template = ChatTemplate::new(
            "{{ {'a': [1, 2.0, '<é>'], 'b': none} | tojson }}|{{ [1] | tojson(indent=2) }}",
        )
        .unwrap();
        let text = template.render(&[], false, &specials()).unwrap();
        assert_eq!(text, "{\"a\": [1, 2.0, \"<é>\"], \"b\": null}|[\n  1\n]");
    }

    #[test]
    fn python_string_methods_and_loop_controls_work() {
        let template = ChatTemplate::new(
            "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}\
             {{ m.content.strip().upper() }}{% endfor %}{{ bos_token }}",
        )
        .unwrap();
        let messages = [Message::new("user", "  hi  "), Message::new("user", "no")];
        assert_eq!(
            template.render(&messages, false, &specials()).unwrap(),
            "HI<s>"
        );
    }

    #[test]
    fn strftime_formats_a_known_date() {
        // 2024-07-26 13:05:09 UTC was a Friday; day 208 of a leap year.
        let secs = 1_722_085_509 - 86_400;
        assert_eq!(
            format_unix_time(secs, "%d %b %Y %H:%M:%S %A %j"),
            "26 Jul 2024 13:05:09 Friday 208"
        );
    }
}
