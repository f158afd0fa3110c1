//! `cargo xtask chat --model DIR [--adapter DIR] [--prompt TEXT]`: talk to a (fine-tuned) model, the
//! Rust side of the tutorial's inference cell (`apply_chat_template(add_generation_prompt=True)` +
//! `model.generate(...)` + `decode(skip_special_tokens=True)`).
//!
//! With `--prompt` it answers once and exits; without, it reads one user turn per line and keeps
//! the conversation (`exit` or end of input ends it). When stdin is a terminal the `user> ` prompt
//! is a line editor (rustyline: cursor keys, Emacs keys, Up/Down through this session's messages),
//! as in Python's REPL: Ctrl-C stops the answer being generated (what it said so far stays in the
//! conversation) or, at the prompt, discards the line; Ctrl-D quits. From a pipe or a file the
//! lines are read as they are, and Ctrl-C ends the process, so scripts see no change. Tokens are
//! printed as they are produced; prompt and decode speed go to stderr after each answer. Sampling
//! defaults come from the model's `generation_config.json` (HF's defaults, i.e. greedy, without
//! one); flags override them. The stop tokens are its `eos_token_id`s, else config.json's, else the
//! tokenizer's `<|im_end|>` and `<|endoftext|>`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use burn::tensor::backend::Backend;
use burn::tensor::DType;
use lora_data::{ChatTokenizer, Message, Role, Template, QWEN_DEFAULT_SYSTEM};
use qwen2::{GenerationConfig, KvCache, StopReason};

/// Arguments of `chat`.
#[derive(clap::Args)]
pub struct ChatArgs {
    /// Model directory (config.json + safetensors), hub cache entry, or hub id (`Org/Name`,
    /// `modelscope:Org/Name`; downloaded when not cached).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub revision: crate::hub::RevisionArg,
    #[command(flatten)]
    pub quant: crate::quant::QuantArgs,
    /// PEFT LoRA adapter to apply: a directory (adapter_config.json + adapter_model.safetensors)
    /// or a hub id.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Fold the adapter into the base weights before chatting (same output, faster decode).
    #[arg(long)]
    pub merge: bool,
    /// Tokenizer directory or tokenizer.json (default: the model directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// System prompt (default: the template's).
    #[arg(long)]
    pub system: Option<String>,
    /// Whose default system prompt to use: `seed` (the tutorial's training prompt, the default of
    /// every command) or `qwen` (Qwen2.5's "You are Qwen, created by Alibaba Cloud. ..."). Both
    /// render the prompt as Qwen2.5's chat template does.
    #[arg(long, default_value = "seed")]
    pub template: String,
    /// Answer this one message and exit (otherwise: interactive, one turn per line).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Most tokens per answer (default: generation_config.json's max_new_tokens, else 512).
    #[arg(long, allow_negative_numbers = true)]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature (0 = greedy).
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass (1 disables).
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens (0 disables).
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<usize>,
    /// Penalty on tokens already in the conversation (1 disables).
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f32>,
    /// Always take the most likely token (ignores temperature/top-k/top-p).
    #[arg(long)]
    pub greedy: bool,
    /// Force sampling even when generation_config.json says do_sample false.
    #[arg(long, conflicts_with = "greedy")]
    pub sample: bool,
    /// Seed of the sampling RNG (same seed + same prompt = same answer).
    #[arg(long, allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// `cpu` (or `cuda[:N]` in a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// error | warn: what a template or system prompt different from the one the adapter was
    /// trained with (its run.json) does.
    #[arg(long, default_value = "error", value_parser = ["error", "warn"])]
    pub lint: String,
    /// After each answer, print one JSON line to stderr: `{"prompt_ids", "generated_ids",
    /// "first_logits"}` (the ids as processed, and the logits the first new token was picked
    /// from), to compare with another runtime (`scripts/check_gguf.py` compares llama.cpp).
    #[arg(long)]
    pub debug_json: bool,
}

pub fn run(a: ChatArgs) -> anyhow::Result<()> {
    check_flags(&a)?;
    let spec = a.device.clone();
    crate::on_device!(&spec,
        cpu => run_on::<burn::backend::Flex>(&a, &Default::default()),
        cuda(dev) => run_on::<burn::backend::Cuda>(&a, &dev),
    )
}

