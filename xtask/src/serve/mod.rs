//! `cargo xtask serve`: the tuned model behind OpenAI's Chat Completions API, as vLLM serves it.
//!
//! The base model is loaded once; each `--adapter NAME=DIR` is loaded once onto it, unmerged (the
//! adapted models share the base's weights), and the request's `model` field picks the base or an
//! adapter by name (vLLM's multi-LoRA convention). Prompts are rendered as `chat` renders them and
//! decoded by the same code, so a served answer equals `chat`'s for the same seed. Requests are
//! decoded together by the engine ([`engine`]): continuous batching, one batched step for every
//! active sequence. `GET /` is a chat page for a browser (one static file in the binary).
//!
//! With no `--model` it serves the built-in demo model (`runs/demo/model`, written when absent, and
//! the demo's adapter `runs/demo/adapter` as `demo-adapter` when `cargo xtask finetune` has trained
//! it), so it runs on a fresh machine without a download.

mod api;
mod engine;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use burn::tensor::backend::Backend;
use burn::tensor::DType;
use lora_data::{ChatTokenizer, Message, PromptStyle, Role};
use qwen2::GenerationConfig;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use api::{ApiError, ChatRequest};
use engine::{Engine, Event, Job, Stats};

/// The chat page served at `/`.
const PAGE: &str = include_str!("page.html");

/// Arguments of `serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model directory, hub cache entry or hub id (default: the built-in demo model under
    /// `runs/demo`, written when absent).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub revision: crate::hub::RevisionArg,
    #[command(flatten)]
    pub quant: crate::quant::QuantArgs,
    /// `NAME=DIR`: a PEFT adapter (directory or hub id) served unmerged as the model `NAME`
    /// (repeatable).
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapters: Vec<String>,
    /// The base model's name in requests and in /v1/models (default: its directory's name; the
    /// demo's is `demo`).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Tokenizer directory or tokenizer.json (default: the model directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the line `serving on http://HOST:PORT` names it).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health and the page (default: the
    /// environment's `FERROLORA_API_KEY`, when set).
    #[arg(long)]
    pub api_key: Option<String>,
    /// `cpu` (or `cuda[:N]` in a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Template whose default system prompt requests without a system message get (`seed` or
    /// `qwen`; default: an adapter's training prompt from its run.json, else `seed`).
    #[arg(long)]
    pub template: Option<String>,
    /// System prompt for requests without a system message.
    #[arg(long)]
    pub system: Option<String>,
    /// Most sequences decoded at once (the batch of a decoding step).
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Most requests waiting for a slot; past it requests get 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Largest request body, in bytes (413 past it).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
}

/// A name a request can ask for.
struct Served {
    id: String,
    /// The base's name for an adapter.
    parent: Option<String>,
    /// Where it was loaded from.
    root: String,
    /// System prompt for requests without one.
    system: String,
}

/// What the HTTP handlers share.
struct App {
    models: Vec<Served>,
    tokenizer: Arc<tokenizers::Tokenizer>,
    /// The base's generation defaults (`generation_config.json`, as `chat` reads it).
    defaults: GenerationConfig,
    /// The model's context length (`max_position_embeddings`).
    context: usize,
    jobs: SyncSender<Job>,
    api_key: Option<String>,
    created: u64,
    next_id: AtomicU64,
    stats: Arc<Stats>,
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    if a.max_num_seqs == 0 {
        bail!("--max-num-seqs 0: use at least 1");
    }
    let spec = a.device.clone();
    crate::on_device!(&spec,
        cpu => run_on::<burn::backend::Flex>(a, Default::default()),
        cuda(dev) => run_on::<burn::backend::Cuda>(a, dev),
    )
}

/// `NAME=DIR` of `--adapter`.
fn adapter_arg(s: &str) -> anyhow::Result<(String, PathBuf)> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_string(), PathBuf::from(dir)))
        }
        _ => bail!(
            "--adapter {s:?}: use NAME=DIR (the model name clients ask for, then the adapter)"
        ),
    }
}

