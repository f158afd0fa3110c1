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
use crate::format::{Conversation, Message, Role};
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
    /// The default of every command (see [`PromptStyle`]).
    #[default]
    Seed,
    /// Qwen2.5's chat template; answers end with `<|im_end|>`. Recommended for a model you will
    /// chat with.
    Qwen,
}

/// The template and system prompt a command uses, by one rule for every command (`finetune`,
/// `prepare`, `eval`, `chat`), so that the same data file gives the same tokens in each:
/// the template is `--template`, else [`Template::default`] (`seed`, the tutorial's); the system
/// prompt of records without their own is `--system`, else the template's own
/// ([`Template::default_system`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptStyle {
    /// The template.
    pub template: Template,
    /// The system prompt for conversations that carry none.
    pub system: String,
}

impl PromptStyle {
    /// The rule: `template` (a name; `None`: the default) and `system` (`None`: the template's own).
    pub fn resolve(template: Option<&str>, system: Option<&str>) -> Result<Self> {
        let template = template.map(str::parse).transpose()?.unwrap_or_default();
        Ok(Self::new(template, system))
    }

    /// [`PromptStyle::resolve`] for a parsed template.
    pub fn new(template: Template, system: Option<&str>) -> Self {
        Self {
            template,
            system: system.unwrap_or(template.default_system()).to_string(),
        }
    }
}

impl std::fmt::Display for PromptStyle {
    /// `template seed, system prompt "..."`: what every command prints before it starts.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "template {}, system prompt {:?}",
            self.template.name(),
            self.system
        )
    }
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

impl Template {
    /// The text of a prompt for generation, as Qwen2.5's `apply_chat_template(messages,
    /// add_generation_prompt=True)` renders it: a system block (the first message when it is a
    /// system message, else `default_system`), every turn in ChatML, then `<|im_start|>assistant\n`.
    /// Both templates render prompts alike; they differ only in how training answers end.
    pub fn render_prompt(self, messages: &[Message], default_system: &str) -> String {
        let mut text = String::new();
        let body = match messages.first() {
            Some(m) if m.role == Role::System => {
                push_turn(&mut text, Role::System, &m.content);
                &messages[1..]
            }
            _ => {
                push_turn(&mut text, Role::System, default_system);
                messages
            }
        };
        for m in body {
            push_turn(&mut text, m.role, &m.content);
        }
        text.push_str("<|im_start|>assistant\n");
        text
    }
}

/// Renders and tokenizes conversations with one template and default system prompt.
pub(crate) struct Encoder<'a> {
    tok: &'a tokenizers::Tokenizer,
    pad_id: u32,
    template: Template,
    system: &'a str,
    /// Ids of `<|im_start|>system\n{system}<|im_end|>\n`, the same for every record without its
    /// own system message. `None` when the tokenizer could merge across that boundary.
    prefix: Option<Vec<u32>>,
}

impl<'a> Encoder<'a> {
    pub(crate) fn new(
        tok: &'a tokenizers::Tokenizer,
        pad_id: u32,
        template: Template,
        system: &'a str,
    ) -> Result<Self> {
        // Tokenizing the system block once is exact when `<|im_start|>` and `<|im_end|>` are added
        // tokens that strip nothing around them: the text is split at added tokens before
        // normalization and pre-tokenization, so the pieces on either side never interact. It
        // saves a third of the work of `seed` on Huanhuan (22 of ~66 tokens per record).
        let added = tok.get_added_tokens_decoder();
        let splits_cleanly = ["<|im_start|>", "<|im_end|>"].iter().all(|t| {
            added.values().any(|a| {
                a.content == *t && !a.lstrip && !a.rstrip && !a.single_word && !a.normalized
            })
        });
        let prefix = if splits_cleanly {
            let text = format!("<|im_start|>system\n{system}<|im_end|>\n");
            let enc =
                tok.encode_fast(text.as_str(), false)
                    .map_err(|e| DataError::EncodeSystem {
                        reason: e.to_string(),
                    })?;
            Some(enc.get_ids().to_vec())
        } else {
            None
        };
        Ok(Self {
            tok,
            pad_id,
            template,
            system,
            prefix,
        })
    }

