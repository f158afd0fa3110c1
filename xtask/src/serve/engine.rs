//! The decoding engine of `serve`: one thread owns the models and runs continuous batching.
//!
//! Each turn of its loop admits waiting requests (up to the slot limit; each one's prompt is
//! processed alone, so its first token comes as soon as that is done), then takes one decoding step
//! for every active sequence at once: the sequences of each model (the base, or the base with one
//! adapter) go through one batched forward (`Qwen2ForCausalLM::decode_rows`), each over its own
//! key/value cache. A request joins at the next step; a finished, stopped or abandoned one (its
//! client went away: the receiving end of its events is closed) leaves at the next step and frees
//! its slot and cache. On the CPU a sequence's logits do not depend on what else is in the batch,
//! so its tokens do not either.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use qwen2::{GenerationConfig, KvCache, Qwen2ForCausalLM, TokenSampler};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

/// Why a completion ended, as OpenAI's `finish_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` were produced.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the engine tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// More text of the answer.
    Text(String),
    /// The answer is complete.
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

/// A request ready to decode: its model, its prompt ids and its sampling settings.
pub struct Job {
    /// Index into the engine's models (0: the base).
    pub model: usize,
    pub prompt: Vec<u32>,
    /// Sampling settings, seed, `max_new_tokens` and the end-of-sequence ids.
    pub gen: GenerationConfig,
    /// Stop strings: the answer ends before the first of them (which is not returned).
    pub stop: Vec<String>,
    pub events: UnboundedSender<Event>,
}

/// Counters the HTTP side reads (for `/health` and the tests).
#[derive(Default, Debug)]
pub struct Stats {
    /// Sequences holding a slot now.
    pub active: AtomicUsize,
    /// Requests finished, stopped or abandoned since start.
    pub completed: AtomicUsize,
    /// Requests abandoned by their clients.
    pub abandoned: AtomicUsize,
    /// Batched decoding steps taken, and the rows they held (their ratio is the mean batch).
    pub steps: AtomicUsize,
    pub step_rows: AtomicUsize,
}

/// A sequence being decoded.
struct Seq<B: Backend> {
    job: Job,
    cache: KvCache<B>,
    sampler: TokenSampler,
    /// Prompt and generated ids (the repetition penalty's context).
    context: Vec<u32>,
    generated: Vec<u32>,
    /// Bytes of the answer's text already sent.
    sent: usize,
    done: bool,
}

/// The engine: models (base first, then the base with each adapter, sharing the base's weights),
/// the tokenizer, and the limits.
pub struct Engine<B: Backend> {
    pub models: Vec<Qwen2ForCausalLM<B>>,
    pub tokenizer: Arc<Tokenizer>,
    pub device: B::Device,
    /// At most this many sequences decode at once; the rest wait in the queue.
    pub max_num_seqs: usize,
    /// At most this many new prompts are processed between two decoding steps (so a burst of new
    /// requests does not stall the ones already streaming).
    pub max_prefills_per_step: usize,
    pub stats: Arc<Stats>,
}

