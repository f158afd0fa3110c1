//! `cargo xtask serve` over real HTTP on the loopback (issue 25): answers equal `chat`'s, adapter
//! routing, streaming, the batch-independence of greedy answers, bad inputs, the API key, client
//! disconnects, the bounded queue, a load of 64 concurrent streams, and graceful shutdown. Every
//! server runs the built-in demo model (and a demo adapter trained here in a second), in a temp
//! directory, on a free port.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");
const SYSTEM: &str = "You are Zhen Huan.";

/// A directory holding `runs/demo/{model,adapter}`: the demo model and an adapter trained on it
/// for 80 steps (enough that its answers differ from the base's).
fn demo_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(XTASK)
            .args(["finetune", "--max-steps", "80"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "demo finetune failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .path()
}

/// A running server; killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(XTASK)
            .args(["serve", "--port", "0"])
            .args(args)
            .current_dir(demo_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = String::new();
        let url = loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                panic!("serve exited before listening:\n{seen}");
            };
            seen.push_str(&line);
            seen.push('\n');
            if let Some(u) = line.strip_prefix("serving on ") {
                break u.to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, url }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// `(status, body as JSON)` of a POST of `body` (a JSON text) to `path`.
fn post(s: &Server, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = agent()
        .post(format!("{}{path}", s.url))
        .header("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let mut resp = req.send(body).unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn get(s: &Server, path: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = agent().get(format!("{}{path}", s.url));
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let mut resp = req.call().unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn chat_body(model: &str, prompt: &str, extra: Value) -> Value {
    let mut b = json!({"model": model, "messages": [{"role": "user", "content": prompt}]});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// The answer text and usage of a non-streaming completion.
fn complete(s: &Server, body: &Value) -> (String, Value) {
    let (status, v) = post(s, "/v1/chat/completions", &body.to_string(), None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        v,
    )
}

/// A streamed completion: the content deltas joined, the finish reason, the usage chunk.
struct Streamed {
    text: String,
    deltas: usize,
    finish: String,
    usage: Value,
    done: bool,
}

fn stream(s: &Server, body: &Value) -> Streamed {
    let mut b = body.clone();
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let resp = agent()
        .post(format!("{}/v1/chat/completions", s.url))
        .header("Content-Type", "application/json")
        .send(b.to_string())
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let reader = BufReader::new(resp.into_body().into_reader());
    let mut out = Streamed {
        text: String::new(),
        deltas: 0,
        finish: String::new(),
        usage: Value::Null,
        done: false,
    };
    let mut first = true;
    for line in reader.lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            assert!(line.is_empty(), "unexpected line {line:?}");
            continue;
        };
        assert!(!out.done, "data after [DONE]");
        if data == "[DONE]" {
            out.done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            out.usage = u.clone();
            continue;
        }
        let c = &v["choices"][0];
        if first {
            assert_eq!(c["delta"]["role"], "assistant", "{v}");
            first = false;
        }
        if let Some(t) = c["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
            out.text.push_str(t);
            out.deltas += 1;
        }
        if let Some(f) = c["finish_reason"].as_str() {
            out.finish = f.to_string();
        }
    }
    assert!(out.done, "the stream ended without [DONE]");
    out
}

/// `chat --prompt` on the demo model (and adapter): the answer it prints.
fn chat(adapter: bool, prompt: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "chat",
        "--model",
        "runs/demo/model",
        "--template",
        "qwen",
        "--system",
        SYSTEM,
        "--prompt",
        prompt,
    ];
    if adapter {
        args.extend(["--adapter", "runs/demo/adapter"]);
    }
    args.extend_from_slice(extra);
    let out = Command::new(XTASK)
        .args(&args)
        .current_dir(demo_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap().to_string()
}

fn health(s: &Server) -> Value {
    let (status, v) = get(s, "/health", None);
    assert_eq!(status, 200);
    v
}

/// Waits (bounded) until the server holds no sequence.
fn wait_idle(s: &Server) -> Value {
    for _ in 0..600 {
        let h = health(s);
        if h["active"] == 0 {
            return h;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the server still holds sequences: {}", health(s));
}

#[test]
fn answers_equal_chat_for_base_and_adapter() {
    let s = Server::start(&[]);
    let (_, models) = get(&s, "/v1/models", None);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["demo", "demo-adapter"]);
    assert_eq!(models["data"][1]["parent"], "demo");
    let prompt = "Who are you, my lady?";
    let mut answers = Vec::new();
    for (model, adapter) in [("demo", false), ("demo-adapter", true)] {
        let want = chat(adapter, prompt, &["--greedy", "--max-new-tokens", "24"]);
        let body = chat_body(model, prompt, json!({"max_tokens": 24, "temperature": 0}));
        let (got, v) = complete(&s, &body);
        assert_eq!(got, want, "{model}: served vs chat");
        let usage = &v["usage"];
        let n = usage["completion_tokens"].as_u64().unwrap();
        assert!((1..=24).contains(&n));
        assert_eq!(
            v["choices"][0]["finish_reason"],
            if n == 24 { "length" } else { "stop" }
        );
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + n
        );
        let st = stream(&s, &body);
        assert_eq!(st.text, want, "{model}: streamed vs chat");
        assert_eq!(st.usage, *usage);
        assert_eq!(
            st.finish,
            v["choices"][0]["finish_reason"].as_str().unwrap()
        );
        // Sampling with a seed: the same draw as chat's.
        let want = chat(
            adapter,
            prompt,
            &[
                "--sample",
                "--temperature",
                "0.9",
                "--seed",
                "11",
                "--max-new-tokens",
                "16",
            ],
        );
        let body = chat_body(
            model,
            prompt,
            json!({"max_tokens": 16, "temperature": 0.9, "seed": 11}),
        );
        assert_eq!(complete(&s, &body).0, want, "{model}: sampled, seed 11");
        answers.push(got);
    }
    assert_ne!(answers[0], answers[1], "the adapter changes the answer");
    // A stop string ends the answer before it.
    let full = &answers[1];
    if let Some(cut) = full.char_indices().nth(3).map(|(i, _)| i) {
        let stop = &full[cut..cut + full[cut..].chars().next().unwrap().len_utf8()];
        let first = full.find(stop).unwrap();
        let body = chat_body(
            "demo-adapter",
            prompt,
            json!({"max_tokens": 24, "temperature": 0, "stop": [stop]}),
        );
        let (got, v) = complete(&s, &body);
        assert_eq!(got, full[..first], "stop {stop:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(stream(&s, &body).text, full[..first]);
    }
}

#[test]
fn greedy_answers_do_not_depend_on_the_batch() {
    let s = Server::start(&[]);
    let prompts = [
        "Who are you?",
        "Bring me tea.",
        "Open the window.",
        "Who is there?",
        "Play the zither.",
        "Read me a poem.",
        "Who goes there?",
        "Pour the wine.",
    ];
    let body = |i: usize| {
        let model = if i.is_multiple_of(2) {
            "demo"
        } else {
            "demo-adapter"
        };
        chat_body(
            model,
            prompts[i],
            json!({"max_tokens": 40, "temperature": 0}),
        )
    };
    let alone: Vec<String> = (0..8).map(|i| complete(&s, &body(i)).0).collect();
    let before = health(&s);
    let together: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (s, b) = (&s, body(i));
                sc.spawn(move || complete(s, &b).0)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let after = wait_idle(&s);
    for i in 0..8 {
        assert_eq!(
            together[i], alone[i],
            "request {i} ({:?}) alone vs among 7 others",
            prompts[i]
        );
    }
    // They did share steps: more rows than steps.
    let steps = after["steps"].as_u64().unwrap() - before["steps"].as_u64().unwrap();
    let rows = after["step_rows"].as_u64().unwrap() - before["step_rows"].as_u64().unwrap();
    assert!(
        rows > steps,
        "no batched step: {rows} rows in {steps} steps"
    );
    eprintln!("8 concurrent requests: {rows} rows in {steps} decoding steps");
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_lives_on() {
    let s = Server::start(&["--max-body-bytes", "100000"]);
    let ok = chat_body("demo", "hi", json!({"max_tokens": 2}));
    let long = "a".repeat(40_000);
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "body"),
        ("[]".into(), 400, "body"),
        (
            json!({"model": "demo", "messages": []}).to_string(),
            400,
            "messages",
        ),
        (json!({"model": "demo"}).to_string(), 400, "messages"),
        (
            json!({"model": "demo", "messages": [{"role": "wizard", "content": "x"}]}).to_string(),
            400,
            "messages[0].role",
        ),
        (
            json!({"model": "demo", "messages": [{"role": "user", "content": 7}]}).to_string(),
            400,
            "messages[0].content",
        ),
        (
            json!({"model": 5, "messages": [{"role": "user", "content": "x"}]}).to_string(),
            400,
            "model",
        ),
        (chat_body("nope", "hi", json!({})).to_string(), 404, "model"),
        (
            chat_body("demo", "hi", json!({"max_tokens": 0})).to_string(),
            400,
            "max_tokens",
        ),
        (
            chat_body("demo", "hi", json!({"max_tokens": -3})).to_string(),
            400,
            "max_tokens",
        ),
        (
            chat_body("demo", "hi", json!({"max_tokens": 10_000_000})).to_string(),
            400,
            "max_tokens",
        ),
        (
            chat_body("demo", "hi", json!({"max_tokens": "many"})).to_string(),
            400,
            "max_tokens",
        ),
        (
            chat_body("demo", "hi", json!({"temperature": "hot"})).to_string(),
            400,
            "temperature",
        ),
        (
            chat_body("demo", "hi", json!({"n": 3})).to_string(),
            400,
            "n",
        ),
        (
            chat_body(
                "demo",
                "hi",
                json!({"stop": (0..1000).map(|i| i.to_string()).collect::<Vec<_>>()}),
            )
            .to_string(),
            400,
            "stop",
        ),
        (
            chat_body("demo", &long, json!({})).to_string(),
            400,
            "messages",
        ),
        (
            chat_body("demo", &"b".repeat(200_000), json!({})).to_string(),
            413,
            "body",
        ),
    ];
    for (body, status, param) in &cases {
        let (got, v) = post(&s, "/v1/chat/completions", body, None);
        let head: String = body.chars().take(80).collect();
        assert_eq!(got, *status, "{head}: {v}");
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{head}: {v}"
        );
        assert!(
            e["type"].is_string() && e.get("code").is_some(),
            "{head}: {v}"
        );
        assert_eq!(e["param"], *param, "{head}: {v}");
    }
    // A context of 32768 tokens: a 40000-character prompt (one token per character) is refused
    // with the numbers.
    let (_, v) = post(&s, "/v1/chat/completions", &cases[15].0, None);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("32768"),
        "{v}"
    );
    let (status, v) = get(&s, "/v2/other", None);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    // Still serving.
    assert_eq!(complete(&s, &ok).1["usage"]["completion_tokens"], 2);
    assert_eq!(wait_idle(&s)["status"], "ok");
}

