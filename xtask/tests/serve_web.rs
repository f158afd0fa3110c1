//! The chat page of `cargo xtask serve` in a real browser: headless Chromium, driven over the Chrome
//! DevTools Protocol (CDP), opens `/` of the demo server (the demo model and the adapter that
//! `cargo xtask finetune` trains), lists the models, picks the adapter, and holds a two-turn
//! conversation typed as a user would (Shift+Enter for a new line, Enter to send, then a click on
//! Send). Each request must carry the whole history, and each streamed answer must equal the
//! `content` of a non-streaming `POST /v1/chat/completions` with the same messages, the same model,
//! temperature 0 and the same `max_tokens`. A screenshot of the page goes to
//! `target/serve-web.png`, and with `FERROLORA_WRITE_SCREENSHOT=1` also to `docs/serve-web.png`.
//! Then a request the server refuses (`max_tokens` 0) shows the server's message in the answer's
//! place, and Clear empties the conversation.
//!
//! Needs `chromium` on PATH (Debian's package; `.ci/run` installs it): without it the test skips,
//! or fails under `CI=true`. Every wait has a bound (only a failing test reaches it); none asserts a
//! duration.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

/// Longest wait for any one thing: the server to listen (it may first write the demo model), the
/// browser to start, the page to list the models, an answer to finish streaming.
const TIMEOUT: Duration = Duration::from_secs(120);

/// The page's default `max_tokens` (the `#max-tokens` input), used for the reference requests.
const MAX_TOKENS: u64 = 64;