fn run_on<B: Backend>(a: ServeArgs, device: B::Device) -> anyhow::Result<()>
where
    B::Device: Send + 'static,
{
    let mut adapters = a
        .adapters
        .iter()
        .map(|s| adapter_arg(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (dir, base_name) = match &a.model {
        Some(m) => {
            let dir = qwen2::resolve_model_dir(&crate::hub::model(m, &a.revision)?)?;
            let name = dir
                .file_name()
                .map_or("model".to_string(), |n| n.to_string_lossy().into_owned());
            (dir, name)
        }
        None => {
            let (dir, adapter) = crate::demo::serve_files()?;
            if let Some(ad) = adapter.filter(|_| a.adapters.is_empty()) {
                adapters.push(("demo-adapter".to_string(), ad));
            }
            (dir, "demo".to_string())
        }
    };
    let base_name = a.served_model_name.clone().unwrap_or(base_name);
    for (i, (name, _)) in adapters.iter().enumerate() {
        if *name == base_name || adapters[..i].iter().any(|(n, _)| n == name) {
            bail!("--adapter {name}=...: the name {name:?} is already taken; give each adapter its own name");
        }
    }
    let style = PromptStyle::resolve(a.template.as_deref(), a.system.as_deref())
        .map_err(|e| anyhow!("--template: {e}"))?;
    let demo_system = a.model.is_none() && a.system.is_none() && a.template.is_none();
    let base_system = if demo_system {
        crate::demo::SYSTEM.to_string()
    } else {
        style.system.clone()
    };

    let tok_path = a.tokenizer.clone().unwrap_or_else(|| dir.clone());
    if tok_path.is_dir() && !tok_path.join("tokenizer.json").is_file() {
        bail!(
            "no tokenizer.json in {}: pass --tokenizer DIR (a directory with the model's tokenizer.json)",
            tok_path.display()
        );
    }
    let tok = ChatTokenizer::load(&tok_path)
        .with_context(|| format!("loading the tokenizer from {}", tok_path.display()))?;
    let loaded = a.quant.load::<B>(&dir, DType::F32, &device)?;
    let defaults = crate::chat::model_defaults(&dir, &loaded.config, &tok)?;
    let context = loaded.config.max_position_embeddings;
    let base = loaded.model;
    let mut served = vec![Served {
        id: base_name.clone(),
        parent: None,
        root: dir.display().to_string(),
        system: base_system,
    }];
    let mut models = vec![base.clone()];
    for (name, path) in &adapters {
        let path = crate::hub::adapter(path)?;
        // The base's tensors are shared (a clone of a module clones handles, not weights).
        let (mut m, lora, _) = lora_core::load_adapter(base.clone(), &path)
            .with_context(|| format!("--adapter {name}={}: loading", path.display()))?;
        // DoRA's scales, once (served adapters do not change).
        lora_core::cache_dora_scales(&mut m);
        let trained =
            crate::manifest::read(&path)?.and_then(|m| m["system"].as_str().map(str::to_string));
        let system = match trained {
            Some(s) if a.system.is_none() && a.template.is_none() => s,
            _ => style.system.clone(),
        };
        eprintln!(
            "adapter {name}: {} (r {}, alpha {}), unmerged",
            path.display(),
            lora.r,
            lora.lora_alpha
        );
        models.push(m);
        served.push(Served {
            id: name.clone(),
            parent: Some(base_name.clone()),
            root: path.display().to_string(),
            system,
        });
    }
    drop(base);

    let stats = Arc::new(Stats::default());
    let tokenizer = Arc::new(tok.tokenizer);
    let (jobs, queue) = sync_channel::<Job>(a.max_queue);
    let engine = Engine::<B> {
        models,
        tokenizer: Arc::clone(&tokenizer),
        device,
        max_num_seqs: a.max_num_seqs,
        max_prefills_per_step: 8,
        stats: Arc::clone(&stats),
    };
    let worker = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || engine.run(queue))
        .context("starting the engine thread")?;
    let app = Arc::new(App {
        models: served,
        tokenizer,
        defaults,
        context,
        jobs,
        api_key: a
            .api_key
            .clone()
            .or_else(|| std::env::var("FERROLORA_API_KEY").ok())
            .filter(|k| !k.is_empty()),
        created: unix_now(),
        next_id: AtomicU64::new(0),
        stats,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(a, Arc::clone(&app)))?;
    // The handlers are gone: closing the queue lets the engine finish what it holds and stop.
    drop(app);
    worker
        .join()
        .map_err(|_| anyhow!("the engine thread panicked"))?;
    eprintln!("stopped");
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Listens until SIGINT or SIGTERM, then stops accepting and lets in-flight requests finish.
async fn serve(a: ServeArgs, app: Arc<App>) -> anyhow::Result<()> {
    let router = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|req: Request| async move {
            error(ApiError::new(
                404,
                "invalid_request_error",
                "not_found",
                format!(
                    "no route {} {}: this server has GET /v1/models, POST /v1/chat/completions, GET /health and GET /",
                    req.method(),
                    req.uri().path()
                ),
            ))
        })
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&app), auth))
        .layer(DefaultBodyLimit::max(a.max_body_bytes))
        .with_state(Arc::clone(&app));
    let addr = format!("{}:{}", a.host, a.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| {
            format!(
                "--host {} --port {}: cannot listen on {addr}",
                a.host, a.port
            )
        })?;
    let local = listener.local_addr()?;
    eprintln!("serving on http://{local}");
    eprintln!(
        "models: {}",
        app.models
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    drop(app);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving")?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutting down: no new connections; finishing the requests in flight");
}