/// The sampling flags, checked before anything is loaded, each error naming its flag (the model's
/// generation_config.json is checked after loading, naming the file).
fn check_flags(a: &ChatArgs) -> anyhow::Result<()> {
    let check = |name: &str, v: Option<f32>, ok: fn(f32) -> bool, rule: &str| match v {
        Some(v) if !(v.is_finite() && ok(v)) => bail!("--{name} {v}: {rule}"),
        _ => Ok(()),
    };
    check(
        "temperature",
        a.temperature,
        |v| v >= 0.0,
        "use a number >= 0 (0 means greedy)",
    )?;
    check(
        "top-p",
        a.top_p,
        |v| v > 0.0 && v <= 1.0,
        "use a number in (0, 1] (1 disables it)",
    )?;
    check(
        "repetition-penalty",
        a.repetition_penalty,
        |v| v > 0.0,
        "use a number > 0 (1 disables it)",
    )
}

fn run_on<B: Backend>(a: &ChatArgs, device: &B::Device) -> anyhow::Result<()> {
    let style = lora_data::PromptStyle::resolve(Some(&a.template), a.system.as_deref())
        .map_err(|e| anyhow!("--template: {e}"))?;
    let dir = qwen2::resolve_model_dir(&crate::hub::model(&a.model, &a.revision)?)?;
    let tok_path = a.tokenizer.clone().unwrap_or_else(|| dir.clone());
    if tok_path.is_dir() && !tok_path.join("tokenizer.json").is_file() {
        bail!(
            "no tokenizer.json in {}: pass --tokenizer DIR (a directory with Qwen2.5's tokenizer.json)",
            tok_path.display()
        );
    }
    let tok = ChatTokenizer::load(&tok_path)
        .with_context(|| format!("loading the tokenizer from {}", tok_path.display()))?;
    let loaded = a.quant.load::<B>(&dir, DType::F32, device)?;
    let cfg = generation_config(a, &dir, &loaded.config, &tok)?;
    let mut model = loaded.model;
    if let Some(adapter) = &a.adapter {
        let adapter = &crate::hub::adapter(adapter)?;
        check_trained_style(adapter, &style, &a.lint)?;
        let (m, lora, _) = lora_core::load_adapter(model, adapter).with_context(|| {
            format!(
                "loading adapter {} onto {}",
                adapter.display(),
                dir.display()
            )
        })?;
        model = m;
        let mut how = "unmerged";
        if a.merge {
            lora_core::merge_all(&mut model).context("merging the adapter")?;
            how = "merged";
        } else {
            // DoRA's scales, once (the adapter does not change while chatting).
            lora_core::cache_dora_scales(&mut model);
        }
        eprintln!(
            "adapter {} (r {}, alpha {}), {how}",
            adapter.display(),
            lora.r,
            lora.lora_alpha
        );
    } else if a.merge {
        bail!("--merge needs --adapter DIR");
    }
    eprintln!("generation: {}", describe(&cfg));

    let system = &style.system;
    eprintln!("template: {}\nsystem: {system}", style.template.name());
    let mut state = Conversation {
        history: vec![Message {
            role: Role::System,
            content: system.to_string(),
        }],
        cache: KvCache::new(model.model.layers.len()),
        cached_ids: Vec::new(),
        stop: Arc::new(AtomicBool::new(false)),
        debug_json: a.debug_json,
    };
    // Once the reader of stdout has gone (`| head -1`), answers stop early and the session ends.
    let mut out = crate::out::Stdout;
    if let Some(p) = &a.prompt {
        answer(&model, &tok, &cfg, device, &mut state, p, &mut out)?;
        return Ok(());
    }
    let mut input = Input::open(&state.stop)?;
    eprintln!("{}", input.help());
    let mut turn = 0u64;
    loop {
        let line = match input.read_line()? {
            Line::Text(line) => line,
            Line::Interrupted => continue,
            Line::End => break,
        };
        if line.trim() == "exit" {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        // A different seed per turn, fixed by --seed: a rerun of the same session repeats it.
        let turn_cfg = GenerationConfig {
            seed: cfg.seed.wrapping_add(turn),
            ..cfg.clone()
        };
        // Only a Ctrl-C from now on stops this answer.
        state.stop.store(false, Ordering::SeqCst);
        answer(&model, &tok, &turn_cfg, device, &mut state, &line, &mut out)?;
        turn += 1;
        if crate::out::closed() {
            break;
        }
    }
    Ok(())
}

/// The `generation:` header: the decoding mode and only the options it uses (greedy decoding has
/// no temperature, top-k, top-p or seed), then the length limit and the stop tokens.
fn describe(cfg: &GenerationConfig) -> String {
    let mode = if cfg.samples() {
        format!(
            "sampling (temperature {}, top_k {}, top_p {}, repetition_penalty {}, seed {})",
            cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty, cfg.seed
        )
    } else {
        format!("greedy, repetition_penalty {}", cfg.repetition_penalty)
    };
    format!(
        "{mode}, max_new_tokens {}, stop at {:?}",
        cfg.max_new_tokens, cfg.eos_token_id
    )
}

/// Where the user's turns come from.
enum Input {
    /// stdin is a terminal: a line editor with this session's history. It draws on the terminal
    /// itself (`/dev/tty`), never on stdout, which keeps only the answers (as when the prompt went
    /// to stderr), also when stdout is redirected.
    Editor(rustyline::DefaultEditor),
    /// A pipe or a file: plain lines, prompt on stderr, as scripts have always had them.
    Lines(std::io::Stdin),
}

/// What one read at the prompt gave.
enum Line {
    Text(String),
    /// Ctrl-C at the prompt: the line is dropped, a new prompt follows.
    Interrupted,
    /// Ctrl-D at an empty prompt, or the end of the input.
    End,
}

const PROMPT: &str = "user> ";

impl Input {
    /// The line editor when stdin is a terminal, with Ctrl-C outside the prompt setting `stop`
    /// instead of ending the process; plain lines otherwise.
    fn open(stop: &Arc<AtomicBool>) -> anyhow::Result<Self> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(Self::Lines(stdin));
        }
        let config = rustyline::Config::builder()
            .behavior(rustyline::config::Behavior::PreferTerm)
            .build();
        let editor =
            rustyline::DefaultEditor::with_config(config).context("starting the line editor")?;
        // At the prompt the editor reads Ctrl-C as a key (and puts the previous SIGINT action
        // back when it returns), so this handler sees only the Ctrl-C typed during an answer.
        let flag = Arc::clone(stop);
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
        Ok(Self::Editor(editor))
    }

    /// The line that explains the keys, printed once before the first prompt.
    fn help(&self) -> &'static str {
        match self {
            Self::Editor(_) => {
                "interactive chat: one message per line; Ctrl-C stops an answer, Ctrl-D or `exit` \
                 quits"
            }
            Self::Lines(_) => {
                "interactive chat: one message per line; `exit` or end of input quits"
            }
        }
    }

    /// Prompts and reads one line (without its line ending).
    fn read_line(&mut self) -> anyhow::Result<Line> {
        match self {
            Self::Editor(editor) => match editor.readline(PROMPT) {
                Ok(line) => {
                    // Up/Down recall it (not kept when empty or the same as the one before).
                    editor
                        .add_history_entry(line.as_str())
                        .context("adding to the line history")?;
                    Ok(Line::Text(line))
                }
                Err(rustyline::error::ReadlineError::Interrupted) => Ok(Line::Interrupted),
                // The editor has ended the prompt's line, so the shell's prompt starts a new one.
                Err(rustyline::error::ReadlineError::Eof) => Ok(Line::End),
                Err(e) => Err(e).context("reading the terminal"),
            },
            Self::Lines(stdin) => {
                eprint!("{PROMPT}");
                let mut line = String::new();
                if stdin.lock().read_line(&mut line).context("reading stdin")? == 0 {
                    return Ok(Line::End);
                }
                line.truncate(line.trim_end_matches(['\n', '\r']).len());
                Ok(Line::Text(line))
            }
        }
    }
}