    /// Encodes one conversation without truncation. `None`: nothing to supervise (no assistant
    /// turn for `qwen`, no final assistant turn for `seed`).
    pub(crate) fn encode(&self, conv: &Conversation, index: usize) -> Result<Option<Example>> {
        let tok = self.tok;
        let enc_err = |e: tokenizers::Error| DataError::Encode {
            index,
            reason: e.to_string(),
        };
        // `ids` starts with the cached system block when it applies; `text` is what is left to
        // tokenize, and all byte spans below are relative to it.
        let (mut ids, mut text, body) = match (conv.messages.first(), &self.prefix) {
            (Some(m), _) if m.role == Role::System => (
                Vec::new(),
                format!("<|im_start|>system\n{}<|im_end|>\n", m.content),
                &conv.messages[1..],
            ),
            (_, Some(prefix)) => (prefix.clone(), String::new(), &conv.messages[..]),
            (_, None) => (
                Vec::new(),
                format!("<|im_start|>system\n{}<|im_end|>\n", self.system),
                &conv.messages[..],
            ),
        };
        match self.template {
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
                // No offsets needed: `encode_fast`.
                let prompt = tok.encode_fast(text.as_str(), false).map_err(enc_err)?;
                let response = tok
                    .encode_fast(last.content.as_str(), false)
                    .map_err(enc_err)?;
                ids.extend_from_slice(prompt.get_ids());
                let n_prompt = ids.len();
                let r = response.get_ids();
                ids.reserve(r.len() + 1);
                ids.extend_from_slice(r);
                ids.push(self.pad_id);
                let mut labels = vec![IGNORE_INDEX; n_prompt];
                labels.extend(r.iter().map(|&t| i64::from(t)));
                labels.push(i64::from(self.pad_id));
                let attention_mask = vec![1; ids.len()];
                Ok(Some(Example {
                    input_ids: ids,
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
                let n_prefix = ids.len();
                ids.extend_from_slice(enc.get_ids());
                // Offsets are byte offsets into `text` (tokenizers' default `OffsetType::Byte`).
                // A token that overlaps a span is supervised; both lists are sorted, so one walk.
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
                        labels[n_prefix + i] = i64::from(ids[n_prefix + i]);
                    }
                }
                let attention_mask = vec![1; ids.len()];
                Ok(Some(Example {
                    input_ids: ids,
                    labels,
                    attention_mask,
                }))
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use test_support::{fixtures, shared_data_or_skip};

    /// One rule for every command: `seed` by default, each template with its own system prompt,
    /// `--system` over either.
    #[test]
    fn prompt_style_rule() {
        let r = |t, s| PromptStyle::resolve(t, s).unwrap();
        assert_eq!(r(None, None), PromptStyle::new(Template::Seed, None));
        assert_eq!(r(None, None).system, SEED_DEFAULT_SYSTEM);
        assert_eq!(r(Some("qwen"), None).system, QWEN_DEFAULT_SYSTEM);
        assert_eq!(r(Some("seed"), None).system, SEED_DEFAULT_SYSTEM);
        assert_eq!(r(Some("qwen"), Some("S")).system, "S");
        assert_eq!(r(Some("qwen"), Some("S")).template, Template::Qwen);
        assert!(PromptStyle::resolve(Some("chatml"), None).is_err());
        assert_eq!(
            r(Some("qwen"), None).to_string(),
            format!("template qwen, system prompt {QWEN_DEFAULT_SYSTEM:?}")
        );
    }

    /// What Qwen2.5's chat template renders for a system + user + assistant + user history with
    /// `add_generation_prompt=True`, and its default system block when there is none.
    #[test]
    fn render_prompt_is_qwen_chat_template() {
        let m = |role, content: &str| Message {
            role,
            content: content.to_string(),
        };
        let msgs = [
            m(Role::System, "S"),
            m(Role::User, "你是谁？"),
            m(Role::Assistant, "A"),
            m(Role::User, "U2"),
        ];
        assert_eq!(
            Template::Qwen.render_prompt(&msgs, "ignored"),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n你是谁？<|im_end|>\n\
             <|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        assert_eq!(
            Template::Qwen.render_prompt(&msgs[1..2], QWEN_DEFAULT_SYSTEM),
            format!(
                "<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n你是谁？\
                 <|im_end|>\n<|im_start|>assistant\n"
            )
        );
    }

    /// The cached system block is used for Qwen2.5's tokenizer, and gives exactly the ids of
    /// tokenizing the whole rendering.
    #[test]
    fn cached_system_prefix_is_used_and_exact() {
        let Some(shared) = shared_data_or_skip("cached_system_prefix_is_used_and_exact") else {
            return;
        };
        let tok = crate::ChatTokenizer::load(&shared.join("qwen2.5-tokenizer")).unwrap();
        let ds = crate::load_dataset(&shared.join("huanhuan/huanhuan.json"), None).unwrap();
        let chats =
            crate::load_dataset(&fixtures().join("data/chat_messages.jsonl"), None).unwrap();
        for template in [Template::Seed, Template::Qwen] {
            let system = template.default_system();
            let cached = Encoder::new(&tok.tokenizer, tok.pad_token_id, template, system).unwrap();
            assert!(
                cached.prefix.is_some(),
                "Qwen2.5's ChatML tokens split cleanly"
            );
            let whole = Encoder {
                prefix: None,
                ..Encoder::new(&tok.tokenizer, tok.pad_token_id, template, system).unwrap()
            };
            let convs = ds
                .conversations
                .iter()
                .take(300)
                .chain(&chats.conversations);
            for (i, c) in convs.enumerate() {
                assert_eq!(
                    cached.encode(c, i).unwrap(),
                    whole.encode(c, i).unwrap(),
                    "record {i}"
                );
            }
        }
    }
}
