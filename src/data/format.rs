//! Preference-record formats (TRL standard and conversational, implicit prompt, ShareGPT /
//! LLaMA-Factory) and their reduction to one normal form: a prompt and two completions.

use serde_json::Value;

use crate::tokenize::Message;

/// The layout of a preference record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// TRL standard: `prompt`, `chosen`, `rejected` strings.
    Standard,
    /// TRL conversational: `prompt`, `chosen`, `rejected` lists of `{role, content}` messages.
    Conversational,
    /// `chosen` and `rejected` as whole conversations (or strings) sharing a prefix, which is
    /// the prompt (TRL's `extract_prompt`).
    ImplicitPrompt,
    /// LLaMA-Factory / ShareGPT: `conversations` of `{from, value}` (system / human / gpt),
    /// plus `chosen` and `rejected` messages.
    ShareGpt,
}

impl Format {
    /// The format's name as written in configs and scripts.
    pub fn name(self) -> &'static str {
        match self {
            Format::Standard => "standard",
            Format::Conversational => "conversational",
            Format::ImplicitPrompt => "implicit_prompt",
            Format::ShareGpt => "sharegpt",
        }
    }

    /// The format named `name` (`standard`, `conversational`, `implicit_prompt`, `sharegpt`).
    pub fn from_name(name: &str) -> Option<Format> {
        [
            Format::Standard,
            Format::Conversational,
            Format::ImplicitPrompt,
            Format::ShareGpt,
        ]
        .into_iter()
        .find(|f| f.name() == name)
    }
}

/// Where each field lives in a record: the dataset's own column names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    /// The prompt (string or messages); default `prompt`.
    pub prompt: String,
    /// The preferred completion; default `chosen`.
    pub chosen: String,
    /// The dispreferred completion; default `rejected`.
    pub rejected: String,
    /// The ShareGPT conversation; default `conversations`.
    pub conversations: String,
    /// An optional system prompt column (LLaMA-Factory's `system`); default `system`.
    pub system: String,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            prompt: "prompt".into(),
            chosen: "chosen".into(),
            rejected: "rejected".into(),
            conversations: "conversations".into(),
            system: "system".into(),
        }
    }
}

/// A text, or a list of chat messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turns {
    /// Raw text (TRL standard format).
    Text(String),
    /// Chat messages, rendered with the chat template.
    Messages(Vec<Message>),
}

/// A record in normal form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPair {
    /// The prompt (the conversation up to the completion).
    pub prompt: Turns,
    /// The preferred completion.
    pub chosen: Turns,
    /// The dispreferred completion.
    pub rejected: Turns,
}

/// Why a record is invalid: the field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The field (column, possibly with an index: `conversations[2].value`).
    pub field: String,
    /// What is wrong.
    pub msg: String,
}

fn invalid(field: impl Into<String>, msg: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        msg: msg.into(),
    }
}

/// The format a record looks like, judging by its (mapped) fields.
pub fn detect(record: &Value, columns: &Columns) -> Option<Format> {
    let object = record.as_object()?;
    if object.contains_key(&columns.conversations) {
        return Some(Format::ShareGpt);
    }
    let chosen = object.get(&columns.chosen)?;
    match (object.get(&columns.prompt), chosen) {
        (Some(_), Value::String(_)) => Some(Format::Standard),
        (Some(_), _) => Some(Format::Conversational),
        (None, _) => Some(Format::ImplicitPrompt),
    }
}