/// Chatting with a prompt unlike the training prompts makes a tuned model look broken: the
/// adapter's `run.json` names the template and system prompt it was trained with.
fn check_trained_style(
    adapter: &std::path::Path,
    style: &lora_data::PromptStyle,
    lint: &str,
) -> anyhow::Result<()> {
    let Some(m) = crate::manifest::read(adapter)? else {
        return Ok(());
    };
    let (Some(template), Some(system)) = (m["template"].as_str(), m["system"].as_str()) else {
        return Ok(());
    };
    let mut diff = Vec::new();
    if template != style.template.name() {
        diff.push(format!(
            "template {template} (chatting with {}: pass --template {template})",
            style.template.name()
        ));
    }
    if system != style.system {
        diff.push(format!(
            "system prompt {system:?} (chatting with {:?}: pass --system)",
            style.system
        ));
    }
    if diff.is_empty() {
        return Ok(());
    }
    let msg = format!(
        "{} was trained with {}; --lint warn chats anyway",
        adapter.display(),
        diff.join(" and ")
    );
    if lint == "warn" {
        eprintln!("warning: {msg}");
        Ok(())
    } else {
        anyhow::bail!(msg)
    }
}

/// The ids generation stops on for the model in `dir`: `generation_config.json`'s `eos_token_id`,
/// else config.json's, else the tokenizer's `<|im_end|>` and `<|endoftext|>`.
pub fn stop_ids(dir: &std::path::Path, tok: &ChatTokenizer) -> anyhow::Result<Vec<u32>> {
    let config = qwen2::Qwen2Config::from_file(&dir.join("config.json"))?;
    let ids = GenerationConfig::for_model(dir, &config)?.eos_token_id;
    Ok(if ids.is_empty() {
        fallback_stop_ids(tok)
    } else {
        ids
    })
}