impl<B: Backend> Engine<B> {
    /// Runs until every sender of `jobs` is gone and nothing is left to decode.
    pub fn run(self, jobs: Receiver<Job>) {
        let mut active: Vec<Seq<B>> = Vec::new();
        let mut open = true;
        loop {
            // Admit: block only when idle.
            let mut admitted = 0;
            while open && active.len() < self.max_num_seqs && admitted < self.max_prefills_per_step
            {
                let job = if active.is_empty() && admitted == 0 {
                    match jobs.recv() {
                        Ok(j) => j,
                        Err(_) => {
                            open = false;
                            break;
                        }
                    }
                } else {
                    match jobs.try_recv() {
                        Ok(j) => j,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                };
                admitted += 1;
                if job.events.is_closed() {
                    self.finished(true);
                    continue;
                }
                self.stats.active.fetch_add(1, Ordering::SeqCst);
                let seq = self.prefill(job);
                if seq.done {
                    self.finished(false);
                } else {
                    active.push(seq);
                }
            }
            if active.is_empty() {
                if open {
                    continue;
                }
                return;
            }
            self.step(&mut active);
            active.retain(|s| !s.done);
        }
    }

    /// Bookkeeping for a sequence that leaves.
    fn finished(&self, abandoned: bool) {
        self.stats.completed.fetch_add(1, Ordering::SeqCst);
        if abandoned {
            self.stats.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Processes a new request's prompt and picks its first token.
    fn prefill(&self, job: Job) -> Seq<B> {
        let model = &self.models[job.model];
        let mut cache = KvCache::new(model.model.layers.len());
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(
                job.prompt.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                [1, job.prompt.len()],
            ),
            &self.device,
        );
        let logits = model.forward_step_last(ids, &mut cache);
        let mut seq = Seq {
            sampler: TokenSampler::new(job.gen.clone()),
            context: job.prompt.clone(),
            job,
            cache,
            generated: Vec::new(),
            sent: 0,
            done: false,
        };
        let mut row = to_vec(logits);
        let t = seq.sampler.next_token(&mut row, &seq.context);
        self.push_token(&mut seq, t);
        seq
    }

    /// One decoding step for every active sequence, one batched forward per model.
    fn step(&self, active: &mut [Seq<B>]) {
        // Sequences whose client has gone leave without computing anything more.
        for s in active.iter_mut() {
            if s.job.events.is_closed() {
                s.done = true;
                self.stats.active.fetch_sub(1, Ordering::SeqCst);
                self.finished(true);
            }
        }
        for m in 0..self.models.len() {
            let mut group: Vec<&mut Seq<B>> = active
                .iter_mut()
                .filter(|s| !s.done && s.job.model == m)
                .collect();
            if group.is_empty() {
                continue;
            }
            let tokens: Vec<u32> = group.iter().map(|s| *s.context.last().unwrap()).collect();
            let logits = {
                let mut caches: Vec<&mut KvCache<B>> =
                    group.iter_mut().map(|s| &mut s.cache).collect();
                self.models[m].decode_rows(&tokens, &mut caches)
            };
            self.stats.steps.fetch_add(1, Ordering::SeqCst);
            self.stats
                .step_rows
                .fetch_add(group.len(), Ordering::SeqCst);
            let all = to_vec(logits);
            let vocab = all.len() / group.len();
            for (i, s) in group.into_iter().enumerate() {
                let mut row = all[i * vocab..(i + 1) * vocab].to_vec();
                let t = s.sampler.next_token(&mut row, &s.context);
                self.push_token(s, t);
                if s.done {
                    self.finished(false);
                }
            }
        }
    }

    /// Appends token `t` to `s`, sends the text that is final, and ends the sequence at an
    /// end-of-sequence token, a stop string or `max_tokens`.
    fn push_token(&self, s: &mut Seq<B>, t: u32) {
        s.generated.push(t);
        s.context.push(t);
        let eos = s.job.gen.eos_token_id.contains(&t);
        let body = if eos {
            &s.generated[..s.generated.len() - 1]
        } else {
            &s.generated[..]
        };
        let text = self.tokenizer.decode(body, true).unwrap_or_default();
        let mut finish = if eos {
            Some(Finish::Stop)
        } else if s.generated.len() >= s.job.gen.max_new_tokens {
            Some(Finish::Length)
        } else {
            None
        };
        let mut end = text.len();
        if let Some(pos) = first_stop(&text, &s.job.stop, s.sent) {
            end = pos;
            finish = Some(Finish::Stop);
        } else if finish.is_none() {
            // Hold back half a character and what may be the start of a stop string.
            if text.ends_with('\u{FFFD}') {
                end = text.len() - '\u{FFFD}'.len_utf8();
            }
            end -= held_back(&text[..end], &s.job.stop);
        }
        if end > s.sent && text.is_char_boundary(s.sent) && text.is_char_boundary(end) {
            let _ = s
                .job
                .events
                .send(Event::Text(text[s.sent..end].to_string()));
            s.sent = end;
        }
        if let Some(finish) = finish {
            let _ = s.job.events.send(Event::Done {
                finish,
                prompt_tokens: s.job.prompt.len(),
                completion_tokens: s.generated.len(),
            });
            s.done = true;
            self.stats.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn to_vec<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 after convert")
}

/// The byte offset of the earliest stop string in `text` (searching only where one could begin
/// without having been sent already: text before `sent` was checked at earlier tokens).
fn first_stop(text: &str, stops: &[String], sent: usize) -> Option<usize> {
    stops
        .iter()
        .filter_map(|s| {
            let from = sent.saturating_sub(s.len());
            let from = (0..=from).rev().find(|&i| text.is_char_boundary(i))?;
            text[from..].find(s.as_str()).map(|p| from + p)
        })
        .min()
}

/// How many bytes at the end of `text` are a proper prefix of some stop string (to be held back
/// until the next token says whether the stop string completes).
fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .map(|s| {
            (1..s.len())
                .rev()
                .find(|&k| s.is_char_boundary(k) && text.ends_with(&s[..k]))
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_and_held_back() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(first_stop("abc END x", &stops, 0), Some(4));
        assert_eq!(first_stop("a\n\nEND", &stops, 0), Some(1));
        assert_eq!(first_stop("abc", &stops, 0), None);
        // Text already sent cannot hold a stop string, but one may straddle the boundary.
        assert_eq!(first_stop("xxEND", &stops, 3), Some(2));
        assert_eq!(held_back("abc EN", &stops), 2);
        assert_eq!(held_back("abc E", &stops), 1);
        assert_eq!(held_back("abc\n", &stops), 1);
        assert_eq!(held_back("abc", &stops), 0);
        assert_eq!(held_back("甄嬛", &["嬛嬛".to_string()]), "嬛".len());
    }
}