/// Reduces a record of `format` to its normal form, or says which field is wrong.
pub fn normalize(
    record: &Value,
    format: Format,
    columns: &Columns,
) -> std::result::Result<RawPair, Invalid> {
    let object = record.as_object().ok_or_else(|| {
        invalid(
            "(record)",
            format!("expected a JSON object, found {record}"),
        )
    })?;
    let field = |name: &str| {
        object
            .get(name)
            .filter(|v| !v.is_null())
            .ok_or_else(|| invalid(name, "missing"))
    };

    let pair = match format {
        Format::Standard => RawPair {
            prompt: Turns::Text(text(field(&columns.prompt)?, &columns.prompt)?),
            chosen: Turns::Text(text(field(&columns.chosen)?, &columns.chosen)?),
            rejected: Turns::Text(text(field(&columns.rejected)?, &columns.rejected)?),
        },
        Format::Conversational => {
            let prompt = turns(field(&columns.prompt)?, &columns.prompt)?;
            let chosen = turns(field(&columns.chosen)?, &columns.chosen)?;
            let rejected = turns(field(&columns.rejected)?, &columns.rejected)?;
            match (prompt, &chosen, &rejected) {
                // Hugging Face H4 layout (ultrafeedback_binarized): a text prompt beside whole
                // conversations that repeat it; the conversations' shared prefix is the prompt.
                (Turns::Text(text), Turns::Messages(_), Turns::Messages(_)) => {
                    let mut pair = extract_prompt(chosen, rejected, columns)?;
                    if pair.prompt == Turns::Messages(Vec::new()) {
                        pair.prompt = Turns::Messages(vec![Message::new("user", text)]);
                    }
                    pair
                }
                (prompt, _, _) => RawPair {
                    prompt,
                    chosen,
                    rejected,
                },
            }
        }
        Format::ImplicitPrompt => {
            let chosen = turns(field(&columns.chosen)?, &columns.chosen)?;
            let rejected = turns(field(&columns.rejected)?, &columns.rejected)?;
            extract_prompt(chosen, rejected, columns)?
        }
        Format::ShareGpt => {
            let mut prompt = Vec::new();
            if let Some(system) = object.get(&columns.system).filter(|v| !v.is_null()) {
                let system = text(system, &columns.system)?;
                if !system.is_empty() {
                    prompt.push(Message::new("system", system));
                }
            }
            prompt.extend(messages(
                field(&columns.conversations)?,
                &columns.conversations,
            )?);
            RawPair {
                prompt: Turns::Messages(prompt),
                chosen: Turns::Messages(completion(field(&columns.chosen)?, &columns.chosen)?),
                rejected: Turns::Messages(completion(
                    field(&columns.rejected)?,
                    &columns.rejected,
                )?),
            }
        }
    };
    validate(&pair, columns)?;
    Ok(pair)
}

/// Rejects pairs that cannot teach a preference: empty prompt or completions, identical
/// chosen and rejected, a conversation whose last prompt turn is the assistant's.
fn validate(pair: &RawPair, columns: &Columns) -> std::result::Result<(), Invalid> {
    for (turns, name) in [
        (&pair.chosen, &columns.chosen),
        (&pair.rejected, &columns.rejected),
    ] {
        let empty = match turns {
            Turns::Text(t) => t.trim().is_empty(),
            Turns::Messages(m) => m.is_empty() || m.iter().all(|m| m.content.trim().is_empty()),
        };
        if empty {
            return Err(invalid(name.as_str(), "empty completion"));
        }
    }
    if pair.chosen == pair.rejected {
        return Err(invalid(
            columns.rejected.as_str(),
            "identical to chosen: the pair expresses no preference",
        ));
    }
    if let Turns::Messages(prompt) = &pair.prompt {
        if prompt.is_empty() {
            return Err(invalid(
                columns.prompt.as_str(),
                "empty prompt conversation",
            ));
        }
    }
    Ok(())
}

/// A string field.
fn text(value: &Value, field: &str) -> std::result::Result<String, Invalid> {
    value
        .as_str()
        .map(String::from)
        .ok_or_else(|| invalid(field, format!("expected a string, found {}", kind(value))))
}

/// A string (as text) or a list of messages.
fn turns(value: &Value, field: &str) -> std::result::Result<Turns, Invalid> {
    match value {
        Value::String(s) => Ok(Turns::Text(s.clone())),
        Value::Array(_) => Ok(Turns::Messages(messages(value, field)?)),
        Value::Object(_) => Ok(Turns::Messages(vec![message(value, field)?])),
        other => Err(invalid(
            field,
            format!(
                "expected a string or a list of messages, found {}",
                kind(other)
            ),
        )),
    }
}

/// A ShareGPT completion: one message object, or a list of them.
fn completion(value: &Value, field: &str) -> std::result::Result<Vec<Message>, Invalid> {
    match value {
        Value::Object(_) => Ok(vec![message(value, field)?]),
        Value::Array(_) => messages(value, field),
        Value::String(s) => Ok(vec![Message::new("assistant", s.clone())]),
        other => Err(invalid(
            field,
            format!("expected a message, found {}", kind(other)),
        )),
    }
}

/// A list of messages.
fn messages(value: &Value, field: &str) -> std::result::Result<Vec<Message>, Invalid> {
    let items = value.as_array().ok_or_else(|| {
        invalid(
            field,
            format!("expected a list of messages, found {}", kind(value)),
        )
    })?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| message(item, &format!("{field}[{i}]")))
        .collect()
}

/// One message: `{role, content}` or `{from, value}`; ShareGPT role names (human, gpt) are
/// mapped to chat-template roles (user, assistant); content may be a list of text parts.
fn message(value: &Value, field: &str) -> std::result::Result<Message, Invalid> {
    let object = value.as_object().ok_or_else(|| {
        invalid(
            field,
            format!("expected a message object, found {}", kind(value)),
        )
    })?;
    let (role_key, content_key) = if object.contains_key("from") {
        ("from", "value")
    } else {
        ("role", "content")
    };
    let role = object
        .get(role_key)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{field}.{role_key}"), "missing"))?;
    let content = object
        .get(content_key)
        .ok_or_else(|| invalid(format!("{field}.{content_key}"), "missing"))?;
    let content = content_text(content, &format!("{field}.{content_key}"))?;
    Ok(Message::new(chat_role(role), content))
}