#[test]
fn the_api_key_guards_every_route_but_health_and_the_page() {
    let s = Server::start(&["--api-key", "sesame"]);
    assert_eq!(get(&s, "/health", None).0, 200);
    assert_eq!(get(&s, "/", None).0, 200);
    for key in [None, Some("wrong"), Some("sesam"), Some("sesame!")] {
        let (status, v) = get(&s, "/v1/models", key);
        assert_eq!(status, 401, "{key:?}");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        let body = chat_body("demo", "hi", json!({"max_tokens": 2})).to_string();
        assert_eq!(post(&s, "/v1/chat/completions", &body, key).0, 401);
    }
    assert_eq!(get(&s, "/v1/models", Some("sesame")).0, 200);
    let body = chat_body("demo", "hi", json!({"max_tokens": 2})).to_string();
    assert_eq!(
        post(&s, "/v1/chat/completions", &body, Some("sesame")).0,
        200
    );
}

#[test]
fn a_client_that_disconnects_frees_its_slot() {
    let s = Server::start(&[]);
    let before = health(&s)["abandoned"].as_u64().unwrap();
    let mut b = chat_body(
        "demo",
        "Who are you?",
        json!({"max_tokens": 20000, "temperature": 0}),
    );
    b["stream"] = json!(true);
    let resp = agent()
        .post(format!("{}/v1/chat/completions", s.url))
        .header("Content-Type", "application/json")
        .send(b.to_string())
        .unwrap();
    let mut reader = resp.into_body().into_reader();
    let mut buf = [0u8; 512];
    assert!(reader.read(&mut buf).unwrap() > 0);
    assert_eq!(health(&s)["active"], 1);
    drop(reader);
    let h = wait_idle(&s);
    assert_eq!(h["abandoned"].as_u64().unwrap(), before + 1, "{h}");
    // A non-streaming request whose client gives up is dropped as well.
    let short = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(300)))
        .build()
        .new_agent();
    let b = chat_body(
        "demo",
        "Who are you?",
        json!({"max_tokens": 20000, "temperature": 0}),
    );
    assert!(short
        .post(format!("{}/v1/chat/completions", s.url))
        .send(b.to_string())
        .is_err());
    let h = wait_idle(&s);
    assert_eq!(h["abandoned"].as_u64().unwrap(), before + 2, "{h}");
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let s = Server::start(&["--max-num-seqs", "1", "--max-queue", "1"]);
    let body = chat_body(
        "demo",
        "Who are you?",
        json!({"max_tokens": 3000, "temperature": 0}),
    )
    .to_string();
    let statuses: Vec<(u16, Option<String>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..5)
            .map(|_| {
                let (s, body) = (&s, body.clone());
                sc.spawn(move || {
                    let resp = agent()
                        .post(format!("{}/v1/chat/completions", s.url))
                        .header("Content-Type", "application/json")
                        .send(body)
                        .unwrap();
                    let retry = resp
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_string());
                    (resp.status().as_u16(), retry)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let busy: Vec<_> = statuses.iter().filter(|(s, _)| *s == 503).collect();
    let served = statuses.iter().filter(|(s, _)| *s == 200).count();
    // One decodes, one waits; the three others are turned away.
    assert!(
        served >= 1 && busy.len() >= 3 - (served - 1).min(3),
        "{statuses:?}"
    );
    assert!(
        busy.iter().all(|(_, r)| r.as_deref() == Some("1")),
        "{statuses:?}"
    );
    wait_idle(&s);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn sixty_four_concurrent_streams_all_complete() {
    let s = Server::start(&[]);
    // Warm up (first-use allocations), then measure.
    complete(&s, &chat_body("demo", "hi", json!({"max_tokens": 4})));
    let rss_before = rss_kib(s.pid());
    let body = |i: usize| {
        let model = if i.is_multiple_of(3) {
            "demo-adapter"
        } else {
            "demo"
        };
        let max = 8 + i % 17;
        let seed = i as u64;
        (
            max,
            chat_body(
                model,
                &format!("Request {i}: sing."),
                json!({"max_tokens": max, "temperature": 0.8, "seed": seed}),
            ),
        )
    };
    let results: Vec<Streamed> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..64)
            .map(|i| {
                let s = &s;
                sc.spawn(move || stream(s, &body(i).1))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in results.iter().enumerate() {
        let (max, b) = body(i);
        let n = r.usage["completion_tokens"].as_u64().unwrap() as usize;
        assert!(
            n >= 1 && n <= max,
            "request {i}: {n} tokens for max_tokens {max}"
        );
        // "length" only at the limit; "stop" below it, or at it when the last token allowed was
        // the end token (counted, as vLLM counts it).
        let want: &[&str] = if n == max {
            &["length", "stop"]
        } else {
            &["stop"]
        };
        assert!(
            want.contains(&r.finish.as_str()),
            "request {i}: finish_reason {:?} with {n} of {max} tokens",
            r.finish
        );
        assert!(r.deltas <= n);
        // The same request alone afterwards: the same sampled answer, the same counts.
        let (text, v) = complete(&s, &b);
        assert_eq!(r.text, text, "request {i}: among 63 others vs alone");
        assert_eq!(r.usage, v["usage"], "request {i}");
    }
    let h = wait_idle(&s);
    let rss_after = rss_kib(s.pid());
    eprintln!(
        "64 streams: {} rows in {} steps; RSS {rss_before} KiB before, {rss_after} KiB after",
        h["step_rows"], h["steps"]
    );
    assert!(h["completed"].as_u64().unwrap() >= 129);
}

#[test]
fn sigterm_finishes_the_requests_in_flight_then_exits_0() {
    let mut s = Server::start(&[]);
    let url = s.url.clone();
    let body = chat_body(
        "demo",
        "Who are you?",
        json!({"max_tokens": 200, "temperature": 0}),
    );
    let mut b = body.clone();
    b["stream"] = json!(true);
    let resp = agent()
        .post(format!("{url}/v1/chat/completions"))
        .header("Content-Type", "application/json")
        .send(b.to_string())
        .unwrap();
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "));
    let st = Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status}");
    // Gone: nothing listens any more.
    assert!(agent().get(format!("{url}/health")).call().is_err());
}