#[test]
fn web_page_streams_the_same_answers_as_the_api() {
    let Some(chromium) = find_on_path("chromium") else {
        if test_support::ci() {
            panic!("CI=true but `chromium` is not on PATH; .ci/run installs Debian's chromium");
        }
        eprintln!(
            "skipping the web page test: `chromium` is not on PATH (apt-get install chromium)"
        );
        return;
    };

    // The demo fine-tune (a few seconds) leaves runs/demo/adapter, which serve offers as
    // `demo-adapter`: its answers read as text, the random base model's do not.
    let cwd = tempfile::tempdir().unwrap();
    let finetune = Command::new(XTASK)
        .arg("finetune")
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert!(
        finetune.status.success(),
        "xtask finetune (the demo) failed ({}):\n{}\n{}",
        finetune.status,
        String::from_utf8_lossy(&finetune.stdout),
        String::from_utf8_lossy(&finetune.stderr)
    );
    let server = Logged::spawn(
        "xtask serve",
        Command::new(XTASK)
            .args(["serve", "--port", "0"])
            .current_dir(cwd.path()),
        |line| line.strip_prefix("serving on ").map(str::to_owned),
    );
    let base = server.ready.clone();

    let profile = tempfile::tempdir().unwrap();
    let browser = Logged::spawn(
        "chromium",
        Command::new(&chromium).args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-port=0",
            // Fatal messages only: headless Chromium in a container logs D-Bus errors by the dozen.
            "--log-level=3",
            &format!("--user-data-dir={}", profile.path().display()),
            "about:blank",
        ]),
        |line| {
            line.strip_prefix("DevTools listening on ")
                .map(str::to_owned)
        },
    );
    let logs = [&server, &browser];
    let mut page = Page::attach(&browser.ready, &logs);
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1000, "height": 640, "deviceScaleFactor": 1, "mobile": false}),
    );
    page.call("Page.navigate", json!({ "url": format!("{base}/") }));

    // The model list: the demo's base model and its adapter.
    let models = page.wait_for(
        "the model list",
        r#"(() => {
            const status = document.getElementById("status")?.textContent;
            if (status) return { error: status };
            const select = document.getElementById("model");
            return select && select.options.length ? [...select.options].map((o) => o.value) : null;
        })()"#,
    );
    let models: Vec<String> = serde_json::from_value(models.clone()).unwrap_or_else(|_| {
        panic!(
            "{}",
            page.failure(&format!("the page lists no models: {models}"))
        )
    });
    assert!(
        models == ["demo", "demo-adapter"],
        "{}",
        page.failure(&format!(
            "the page lists {models:?}, not the demo's `demo` and `demo-adapter`"
        ))
    );
    let model = "demo-adapter";
    page.eval(&format!(
        r#"document.getElementById("model").value = "{model}""#
    ));
    // Records the body of each request the page posts, to check what it sends (the history).
    page.eval(
        r#"window.sentRequests = [];
        const fetchAsBefore = window.fetch;
        window.fetch = (url, init) => {
            if (init?.body) window.sentRequests.push(JSON.parse(init.body));
            return fetchAsBefore(url, init);
        };"#,
    );

    // Turn 1: two lines (Shift+Enter inserts the line break), sent with Enter.
    page.eval(r#"document.getElementById("input").focus()"#);
    page.insert_text("Who are you,");
    page.key_enter(true);
    page.insert_text("my lady?");
    page.key_enter(false);
    let mut messages = vec![json!({"role": "user", "content": "Who are you,\nmy lady?"})];
    check_turn(&mut page, &base, model, &mut messages, 1);
    // Not two empty strings compared: the adapter answers this one.
    assert!(
        !messages[1]["content"].as_str().unwrap().is_empty(),
        "the demo adapter answered nothing to the first message"
    );

    // Turn 2: sent with a click on Send; the request must carry turn 1 too.
    page.eval(r#"document.getElementById("input").focus()"#);
    page.insert_text("Light the lanterns in the hall.");
    page.click("#send");
    messages.push(json!({"role": "user", "content": "Light the lanterns in the hall."}));
    check_turn(&mut page, &base, model, &mut messages, 2);

    let png = page.call("Page.captureScreenshot", json!({"format": "png"}));
    let png = base64::engine::general_purpose::STANDARD
        .decode(png["data"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("Page.captureScreenshot's data is not base64: {e}"));
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap();
    std::fs::write(target.join("serve-web.png"), &png).unwrap();
    if std::env::var("FERROLORA_WRITE_SCREENSHOT").is_ok_and(|v| v == "1") {
        let docs = test_support::workspace_root().join("docs/serve-web.png");
        std::fs::write(&docs, &png)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", docs.display()));
    }

    // A request the server refuses (max_tokens 0): the answer shows the server's message.
    page.eval(r#"document.getElementById("max-tokens").value = "0""#);
    page.eval(r#"document.getElementById("input").focus()"#);
    page.insert_text("Once more");
    page.key_enter(false);
    let shown = page.wait_for(
        "the error of answer 3",
        r##"(() => {
            const a = document.querySelectorAll("#messages > .assistant")[2];
            return a && a.dataset.error ? { message: a.dataset.error, text: a.textContent } : null;
        })()"##,
    );
    let message = shown["message"].as_str().unwrap();
    assert!(
        shown["text"].as_str().unwrap().contains(message) && message.contains("max_tokens"),
        "{}",
        page.failure(&format!(
            "with max_tokens 0 the page shows {shown}, not the server's message naming max_tokens"
        ))
    );

    // Clear empties the conversation.
    page.click("#clear");
    let left = page.eval(r#"document.getElementById("messages").childElementCount"#);
    assert_eq!(left, 0, "{}", page.failure("Clear left turns on the page"));
}

/// Checks the page's exchange `n` (1-based), once its answer is complete: the user turn shows the
/// last of `messages`; the page's request carried exactly `messages` (the history, and no system
/// message), the model, temperature 0, the default `max_tokens` and `stream: true`; the streamed
/// answer equals the API's non-streaming greedy answer to `messages`. Then appends the answer.
fn check_turn(page: &mut Page, base: &str, model: &str, messages: &mut Vec<Value>, n: usize) {
    let answer = page.wait_for_answer(n);
    let user = messages.last().unwrap()["content"].as_str().unwrap();
    assert_eq!(
        answer["user"].as_str(),
        Some(user),
        "{}",
        page.failure(&format!(
            "turn {n}: the page's user turn is not the message typed"
        ))
    );
    let sent = page.eval(&format!("window.sentRequests[{n} - 1]"));
    let want_sent = json!({
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "stream": true,
    });
    assert_eq!(
        sent,
        want_sent,
        "{}",
        page.failure(&format!(
            "turn {n}: the page's request body is not the one expected"
        ))
    );
    let streamed = answer["text"].as_str().unwrap();
    let want = complete(base, model, messages);
    assert_eq!(
        streamed,
        want,
        "{}",
        page.failure(&format!(
            "turn {n}: the page's streamed answer differs from the non-streaming API's to the same \
             messages {messages:?}"
        ))
    );
    messages.push(json!({"role": "assistant", "content": want}));
}

/// `content` of a non-streaming, greedy `POST /v1/chat/completions` (no system message: the server's
/// default system prompt, as the page with `#system` left empty).
fn complete(base: &str, model: &str, messages: &[Value]) -> String {
    let body = json!({
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    });
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .build()
        .new_agent();
    let url = format!("{base}/v1/chat/completions");
    let mut res = agent
        .post(&url)
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = res.status();
    let text = res.body_mut().read_to_string().unwrap();
    assert_eq!(
        status, 200,
        "POST {url} with {body} answered {status}: {text}"
    );
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("POST {url}: the body is not JSON ({e}): {text}"));
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("POST {url}: no choices[0].message.content in {text}"))
        .to_owned()
}

/// A page target of the browser, attached over the browser's CDP websocket (flattened session).
struct Page<'a> {
    ws: WebSocket<TcpStream>,
    session: String,
    next_id: u64,
    /// The processes whose output a failure message shows.
    logs: &'a [&'a Logged],
}