/// Message content: a string, or a list of `{type: "text", text|value}` parts joined.
fn content_text(value: &Value, field: &str) -> std::result::Result<String, Invalid> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (i, part) in parts.iter().enumerate() {
                let kind_of_part = part.get("type").and_then(Value::as_str).unwrap_or("text");
                // TODO: image and audio parts are rejected: no multimodal model is supported.
                if kind_of_part != "text" {
                    return Err(invalid(
                        format!("{field}[{i}].type"),
                        format!("only text content is supported, found `{kind_of_part}`"),
                    ));
                }
                let piece = part
                    .get("text")
                    .or_else(|| part.get("value"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid(format!("{field}[{i}].text"), "missing"))?;
                out.push_str(piece);
            }
            Ok(out)
        }
        other => Err(invalid(
            field,
            format!("expected text, found {}", kind(other)),
        )),
    }
}

/// The chat-template role of a ShareGPT role name.
fn chat_role(role: &str) -> &str {
    match role {
        "human" | "user" => "user",
        "gpt" | "assistant" | "bot" | "model" => "assistant",
        other => other,
    }
}

/// TRL's `extract_prompt`: the longest shared prefix of chosen and rejected is the prompt
/// (for text, a space just before the divergence stays with the completions).
fn extract_prompt(
    chosen: Turns,
    rejected: Turns,
    columns: &Columns,
) -> std::result::Result<RawPair, Invalid> {
    match (chosen, rejected) {
        (Turns::Messages(chosen), Turns::Messages(rejected)) => {
            let shared = chosen
                .iter()
                .zip(&rejected)
                .take_while(|(c, r)| c == r)
                .count();
            Ok(RawPair {
                prompt: Turns::Messages(chosen[..shared].to_vec()),
                chosen: Turns::Messages(chosen[shared..].to_vec()),
                rejected: Turns::Messages(rejected[shared..].to_vec()),
            })
        }
        (Turns::Text(chosen), Turns::Text(rejected)) => {
            let mut shared = chosen
                .char_indices()
                .zip(rejected.chars())
                .find(|((_, c), r)| c != r)
                .map(|((i, _), _)| i)
                .unwrap_or_else(|| chosen.len().min(rejected.len()));
            if shared > 0 && chosen[..shared].ends_with(' ') {
                shared -= 1;
            }
            Ok(RawPair {
                prompt: Turns::Text(chosen[..shared].to_string()),
                chosen: Turns::Text(chosen[shared..].to_string()),
                rejected: Turns::Text(rejected[shared..].to_string()),
            })
        }
        _ => Err(invalid(
            columns.rejected.as_str(),
            "chosen and rejected must both be text or both be messages",
        )),
    }
}

/// A JSON value's kind, for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn implicit_text_prompt_keeps_the_space_with_the_completions() {
        let record = json!({"chosen": "The sky is blue.", "rejected": "The sky is green."});
        let pair = normalize(&record, Format::ImplicitPrompt, &Columns::default()).unwrap();
        assert_eq!(pair.prompt, Turns::Text("The sky is".into()));
        assert_eq!(pair.chosen, Turns::Text(" blue.".into()));
        assert_eq!(pair.rejected, Turns::Text(" green.".into()));
    }

    #[test]
    fn detect_tells_the_four_formats_apart() {
        let columns = Columns::default();
        let standard = json!({"prompt": "p", "chosen": "a", "rejected": "b"});
        let conversational = json!({"prompt": [], "chosen": [], "rejected": []});
        let implicit = json!({"chosen": [], "rejected": []});
        let sharegpt = json!({"conversations": [], "chosen": {}, "rejected": {}});
        assert_eq!(detect(&standard, &columns), Some(Format::Standard));
        assert_eq!(
            detect(&conversational, &columns),
            Some(Format::Conversational)
        );
        assert_eq!(detect(&implicit, &columns), Some(Format::ImplicitPrompt));
        assert_eq!(detect(&sharegpt, &columns), Some(Format::ShareGpt));
    }

    #[test]
    fn a_missing_message_field_is_named_with_its_path() {
        let record = json!({"conversations": [{"from": "human"}], "chosen": {}, "rejected": {}});
        let err = normalize(&record, Format::ShareGpt, &Columns::default()).unwrap_err();
        assert_eq!(err.field, "conversations[0].value");
    }
}