fn fallback_stop_ids(tok: &ChatTokenizer) -> Vec<u32> {
    ["<|im_end|>", "<|endoftext|>"]
        .iter()
        .filter_map(|t| tok.tokenizer.token_to_id(t))
        .collect()
}

/// The model's generation defaults: its `generation_config.json` (HF's defaults without one),
/// stopping at [`stop_ids`]' fallback when neither file names an end token.
pub(crate) fn model_defaults(
    dir: &std::path::Path,
    config: &qwen2::Qwen2Config,
    tok: &ChatTokenizer,
) -> anyhow::Result<GenerationConfig> {
    let mut cfg = GenerationConfig::for_model(dir, config)?;
    if cfg.eos_token_id.is_empty() {
        cfg.eos_token_id = fallback_stop_ids(tok);
    }
    Ok(cfg)
}

/// The ids a conversation is fed to the model as: Qwen2.5's chat template with the generation
/// prompt (the conversation's own system message, else the template's default), tokenized. What
/// `chat` and `serve` both generate from.
pub(crate) fn prompt_ids(
    tok: &tokenizers::Tokenizer,
    messages: &[Message],
) -> anyhow::Result<Vec<u32>> {
    let text = Template::Qwen.render_prompt(messages, QWEN_DEFAULT_SYSTEM);
    let enc = tok
        .encode_fast(text.as_str(), false)
        .map_err(|e| anyhow!("tokenizing the prompt: {e}"))?;
    Ok(enc.get_ids().to_vec())
}

/// Defaults from the model directory, then the flags.
fn generation_config(
    a: &ChatArgs,
    dir: &std::path::Path,
    config: &qwen2::Qwen2Config,
    tok: &ChatTokenizer,
) -> anyhow::Result<GenerationConfig> {
    let mut cfg = model_defaults(dir, config, tok)?;
    if let Some(v) = a.max_new_tokens {
        cfg.max_new_tokens = v;
    }
    if let Some(v) = a.temperature {
        cfg.temperature = v;
    }
    if let Some(v) = a.top_p {
        cfg.top_p = v;
    }
    if let Some(v) = a.top_k {
        cfg.top_k = v;
    }
    if let Some(v) = a.repetition_penalty {
        cfg.repetition_penalty = v;
    }
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if a.greedy {
        cfg.do_sample = false;
    }
    if a.sample {
        cfg.do_sample = true;
    }
    cfg.validate().context("sampling options")?;
    Ok(cfg)
}