/// `Authorization: Bearer KEY` on every route but /health and the page, compared in constant time.
async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(key) = &app.api_key else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if path == "/health" || path == "/" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    use subtle::ConstantTimeEq;
    if bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
        return next.run(req).await;
    }
    error(ApiError::new(
        401,
        "invalid_request_error",
        "invalid_api_key",
        "missing or wrong API key: send the header `Authorization: Bearer KEY` with the server's --api-key".into(),
    ))
}

fn error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = (status, json_body(&e.body())).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn json_body(v: &Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let s = &app.stats;
    json_body(&json!({
        "status": "ok",
        "active": s.active.load(Ordering::SeqCst),
        "completed": s.completed.load(Ordering::SeqCst),
        "abandoned": s.abandoned.load(Ordering::SeqCst),
        "steps": s.steps.load(Ordering::SeqCst),
        "step_rows": s.step_rows.load(Ordering::SeqCst),
    }))
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let data: Vec<Value> = app
        .models
        .iter()
        .map(|m| {
            json!({"id": m.id, "object": "model", "created": app.created, "owned_by": "ferrolora",
                   "root": m.root, "parent": m.parent, "max_model_len": app.context})
        })
        .collect();
    json_body(&json!({"object": "list", "data": data}))
}

/// A checked request made ready for the engine: its prompt ids and sampling settings.
fn prepare(app: &App, r: &ChatRequest) -> Result<(usize, Vec<u32>, GenerationConfig), ApiError> {
    let Some(model) = app.models.iter().position(|m| m.id == r.model) else {
        let names: Vec<&str> = app.models.iter().map(|m| m.id.as_str()).collect();
        return Err(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                404,
                "invalid_request_error",
                "model_not_found",
                format!(
                    "the model {:?} does not exist here; served: {}",
                    r.model,
                    names.join(", ")
                ),
            )
        });
    };
    let mut messages: Vec<Message> = r
        .messages
        .iter()
        .map(|m| Message {
            role: m.role,
            content: m.content.clone(),
        })
        .collect();
    if messages[0].role != Role::System {
        messages.insert(
            0,
            Message {
                role: Role::System,
                content: app.models[model].system.clone(),
            },
        );
    }
    let prompt = crate::chat::prompt_ids(&app.tokenizer, &messages)
        .map_err(|e| ApiError::bad("messages", format!("{e:#}")))?;
    if prompt.len() >= app.context {
        return Err(ApiError::bad(
            "messages",
            format!(
                "the prompt is {} tokens; this model's context is {} tokens: shorten the messages",
                prompt.len(),
                app.context
            ),
        ));
    }
    let room = app.context - prompt.len();
    let mut g = app.defaults.clone();
    g.max_new_tokens = match r.max_tokens {
        Some(n) if n > room => {
            return Err(ApiError::bad(
                "max_tokens",
                format!(
                    "`max_tokens` {n} is more than the {room} tokens left in the context ({} of {} taken by the prompt)",
                    prompt.len(),
                    app.context
                ),
            ))
        }
        Some(n) => n,
        None => g.max_new_tokens.min(room),
    };
    if let Some(t) = r.temperature {
        g.do_sample = t > 0.0;
        if t > 0.0 {
            g.temperature = t;
        }
    }
    if let Some(p) = r.top_p {
        g.top_p = p;
    }
    if let Some(k) = r.top_k {
        g.top_k = k;
    }
    if let Some(p) = r.repetition_penalty {
        g.repetition_penalty = p;
    }
    if let Some(s) = r.seed {
        g.seed = s;
    }
    if r.ignore_eos {
        g.eos_token_id.clear();
    }
    Ok((model, prompt, g))
}

