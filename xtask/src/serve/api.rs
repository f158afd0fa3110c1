//! The OpenAI Chat Completions request as the server reads it: parsing and checking, each problem
//! an [`ApiError`] naming the request field, with OpenAI's error body and status.

use serde::Deserialize;
use serde_json::{json, Value};

/// An error answered with OpenAI's body `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 `invalid_request_error` about `param`.
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    pub fn new(status: u16, kind: &'static str, code: &'static str, message: String) -> Self {
        Self {
            status,
            message,
            kind,
            param: None,
            code: Some(code),
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// Most stop strings a request may carry, and their longest length in bytes.
pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;

/// A chat message after checking: its role (`system`, `user` or `assistant`) and its text.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: lora_data::Role,
    pub content: String,
}

/// A checked request. `None` fields take the model's defaults (its `generation_config.json`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM's extension: keep generating past end-of-sequence tokens (for benchmarks).
    pub ignore_eos: bool,
}

/// The fields read; everything else a client sends (`user`, `presence_penalty` 0, ...) is ignored
/// as OpenAI-compatible servers do, except the ones below whose effect cannot be honoured.
#[derive(Deserialize)]
struct Raw {
    model: Option<Value>,
    messages: Option<Value>,
    max_tokens: Option<Value>,
    max_completion_tokens: Option<Value>,
    temperature: Option<Value>,
    top_p: Option<Value>,
    top_k: Option<Value>,
    repetition_penalty: Option<Value>,
    seed: Option<Value>,
    stop: Option<Value>,
    stream: Option<Value>,
    stream_options: Option<Value>,
    n: Option<Value>,
    logprobs: Option<Value>,
    tools: Option<Value>,
    response_format: Option<Value>,
    ignore_eos: Option<Value>,
}

/// Parses and checks a request body.
pub fn parse(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("body", format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad(
            "body",
            "the request body must be a JSON object",
        ));
    }
    let raw: Raw = serde_json::from_value(v).map_err(|e| ApiError::bad("body", e.to_string()))?;
    let model = match raw.model {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(ApiError::bad(
                "model",
                "`model` is required: a name from GET /v1/models",
            ))
        }
        Some(other) => {
            return Err(ApiError::bad(
                "model",
                format!("`model` must be a string, got {other}"),
            ))
        }
    };
    let messages = messages(raw.messages)?;
    if let Some(n) = raw.n.filter(|v| !v.is_null()) {
        if n.as_u64() != Some(1) {
            return Err(ApiError::bad(
                "n",
                format!("`n` {n} is not supported: this server returns one choice (n = 1)"),
            ));
        }
    }
    if raw.logprobs.as_ref().and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::bad("logprobs", "`logprobs` is not supported"));
    }
    if raw
        .tools
        .as_ref()
        .is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApiError::bad(
            "tools",
            "`tools` (function calling) is not supported",
        ));
    }
    if let Some(rf) = raw.response_format.filter(|v| !v.is_null()) {
        if rf.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::bad(
                "response_format",
                "only `response_format` {\"type\": \"text\"} is supported",
            ));
        }
    }
    let max_tokens = match (
        raw.max_completion_tokens.filter(|v| !v.is_null()),
        raw.max_tokens.filter(|v| !v.is_null()),
    ) {
        (Some(v), _) => Some(positive("max_completion_tokens", &v)?),
        (None, Some(v)) => Some(positive("max_tokens", &v)?),
        (None, None) => None,
    };
    let temperature = number(
        "temperature",
        raw.temperature,
        |t| (0.0..=2.0).contains(&t),
        "a number in [0, 2] (0 is greedy)",
    )?;
    let top_p = number(
        "top_p",
        raw.top_p,
        |p| p > 0.0 && p <= 1.0,
        "a number in (0, 1]",
    )?;
    let repetition_penalty = number(
        "repetition_penalty",
        raw.repetition_penalty,
        |p| p > 0.0 && p <= 10.0,
        "a number in (0, 10]",
    )?;
    let top_k = match raw.top_k.filter(|v| !v.is_null()) {
        None => None,
        // vLLM's convention: -1 (or 0) disables it.
        Some(v) => match v.as_i64() {
            Some(k) if k <= 0 => Some(0),
            Some(k) => Some(k as usize),
            None => {
                return Err(ApiError::bad(
                    "top_k",
                    format!("`top_k` must be an integer, got {v}"),
                ))
            }
        },
    };
    let seed = match raw.seed.filter(|v| !v.is_null()) {
        None => None,
        Some(v) => match v.as_u64() {
            Some(s) => Some(s),
            None => match v.as_i64() {
                // OpenAI's seed is a signed 64-bit integer: its two's complement bits.
                Some(s) => Some(s as u64),
                None => {
                    return Err(ApiError::bad(
                        "seed",
                        format!("`seed` must be an integer, got {v}"),
                    ))
                }
            },
        },
    };
    let stop = stops(raw.stop)?;
    let stream = match raw.stream {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(v) => {
            return Err(ApiError::bad(
                "stream",
                format!("`stream` must be true or false, got {v}"),
            ))
        }
    };
    let include_usage = raw
        .stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let ignore_eos = match raw.ignore_eos {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(v) => {
            return Err(ApiError::bad(
                "ignore_eos",
                format!("`ignore_eos` must be true or false, got {v}"),
            ))
        }
    };
    Ok(ChatRequest {
        ignore_eos,
        model,
        messages,
        max_tokens,
        temperature,
        top_p,
        top_k,
        repetition_penalty,
        seed,
        stop,
        stream,
        include_usage,
    })
}

