//! Reading instruction and chat datasets into [`Conversation`]s.
//!
//! Mirrors the three layouts LLaMA-Factory and the HF ecosystem call alpaca, sharegpt and
//! (OpenAI-style) messages, in a JSON array or in JSONL (one object per line; blank lines are
//! allowed and are not records). Unlike LLaMA-Factory, nothing is dropped silently: a malformed
//! line, a missing or non-string field or an unknown role is an error naming the record and field.

use std::path::Path;
use std::str::FromStr;

use serde::de::{SeqAccess, Visitor};
use serde::Deserializer as _;
use serde_json::{Map, Value};

use crate::error::{DataError, Location, Result};

/// Who speaks a turn. Tool and function turns are not supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role name ChatML writes after `<|im_start|>`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    /// The text, exactly as in the file (nothing trimmed).
    pub content: String,
}

/// One training record as turns; a system prompt, if any, is the first message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

/// The record layout of a dataset file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{instruction, input?, output, system?, history?: [[user, assistant], ...]}`; the user turn
    /// is `instruction + input` with no separator, as in the tutorial's `process_func`.
    Alpaca,
    /// `{conversations: [{from, value}]}` with `from` in system, human/user, gpt/assistant.
    ShareGpt,
    /// `{messages: [{role, content}]}` with `role` in system, user, assistant.
    Messages,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Alpaca => "alpaca",
            Format::ShareGpt => "sharegpt",
            Format::Messages => "messages",
        }
    }

    /// The format a record's keys announce, if any.
    fn detect(obj: &Map<String, Value>) -> Option<Format> {
        if obj.contains_key("conversations") {
            Some(Format::ShareGpt)
        } else if obj.contains_key("messages") {
            Some(Format::Messages)
        } else if obj.contains_key("instruction") {
            Some(Format::Alpaca)
        } else {
            None
        }
    }
}

impl FromStr for Format {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "alpaca" => Ok(Format::Alpaca),
            "sharegpt" => Ok(Format::ShareGpt),
            "messages" | "openai" => Ok(Format::Messages),
            _ => Err(DataError::BadOption {
                what: "format",
                got: s.to_string(),
                expected: "alpaca, sharegpt, messages",
            }),
        }
    }
}

/// A dataset file read into conversations, in file order.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The format detected (or given).
    pub format: Format,
    /// One per record, in file order.
    pub conversations: Vec<Conversation>,
}

/// Reads `path` (JSON array or JSONL), detecting the record format from the first record unless
/// `format` is given. Every record must then be of that format.
pub fn load_dataset(path: &Path, format: Option<Format>) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_dataset(&text, path, format)
}

/// [`load_dataset`] on text already in memory; `path` is only used in messages.
pub fn parse_dataset(text: &str, path: &Path, format: Option<Format>) -> Result<Dataset> {
    let records = read_records(text, path)?;
    if records.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    let (at0, first) = &records[0];
    let format = match format {
        Some(f) => f,
        None => {
            let obj = as_object(first, path, *at0)?;
            Format::detect(obj).ok_or_else(|| DataError::UnknownFormat {
                path: path.to_path_buf(),
                at: *at0,
            })?
        }
    };
    let conversations = records
        .iter()
        .map(|(at, v)| {
            let cx = Cx { path, at: *at };
            let obj = as_object(v, path, *at)?;
            match format {
                Format::Alpaca => cx.alpaca(obj),
                Format::ShareGpt => cx.turns(obj, "conversations", "from", "value", format),
                Format::Messages => cx.turns(obj, "messages", "role", "content", format),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Dataset {
        format,
        conversations,
    })
}

/// Splits the file into raw JSON records with their locations.
fn read_records(text: &str, path: &Path) -> Result<Vec<(Location, Value)>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim_start().starts_with('[') {
        return read_array(text, path);
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = Location {
            index: out.len(),
            line: Some(i + 1),
        };
        let v = serde_json::from_str(line).map_err(|e| DataError::Malformed {
            path: path.to_path_buf(),
            at,
            line: i + 1,
            column: e.column(),
            reason: e.to_string(),
        })?;
        out.push((at, v));
    }
    Ok(out)
}

/// A JSON array, parsed element by element so a syntax error can name the record it is in.
fn read_array(text: &str, path: &Path) -> Result<Vec<(Location, Value)>> {
    struct Counting<'a>(&'a std::cell::Cell<usize>);
    impl<'de> Visitor<'de> for Counting<'_> {
        type Value = Vec<Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON array of records")
        }
        fn visit_seq<A: SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> std::result::Result<Vec<Value>, A::Error> {
            let mut v = Vec::new();
            while let Some(x) = seq.next_element()? {
                v.push(x);
                self.0.set(v.len());
            }
            Ok(v)
        }
    }
    let count = std::cell::Cell::new(0);
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = de
        .deserialize_seq(Counting(&count))
        .and_then(|v| de.end().map(|_| v));
    match parsed {
        Ok(v) => Ok(v
            .into_iter()
            .enumerate()
            .map(|(index, v)| (Location { index, line: None }, v))
            .collect()),
        Err(e) => Err(DataError::Malformed {
            path: path.to_path_buf(),
            at: Location {
                index: count.get(),
                line: None,
            },
            line: e.line(),
            column: e.column(),
            reason: e.to_string(),
        }),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn as_object<'v>(v: &'v Value, path: &Path, at: Location) -> Result<&'v Map<String, Value>> {
    v.as_object().ok_or_else(|| DataError::WrongType {
        path: path.to_path_buf(),
        at,
        field: "(record)".into(),
        expected: "a JSON object",
        got: type_name(v),
    })
}