async fn chat_completions(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            let status = e.status().as_u16();
            return error(ApiError {
                param: Some("body".into()),
                ..ApiError::new(
                    status,
                    "invalid_request_error",
                    if status == 413 {
                        "request_too_large"
                    } else {
                        "bad_body"
                    },
                    format!("reading the request body: {e}"),
                )
            });
        }
    };
    let req = match api::parse(&body) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    let (model, prompt, gen) = match prepare(&app, &req) {
        Ok(x) => x,
        Err(e) => return error(e),
    };
    let (tx, rx) = unbounded_channel();
    let job = Job {
        model,
        prompt,
        gen,
        stop: req.stop.clone(),
        events: tx,
    };
    match app.jobs.try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return error(ApiError::new(
                503,
                "server_error",
                "overloaded",
                "the server's queue is full: retry after a moment".into(),
            ))
        }
        Err(TrySendError::Disconnected(_)) => {
            return error(ApiError::new(
                503,
                "server_error",
                "shutting_down",
                "the server is shutting down".into(),
            ))
        }
    }
    let id = format!(
        "chatcmpl-{:016x}{:08x}",
        app.created,
        app.next_id.fetch_add(1, Ordering::SeqCst)
    );
    let created = unix_now();
    if req.stream {
        stream(id, created, req, rx).into_response()
    } else {
        complete(id, created, req, rx).await
    }
}

/// The whole answer as one `chat.completion`.
async fn complete(
    id: String,
    created: u64,
    req: ChatRequest,
    mut rx: UnboundedReceiver<Event>,
) -> Response {
    let mut content = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => content.push_str(&t),
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                return json_body(&json!({
                    "id": id, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "logprobs": null, "finish_reason": finish.as_str()}],
                    "usage": usage(prompt_tokens, completion_tokens),
                }))
            }
        }
    }
    error(ApiError::new(
        500,
        "server_error",
        "engine_stopped",
        "the decoding engine stopped before the answer was complete".into(),
    ))
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

/// The answer as server-sent events: a first chunk with the role, one chunk per piece of text, a
/// last chunk with the finish reason (and a usage chunk when `stream_options.include_usage`), then
/// `[DONE]`. When the client goes away the stream is dropped, which closes `rx`: the engine frees
/// the sequence at its next step.
fn stream(
    id: String,
    created: u64,
    req: ChatRequest,
    rx: UnboundedReceiver<Event>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created,
               "model": req.model, "choices": [{"index": 0, "delta": delta, "logprobs": null,
               "finish_reason": finish}]})
    };
    let first = chunk(json!({"role": "assistant", "content": ""}), None).to_string();
    let include_usage = req.include_usage;
    let state = (rx, std::collections::VecDeque::from([first]), false, chunk);
    Sse::new(futures_util::stream::unfold(
        state,
        move |(mut rx, mut pending, mut finished, chunk)| async move {
            loop {
                if let Some(data) = pending.pop_front() {
                    let ev = SseEvent::default().data(data);
                    return Some((Ok(ev), (rx, pending, finished, chunk)));
                }
                if finished {
                    return None;
                }
                match rx.recv().await {
                    Some(Event::Text(t)) => {
                        pending.push_back(chunk(json!({"content": t}), None).to_string())
                    }
                    Some(Event::Done {
                        finish,
                        prompt_tokens,
                        completion_tokens,
                    }) => {
                        pending.push_back(chunk(json!({}), Some(finish.as_str())).to_string());
                        if include_usage {
                            let mut u = chunk(json!({}), None);
                            u["choices"] = json!([]);
                            u["usage"] = usage(prompt_tokens, completion_tokens);
                            pending.push_back(u.to_string());
                        }
                        pending.push_back("[DONE]".into());
                        finished = true;
                    }
                    None => finished = true,
                }
            }
        },
    ))
}
