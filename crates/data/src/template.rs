//! ChatML templates that turn a [`Conversation`] into token ids and labels.
//!
//! - [`Template::Seed`] mirrors the self-llm Qwen2.5 LoRA tutorial's `process_func` exactly: the
//!   prompt and the response are tokenized separately (`add_special_tokens=False`) and one pad token
//!   (`<|endoftext|>`) is appended to ids and labels. Multi-turn records generalise it: earlier turns
//!   go into the prompt in ChatML, only the last assistant turn is the response.
//! - [`Template::Qwen`] mirrors Qwen2.5's own `chat_template` (tokenizer_config.json, no tools): the
//!   whole rendering is tokenized at once, as `apply_chat_template` does; every assistant turn's
//!   content and its `<|im_end|>` are supervised, the `"\n"` after `<|im_end|>` is not (generation
//!   stops at `<|im_end|>`, so the model never has to produce it).
//!
//! Labels are set by position (byte spans of the rendered text mapped through the tokenizer's
//! offsets, as transformers' `return_assistant_tokens_mask` does with `char_to_token`), never by
//! comparing token values.

use std::str::FromStr;

use crate::error::{DataError, Result};
use crate::format::{Conversation, Role};
use crate::Example;

/// The label value the loss ignores (PyTorch's `CrossEntropyLoss` `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// The tutorial's system prompt, the default for [`Template::Seed`].
pub const SEED_DEFAULT_SYSTEM: &str = "现在你要扮演皇帝身边的女人--甄嬛";

/// Qwen2.5's template default, used when a conversation has no system message.
pub const QWEN_DEFAULT_SYSTEM: &str =
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Template {
    /// The tutorial's `process_func`: answers end with `<|endoftext|>` (the pad token), not
    /// `<|im_end|>`, so a model trained with it does not stop where Qwen's chat template expects.
    Seed,
    /// Qwen2.5's chat template; answers end with `<|im_end|>`. The recommended default.
    #[default]
    Qwen,
}

impl Template {
    pub fn name(self) -> &'static str {
        match self {
            Template::Seed => "seed",
            Template::Qwen => "qwen",
        }
    }

    pub fn default_system(self) -> &'static str {
        match self {
            Template::Seed => SEED_DEFAULT_SYSTEM,
            Template::Qwen => QWEN_DEFAULT_SYSTEM,
        }
    }
}

impl FromStr for Template {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "seed" => Ok(Template::Seed),
            "qwen" => Ok(Template::Qwen),
            _ => Err(DataError::BadOption {
                what: "template",
                got: s.to_string(),
                expected: "seed, qwen",
            }),
        }
    }
}

/// Encodes one conversation without truncation. `None`: nothing to supervise (no assistant turn
/// for `qwen`, no final assistant turn for `seed`).
pub(crate) fn encode(
    tok: &tokenizers::Tokenizer,
    pad_id: u32,
    template: Template,
    system: &str,
    conv: &Conversation,
    index: usize,
) -> Result<Option<Example>> {
    let enc_err = |e: tokenizers::Error| DataError::Encode {
        index,
        reason: e.to_string(),
    };
    let (system, body) = match conv.messages.first() {
        Some(m) if m.role == Role::System => (m.content.as_str(), &conv.messages[1..]),
        _ => (system, &conv.messages[..]),
    };
    let mut text = format!("<|im_start|>system\n{system}<|im_end|>\n");
    match template {
        Template::Seed => {
            let Some((last, earlier)) = body.split_last() else {
                return Ok(None);
            };
            if last.role != Role::Assistant {
                return Ok(None);
            }
            for m in earlier {
                push_turn(&mut text, m.role, &m.content);
            }
            text.push_str("<|im_start|>assistant\n");
            let prompt = tok.encode_fast(text.as_str(), false).map_err(enc_err)?;
            let response = tok
                .encode_fast(last.content.as_str(), false)
                .map_err(enc_err)?;
            let (p, r) = (prompt.get_ids(), response.get_ids());
            let mut input_ids = Vec::with_capacity(p.len() + r.len() + 1);
            input_ids.extend_from_slice(p);
            input_ids.extend_from_slice(r);
            input_ids.push(pad_id);
            let mut labels = vec![IGNORE_INDEX; p.len()];
            labels.extend(r.iter().map(|&t| i64::from(t)));
            labels.push(i64::from(pad_id));
            let attention_mask = vec![1; input_ids.len()];
            Ok(Some(Example {
                input_ids,
                labels,
                attention_mask,
            }))
        }
        Template::Qwen => {
            // Byte spans [start, end) of each assistant content + `<|im_end|>`.
            let mut spans = Vec::new();
            for m in body {
                if m.role == Role::Assistant {
                    text.push_str("<|im_start|>assistant\n");
                    let start = text.len();
                    text.push_str(&m.content);
                    text.push_str("<|im_end|>");
                    spans.push((start, text.len()));
                    text.push('\n');
                } else {
                    push_turn(&mut text, m.role, &m.content);
                }
            }
            if spans.is_empty() {
                return Ok(None);
            }
            let enc = tok.encode(text.as_str(), false).map_err(enc_err)?;
            let ids = enc.get_ids();
            // Offsets are byte offsets into `text` (tokenizers' default `OffsetType::Byte`). A token
            // that overlaps a span is supervised; both lists are sorted, so one forward walk.
            let mut labels = vec![IGNORE_INDEX; ids.len()];
            let mut s = 0;
            for (i, &(a, b)) in enc.get_offsets().iter().enumerate() {
                while s < spans.len() && spans[s].1 <= a {
                    s += 1;
                }
                let Some(&(start, end)) = spans.get(s) else {
                    break;
                };
                let overlaps = if a == b {
                    start <= a && a < end
                } else {
                    a < end && b > start
                };
                if overlaps {
                    labels[i] = i64::from(ids[i]);
                }
            }
            Ok(Some(Example {
                input_ids: ids.to_vec(),
                labels,
                attention_mask: vec![1; ids.len()],
            }))
        }
    }
}

fn push_turn(text: &mut String, role: Role, content: &str) {
    text.push_str("<|im_start|>");
    text.push_str(role.as_str());
    text.push('\n');
    text.push_str(content);
    text.push_str("<|im_end|>\n");
}