/// The record being read, for error messages.
struct Cx<'a> {
    path: &'a Path,
    at: Location,
}

impl Cx<'_> {
    fn missing(&self, field: &str, format: Format) -> DataError {
        DataError::MissingField {
            path: self.path.to_path_buf(),
            at: self.at,
            field: field.to_string(),
            format: format.name(),
        }
    }

    fn wrong(&self, field: &str, expected: &'static str, got: &Value) -> DataError {
        DataError::WrongType {
            path: self.path.to_path_buf(),
            at: self.at,
            field: field.to_string(),
            expected,
            got: type_name(got),
        }
    }

    fn string(&self, v: &Value, field: &str) -> Result<String> {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| self.wrong(field, "a string", v))
    }

    fn required(&self, obj: &Map<String, Value>, field: &str, format: Format) -> Result<String> {
        let v = obj.get(field).ok_or_else(|| self.missing(field, format))?;
        self.string(v, field)
    }

    /// An optional string field: absent is `None`; present but not a string (null included) is an
    /// error, so a typo in the data is not read as "no value".
    fn optional(&self, obj: &Map<String, Value>, field: &str) -> Result<Option<String>> {
        obj.get(field).map(|v| self.string(v, field)).transpose()
    }

    fn alpaca(&self, obj: &Map<String, Value>) -> Result<Conversation> {
        let f = Format::Alpaca;
        let instruction = self.required(obj, "instruction", f)?;
        let input = self.optional(obj, "input")?.unwrap_or_default();
        let output = self.required(obj, "output", f)?;
        let mut messages = Vec::new();
        // An empty system counts as absent (many alpaca files carry `"system": ""`), so the
        // template's default applies.
        if let Some(system) = self.optional(obj, "system")?.filter(|s| !s.is_empty()) {
            messages.push(Message {
                role: Role::System,
                content: system,
            });
        }
        if let Some(history) = obj.get("history") {
            let turns = history.as_array().ok_or_else(|| {
                self.wrong("history", "an array of [user, assistant] pairs", history)
            })?;
            for (i, pair) in turns.iter().enumerate() {
                let field = format!("history[{i}]");
                let pair = pair.as_array().filter(|p| p.len() == 2).ok_or_else(|| {
                    self.wrong(&field, "a [user, assistant] pair of strings", pair)
                })?;
                messages.push(Message {
                    role: Role::User,
                    content: self.string(&pair[0], &format!("{field}[0]"))?,
                });
                messages.push(Message {
                    role: Role::Assistant,
                    content: self.string(&pair[1], &format!("{field}[1]"))?,
                });
            }
        }
        // The tutorial's `example['instruction'] + example['input']`: no separator.
        messages.push(Message {
            role: Role::User,
            content: instruction + &input,
        });
        messages.push(Message {
            role: Role::Assistant,
            content: output,
        });
        Ok(Conversation { messages })
    }

    /// sharegpt (`conversations`, `from`, `value`) and messages (`messages`, `role`, `content`).
    fn turns(
        &self,
        obj: &Map<String, Value>,
        list: &str,
        role_key: &str,
        content_key: &str,
        format: Format,
    ) -> Result<Conversation> {
        let v = obj.get(list).ok_or_else(|| self.missing(list, format))?;
        let items = v
            .as_array()
            .ok_or_else(|| self.wrong(list, "an array of turns", v))?;
        if items.is_empty() {
            return Err(DataError::NoMessages {
                path: self.path.to_path_buf(),
                at: self.at,
            });
        }
        let (allowed, sharegpt) = match format {
            Format::ShareGpt => ("system, human, user, gpt, assistant", true),
            _ => ("system, user, assistant", false),
        };
        let mut messages = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let here = format!("{list}[{i}]");
            let turn = item
                .as_object()
                .ok_or_else(|| self.wrong(&here, "an object", item))?;
            let role_field = format!("{here}.{role_key}");
            let content_field = format!("{here}.{content_key}");
            let role_v = turn
                .get(role_key)
                .ok_or_else(|| self.missing(&role_field, format))?;
            let role_s = self.string(role_v, &role_field)?;
            let role = match (role_s.as_str(), sharegpt) {
                ("system", _) => Role::System,
                ("user", _) | ("human", true) => Role::User,
                ("assistant", _) | ("gpt", true) => Role::Assistant,
                _ => {
                    return Err(DataError::UnknownRole {
                        path: self.path.to_path_buf(),
                        at: self.at,
                        field: role_field,
                        role: role_s,
                        allowed,
                    })
                }
            };
            let content_v = turn
                .get(content_key)
                .ok_or_else(|| self.missing(&content_field, format))?;
            messages.push(Message {
                role,
                content: self.string(content_v, &content_field)?,
            });
        }
        Ok(Conversation { messages })
    }
}
