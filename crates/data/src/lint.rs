//! Checks of prepared training data against the runs users most often lose: a model that never
//! stops because its end token was cut by `max_length` or is not one generation stops on, a chat
//! prompt that differs from the training prompt, records that teach nothing.

use crate::format::{Conversation, Role};
use crate::prepare::{ChatTokenizer, Prepared, SkipReason};
use crate::template::{PromptStyle, Template};
use crate::IGNORE_INDEX;

/// What the lint found. Record numbers are 0-based positions in the data file.
#[derive(Debug, Clone, Default)]
pub struct Lint {
    /// The token that ends a supervised answer (`seed`: the pad token the tutorial appends;
    /// `qwen`: `<|im_end|>`), and its text.
    pub end_token: (u32, String),
    /// The ids generation stops on (`generation_config.json`'s `eos_token_id`).
    pub eos_token_id: Vec<u32>,
    /// Used records whose last answer lost its end token to `max_length`.
    pub end_cut: Vec<usize>,
    /// Records with nothing to supervise (every answer token cut, or no assistant turn).
    pub unsupervised: Vec<(usize, SkipReason)>,
    /// Records whose training prompt (up to the final answer) differs from what `chat` renders for
    /// the same conversation, with the first differing token position.
    pub prompt_mismatch: Vec<(usize, usize)>,
    /// How many records the prompt comparison covered.
    pub prompts_compared: usize,
}

/// At most this many records get the (tokenizing) prompt comparison.
const PROMPTS_COMPARED: usize = 256;

impl Lint {
    /// Runs every check.
    pub fn run(
        conversations: &[Conversation],
        prepared: &Prepared,
        tok: &ChatTokenizer,
        style: &PromptStyle,
        eos_token_id: &[u32],
    ) -> Lint {
        let end_id = match style.template {
            Template::Seed => Some(tok.pad_token_id),
            Template::Qwen => tok.tokenizer.token_to_id("<|im_end|>"),
        };
        let end_id = end_id.unwrap_or(tok.pad_token_id);
        let end_text = tok.tokenizer.id_to_token(end_id).unwrap_or_default();
        let mut lint = Lint {
            end_token: (end_id, end_text),
            eos_token_id: eos_token_id.to_vec(),
            unsupervised: prepared.skipped_index.clone(),
            ..Lint::default()
        };
        for (ex, &record) in prepared.examples.iter().zip(&prepared.source_index) {
            let last_supervised = ex.labels.iter().rev().find(|&&l| l != IGNORE_INDEX);
            if last_supervised != Some(&i64::from(end_id)) {
                lint.end_cut.push(record);
            }
        }
        for (ex, &record) in prepared
            .examples
            .iter()
            .zip(&prepared.source_index)
            .take(PROMPTS_COMPARED)
        {
            let conv = &conversations[record];
            let Some((last, history)) = conv.messages.split_last() else {
                continue;
            };
            if last.role != Role::Assistant {
                continue;
            }
            let text = Template::Qwen.render_prompt(history, &style.system);
            let Ok(enc) = tok.tokenizer.encode_fast(text.as_str(), false) else {
                continue;
            };
            let chat = enc.get_ids();
            lint.prompts_compared += 1;
            // The training sequence must begin with chat's prompt, and its answer start there.
            let n = chat.len().min(ex.input_ids.len());
            let first_diff = (0..n).find(|&i| chat[i] != ex.input_ids[i]);
            let answer_starts = ex.labels.get(chat.len()).is_none_or(|&l| l != IGNORE_INDEX);
            match first_diff {
                Some(i) => lint.prompt_mismatch.push((record, i)),
                None if !answer_starts => lint.prompt_mismatch.push((record, chat.len())),
                None => {}
            }
        }
        lint
    }

    /// One line per problem found (empty: clean), each naming the records and what to change.
    pub fn problems(&self, max_length: usize) -> Vec<String> {
        let mut out = Vec::new();
        let (end_id, end_text) = &self.end_token;
        if !self.end_cut.is_empty() {
            out.push(format!(
                "{} records lose their end token {end_text:?} to --max-length {max_length} (records {}): \
                 a model trained on them learns answers that do not stop; raise --max-length or \
                 shorten those records",
                self.end_cut.len(),
                list(self.end_cut.iter().copied())
            ));
        }
        if !self.eos_token_id.is_empty() && !self.eos_token_id.contains(end_id) {
            out.push(format!(
                "answers end with {end_text:?} (id {end_id}) but generation stops on ids {:?} \
                 (generation_config.json's eos_token_id): the tuned model will not stop; use the \
                 template whose end token is one of them, or add {end_id} to eos_token_id",
                self.eos_token_id
            ));
        }
        if !self.unsupervised.is_empty() {
            out.push(format!(
                "{} records have no supervised token and are skipped (records {}): every answer \
                 token beyond --max-length {max_length}, or no assistant turn",
                self.unsupervised.len(),
                list(self.unsupervised.iter().map(|r| r.0))
            ));
        }
        if !self.prompt_mismatch.is_empty() {
            out.push(format!(
                "{} of {} records are tokenized for training differently from how chat renders the \
                 same conversation (records {}, first difference at token {}): the tuned model \
                 would be prompted unlike it was trained",
                self.prompt_mismatch.len(),
                self.prompts_compared,
                list(self.prompt_mismatch.iter().map(|r| r.0)),
                self.prompt_mismatch[0].1
            ));
        }
        out
    }
}

/// `3, 17, 40` or `3, 17, 40, … (+12 more)`.
fn list(records: impl Iterator<Item = usize>) -> String {
    let all: Vec<usize> = records.collect();
    let shown: Vec<String> = all.iter().take(10).map(|r| r.to_string()).collect();
    if all.len() > 10 {
        format!("{}, … (+{} more)", shown.join(", "), all.len() - 10)
    } else {
        shown.join(", ")
    }
}