fn messages(v: Option<Value>) -> Result<Vec<ChatMessage>, ApiError> {
    use lora_data::Role;
    let list = match v {
        Some(Value::Array(a)) => a,
        None | Some(Value::Null) => {
            return Err(ApiError::bad(
                "messages",
                "`messages` is required: a list of {role, content}",
            ))
        }
        Some(other) => {
            return Err(ApiError::bad(
                "messages",
                format!("`messages` must be a list, got {}", kind(&other)),
            ))
        }
    };
    if list.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "`messages` is empty: send at least one message",
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let Some(obj) = m.as_object() else {
                return Err(ApiError::bad(&param, format!("{param} must be an object {{role, content}}")));
            };
            let role = match obj.get("role").and_then(Value::as_str) {
                Some("system") | Some("developer") => Role::System,
                Some("user") => Role::User,
                Some("assistant") => Role::Assistant,
                Some(r) => {
                    return Err(ApiError::bad(
                        &format!("{param}.role"),
                        format!("{param}.role {r:?} is not supported: use system, user or assistant"),
                    ))
                }
                None => return Err(ApiError::bad(&format!("{param}.role"), format!("{param}.role is required (a string)"))),
            };
            let content = match obj.get("content") {
                Some(Value::String(s)) => s.clone(),
                // The parts form: only text parts.
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::bad(
                                    &format!("{param}.content[{j}]"),
                                    format!("{param}.content[{j}]: only {{\"type\": \"text\", \"text\": ...}} parts are supported"),
                                ))
                            }
                        }
                    }
                    text
                }
                // An assistant turn that only called tools has no content.
                Some(Value::Null) | None if role == Role::Assistant => String::new(),
                _ => {
                    return Err(ApiError::bad(
                        &format!("{param}.content"),
                        format!("{param}.content must be a string"),
                    ))
                }
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

fn positive(param: &str, v: &Value) -> Result<usize, ApiError> {
    match v.as_i64() {
        Some(n) if n >= 1 => Ok(n as usize),
        _ => Err(ApiError::bad(
            param,
            format!("`{param}` must be an integer >= 1, got {v}"),
        )),
    }
}

fn number(
    param: &str,
    v: Option<Value>,
    ok: impl Fn(f32) -> bool,
    rule: &str,
) -> Result<Option<f32>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && ok(x as f32) => Ok(Some(x as f32)),
            _ => Err(ApiError::bad(
                param,
                format!("`{param}` must be {rule}, got {v}"),
            )),
        },
    }
}

fn stops(v: Option<Value>) -> Result<Vec<String>, ApiError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![Value::String(s)],
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(ApiError::bad(
                "stop",
                format!(
                    "`stop` must be a string or a list of strings, got {}",
                    kind(&other)
                ),
            ))
        }
    };
    if list.len() > MAX_STOPS {
        return Err(ApiError::bad(
            "stop",
            format!(
                "`stop` has {} strings; at most {MAX_STOPS} are allowed",
                list.len()
            ),
        ));
    }
    list.into_iter()
        .map(|s| match s {
            Value::String(s) if s.is_empty() => {
                Err(ApiError::bad("stop", "`stop` strings must not be empty"))
            }
            Value::String(s) if s.len() > MAX_STOP_BYTES => Err(ApiError::bad(
                "stop",
                format!(
                    "a `stop` string is {} bytes; at most {MAX_STOP_BYTES} are allowed",
                    s.len()
                ),
            )),
            Value::String(s) => Ok(s),
            other => Err(ApiError::bad(
                "stop",
                format!("`stop` must hold strings, got {}", kind(&other)),
            )),
        })
        .collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
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

    fn err(body: &str) -> ApiError {
        parse(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn good_requests_parse() {
        let r = parse(
            br#"{"model": "m", "messages": [{"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 5, "temperature": 0, "stop": "x", "stream": true, "seed": -1,
            "stream_options": {"include_usage": true}, "user": "ignored", "n": 1}"#,
        )
        .unwrap();
        assert_eq!(r.messages.len(), 2);
        assert_eq!(r.messages[1].content, "hi");
        assert_eq!(
            (r.max_tokens, r.temperature, r.seed),
            (Some(5), Some(0.0), Some(u64::MAX))
        );
        assert_eq!(r.stop, vec!["x"]);
        assert!(r.stream && r.include_usage);
        let r = parse(br#"{"model": "m", "messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 3, "max_tokens": 9}"#).unwrap();
        assert_eq!(r.max_tokens, Some(3));
    }

    #[test]
    fn bad_requests_name_their_field() {
        for (body, param) in [
            ("{", "body"),
            ("[1]", "body"),
            (r#"{"messages": []}"#, "model"),
            (r#"{"model": "m"}"#, "messages"),
            (r#"{"model": "m", "messages": []}"#, "messages"),
            (r#"{"model": "m", "messages": "hi"}"#, "messages"),
            (
                r#"{"model": "m", "messages": [{"role": "tool", "content": "x"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": 3}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "a"}], "max_tokens": 0}"#,
                "max_tokens",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "a"}], "max_tokens": "5"}"#,
                "max_tokens",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "a"}], "temperature": -1}"#,
                "temperature",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "a"}], "top_p": 0}"#,
                "top_p",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "a"}], "n": 2}"#,
                "n",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "a"}], "stream": "yes"}"#,
                "stream",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "a"}], "stop": 5}"#,
                "stop",
            ),
        ] {
            let e = err(body);
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
        }
        let many: Vec<String> = (0..MAX_STOPS + 1).map(|i| format!("s{i}")).collect();
        let body =
            json!({"model": "m", "messages": [{"role": "user", "content": "a"}], "stop": many});
        assert_eq!(err(&body.to_string()).param.as_deref(), Some("stop"));
    }
}