/// The turns so far, and the keys/values of the token ids last processed.
struct Conversation<B: Backend> {
    history: Vec<Message>,
    cache: KvCache<B>,
    /// The ids whose keys/values `cache` holds (`cache.len()` of them).
    cached_ids: Vec<u32>,
    /// Set by Ctrl-C during an answer (interactive, on a terminal only): generation stops after
    /// the token being produced, and the tokens so far are the answer.
    stop: Arc<AtomicBool>,
    /// `--debug-json`.
    debug_json: bool,
}

/// One assistant turn: render the history with the chat template, continue from the cached
/// prefix it shares with the last turn (the whole earlier conversation, unless re-tokenizing the
/// answer changed its ids), generate while streaming the text, append the answer to the history,
/// print the speeds.
fn answer<B: Backend>(
    model: &qwen2::Qwen2ForCausalLM<B>,
    tok: &ChatTokenizer,
    cfg: &GenerationConfig,
    device: &B::Device,
    state: &mut Conversation<B>,
    user: &str,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let history = &mut state.history;
    history.push(Message {
        role: Role::User,
        content: user.to_string(),
    });
    let prompt = prompt_ids(&tok.tokenizer, history)?;
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut io_err = None;
    let common = state
        .cached_ids
        .iter()
        .zip(&prompt)
        .take_while(|(a, b)| a == b)
        .count();
    state.cache.truncate(common);
    let cache = &mut state.cache;
    let stop = &state.stop;
    let g = qwen2::generate_cached(model, cache, &prompt, cfg, device, |t| {
        generated.push(t);
        // Decode everything so far and print what is new; a trailing U+FFFD is half of a
        // multi-byte character split across tokens, printed once the next token completes it.
        if let Ok(s) = tok.tokenizer.decode(&generated, true) {
            if s.len() > printed && s.is_char_boundary(printed) && !s.ends_with('\u{FFFD}') {
                if let Err(e) = write!(out, "{}", &s[printed..]).and_then(|_| out.flush()) {
                    io_err = Some(e);
                    return false;
                }
                printed = s.len();
            }
        }
        !stop.load(Ordering::SeqCst) && !crate::out::closed()
    });
    if let Some(e) = io_err {
        return Err(e).context("writing to stdout");
    }
    if state.debug_json {
        // The prompt again from an empty cache: the logits the first new token came from.
        let mut fresh = KvCache::new(model.model.layers.len());
        let ids = burn::tensor::Tensor::<B, 1, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(
                prompt.iter().map(|t| *t as i64).collect::<Vec<_>>(),
                [prompt.len()],
            ),
            device,
        )
        .reshape([1, prompt.len()]);
        let logits = model
            .forward_step_last(ids, &mut fresh)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| anyhow!("reading the logits: {e:?}"))?;
        eprintln!(
            "{}",
            serde_json::json!({
                "prompt_ids": prompt,
                "generated_ids": g.tokens,
                "first_logits": logits,
            })
        );
    }
    let body: &[u32] = match g.stop {
        StopReason::Eos(_) => &g.tokens[..g.tokens.len() - 1],
        _ => &g.tokens,
    };
    let reply = tok
        .tokenizer
        .decode(body, true)
        .map_err(|e| anyhow!("decoding the answer: {e}"))?;
    if reply.len() > printed && reply.is_char_boundary(printed) {
        write!(out, "{}", &reply[printed..]).context("writing to stdout")?;
    }
    writeln!(out).context("writing to stdout")?;
    history.push(Message {
        role: Role::Assistant,
        content: reply,
    });
    let reused = prompt.len() - g.prompt_tokens;
    // The cache now holds the prompt and every new token but the last.
    state.cached_ids = [prompt, g.tokens.clone()].concat();
    state.cached_ids.truncate(state.cache.len());
    eprintln!(
        "[prompt {} tokens ({} cached), {:.1} tokens/s | decode {} tokens, {:.1} tokens/s | stop: {}]",
        g.prompt_tokens,
        reused,
        g.prompt_tokens_per_sec(),
        g.tokens.len(),
        g.decode_tokens_per_sec(),
        match g.stop {
            StopReason::Eos(t) => format!("eos {t}"),
            StopReason::MaxNewTokens => "max_new_tokens".into(),
            StopReason::Callback => "interrupted".into(),
        }
    );
    Ok(())
}