impl<'a> Page<'a> {
    /// Connects to the browser endpoint `ws_url` (`ws://HOST:PORT/devtools/browser/ID`) and
    /// attaches to its first page target (the `about:blank` it was started with).
    fn attach(ws_url: &str, logs: &'a [&'a Logged]) -> Page<'a> {
        let host = ws_url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| {
                panic!("chromium's DevTools address is not ws://HOST:PORT/...: {ws_url}")
            });
        let tcp = TcpStream::connect(host).unwrap_or_else(|e| panic!("connect to {host}: {e}"));
        // A browser that stops answering fails the test instead of hanging it.
        tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
        let (ws, _) = tungstenite::client(ws_url, tcp)
            .unwrap_or_else(|e| panic!("websocket handshake with {ws_url}: {e}"));
        let mut page = Page {
            ws,
            session: String::new(),
            next_id: 0,
            logs,
        };
        let targets = page.call("Target.getTargets", json!({}));
        let target = targets["targetInfos"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .unwrap_or_else(|| panic!("chromium has no page target: {targets}"))["targetId"]
            .clone();
        let attached = page.call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        page.session = attached["sessionId"].as_str().unwrap().to_owned();
        page
    }

    /// Sends a CDP command (to the page's session once attached) and returns its `result`; events
    /// that arrive meanwhile are skipped.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = self.session.clone().into();
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .unwrap_or_else(|e| panic!("{}", self.failure(&format!("CDP {method}: send: {e}"))));
        loop {
            let reply = match self.ws.read() {
                Ok(Message::Text(t)) => t,
                Ok(_) => continue,
                Err(e) => panic!("{}", self.failure(&format!("CDP {method}: no reply: {e}"))),
            };
            let reply: Value = serde_json::from_str(&reply).unwrap();
            if reply["id"] != id {
                continue;
            }
            if let Some(err) = reply.get("error") {
                panic!(
                    "{}",
                    self.failure(&format!("CDP {method} {params} failed: {err}"))
                );
            }
            return reply["result"].clone();
        }
    }

    /// The value of a JavaScript expression in the page (promises awaited).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(ex) = r.get("exceptionDetails") {
            panic!(
                "{}",
                self.failure(&format!("JavaScript `{expr}` threw: {ex}"))
            );
        }
        r["result"].get("value").cloned().unwrap_or(Value::Null)
    }

    /// Polls `expr` until it is neither `null` nor `false` and returns it; fails when it is an
    /// object with an `error`, or after [`TIMEOUT`].
    fn wait_for(&mut self, what: &str, expr: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.eval(expr);
            if let Some(err) = v.get("error") {
                panic!(
                    "{}",
                    self.failure(&format!("waiting for {what}: the page shows: {err}"))
                );
            }
            if !v.is_null() && v != false {
                return v;
            }
            if start.elapsed() > TIMEOUT {
                panic!(
                    "{}",
                    self.failure(&format!("{what} did not come within {TIMEOUT:?}"))
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the `n`-th answer to be complete (`data-done`); returns `{user, text}`: the text
    /// of the user turn before it and of the answer.
    fn wait_for_answer(&mut self, n: usize) -> Value {
        self.wait_for(
            &format!("answer {n} (data-done)"),
            &format!(
                r##"(() => {{
                    const answers = document.querySelectorAll("#messages > .assistant");
                    const a = answers[{n} - 1];
                    if (!a) return null;
                    if (a.dataset.error) return {{ error: a.dataset.error }};
                    if (!a.dataset.done) return null;
                    const user = a.previousElementSibling;
                    return {{ user: user.className === "user" ? user.textContent : null, text: a.textContent }};
                }})()"##
            ),
        )
    }

    fn insert_text(&mut self, text: &str) {
        self.call("Input.insertText", json!({ "text": text }));
    }

    /// Presses Enter in the focused element, with Shift when `shift`.
    fn key_enter(&mut self, shift: bool) {
        let modifiers = if shift { 8 } else { 0 };
        let key = json!({"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "modifiers": modifiers});
        let mut down = key.clone();
        down["type"] = "keyDown".into();
        down["text"] = "\r".into();
        self.call("Input.dispatchKeyEvent", down);
        let mut up = key;
        up["type"] = "keyUp".into();
        self.call("Input.dispatchKeyEvent", up);
    }

    /// Clicks the middle of the element `selector` with the mouse.
    fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let at = self.eval(&format!(
            "(() => {{ const r = document.querySelector({sel}).getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": at[0], "y": at[1], "button": "left", "clickCount": 1}),
            );
        }
    }

    /// `what` followed by the output of the server and of the browser.
    fn failure(&self, what: &str) -> String {
        let mut s = what.to_owned();
        for l in self.logs {
            s += &format!("\n--- {} output\n{}", l.name, l.log.lock().unwrap());
        }
        s
    }
}

/// A child process whose stderr and stdout are collected into `log` by reader threads; killed
/// (and reaped) on drop, so a failing test leaves no server or browser behind.
struct Logged {
    name: &'static str,
    child: Child,
    log: Arc<Mutex<String>>,
    /// What `ready` extracted from the first output line it matched.
    ready: String,
}

impl Logged {
    /// Starts `cmd` and waits (at most [`TIMEOUT`]) for an output line on which `ready` returns
    /// `Some`.
    fn spawn(name: &'static str, cmd: &mut Command, ready: fn(&str) -> Option<String>) -> Logged {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for stream in [out, err] {
            let (log, tx) = (log.clone(), tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(found) = ready(&line) {
                        let _ = tx.send(found);
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        drop(tx);
        let mut p = Logged {
            name,
            child,
            log,
            ready: String::new(),
        };
        match rx.recv_timeout(TIMEOUT) {
            Ok(found) => p.ready = found,
            Err(e) => {
                let status = p.child.try_wait().ok().flatten();
                panic!(
                    "{name} did not print its ready line ({e}; exit status {status:?}); its output:\n{}",
                    p.log.lock().unwrap()
                );
            }
        }
        p
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first `name` in a directory of `PATH`.
fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}
