//! A mock of the Hugging Face hub and of ModelScope on a loopback port, for the download tests:
//! the URL layout, headers and range requests the real ones answer with, plus faults on demand
//! (a connection dropped halfway, a corrupted body, an error status, a gated repository, a slow
//! body) and a log of every request.
//!
//! Hugging Face: `GET /api/models/{repo}/revision/{rev}` (`sha`, `siblings`) and `/tree/{rev}`, `GET|HEAD
//! /{repo}/resolve/{rev}/{file}` (`ETag` = SHA-256 for `*.safetensors` as for LFS files, else the git
//! blob id; `X-Repo-Commit`; `Content-Length`; `Range` → 206 with `Content-Range`). ModelScope:
//! `GET /api/v1/models/{repo}/repo/files?Revision=` (`Data.Files[]` with `Path`, `Size`, `Sha256`)
//! and `GET /api/v1/models/{repo}/repo?Revision=&FilePath=`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// One repository: its files (path → bytes) and the commit id they are served at.
#[derive(Clone, Debug)]
pub struct MockRepo {
    pub id: String,
    pub commit: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl MockRepo {
    /// The files of `dir` (not recursive), at a commit id derived from their contents.
    pub fn from_dir(id: &str, dir: &Path) -> MockRepo {
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                let name = e.file_name().to_string_lossy().into_owned();
                files.insert(name, std::fs::read(e.path()).unwrap());
            }
        }
        MockRepo::new(id, files)
    }

    pub fn new(id: &str, files: BTreeMap<String, Vec<u8>>) -> MockRepo {
        let mut h = Sha1::new();
        h.update(id.as_bytes());
        for (name, bytes) in &files {
            h.update(name.as_bytes());
            h.update(etag(name, bytes).as_bytes());
        }
        MockRepo {
            id: id.to_string(),
            commit: hex(&h.finalize()),
            files,
        }
    }
}

/// What the hub gives as a file's ETag: the SHA-256 of an LFS file (weights), else the git blob id.
pub fn etag(name: &str, bytes: &[u8]) -> String {
    if name.ends_with(".safetensors") {
        hex(&Sha256::digest(bytes))
    } else {
        let mut h = Sha1::new();
        h.update(format!("blob {}\0", bytes.len()).as_bytes());
        h.update(bytes);
        hex(&h.finalize())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A request the mock received.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, MockRepo>,
    log: Vec<Logged>,
    /// file → bytes after which the next body request for it is cut (once).
    drop_once: HashMap<String, usize>,
    corrupt: HashSet<String>,
    /// repo → status every request about it gets.
    fail: HashMap<String, u16>,
    /// repo → the token it needs.
    gated: HashMap<String, String>,
    /// Pause between 64 KiB chunks of a body.
    slow: Option<Duration>,
}

/// The running mock; stops when dropped.
pub struct MockHub {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockHub {
    /// Serves `repos` on a free 127.0.0.1 port (`port` 0) or the given one.
    pub fn start(repos: Vec<MockRepo>, port: u16) -> MockHub {
        let state = Arc::new(Mutex::new(State {
            repos: repos.into_iter().map(|r| (r.id.clone(), r)).collect(),
            ..State::default()
        }));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .expect("bind 127.0.0.1");
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let app = Router::new().fallback(move |req: Request| handle(shared.clone(), req));
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        stopped.await.ok();
                    })
                    .await
                    .ok();
            });
        });
        let addr = addr_rx.recv().expect("mock hub started");
        MockHub {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, for `HF_ENDPOINT` / `MODELSCOPE_ENDPOINT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }

    /// The next request for the body of `file` sends `after` bytes, then the connection drops.
    pub fn drop_once(&self, file: &str, after: usize) {
        self.state
            .lock()
            .unwrap()
            .drop_once
            .insert(file.into(), after);
    }

    /// Every body of `file` is served with one byte changed (headers unchanged).
    pub fn corrupt(&self, file: &str) {
        self.state.lock().unwrap().corrupt.insert(file.into());
    }

    /// Every request about `repo` (listing or file) answers `status`.
    pub fn fail(&self, repo: &str, status: u16) {
        self.state.lock().unwrap().fail.insert(repo.into(), status);
    }

    /// `repo` answers 401 without `Authorization: Bearer <token>` and 403 with another token.
    pub fn gate(&self, repo: &str, token: &str) {
        self.state
            .lock()
            .unwrap()
            .gated
            .insert(repo.into(), token.into());
    }

    /// Bodies are sent in 64 KiB chunks `pause` apart.
    pub fn slow(&self, pause: Duration) {
        self.state.lock().unwrap().slow = Some(pause);
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}

fn status(code: u16, msg: &str) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::json!({ "error": msg }).to_string()))
        .unwrap()
}

fn json(v: serde_json::Value) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(v.to_string()))
        .unwrap()
}

fn query_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(state: Arc<Mutex<State>>, req: Request) -> Response {
    let method = req.method().clone();
    let headers = req.headers().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let header_str = |h: &HeaderMap, k: header::HeaderName| {
        h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string)
    };
    state.lock().unwrap().log.push(Logged {
        method: method.to_string(),
        uri: if query.is_empty() {
            path.clone()
        } else {
            format!("{path}?{query}")
        },
        range: header_str(&headers, header::RANGE),
        authorization: header_str(&headers, header::AUTHORIZATION),
    });
    if method != Method::GET && method != Method::HEAD {
        return status(405, "method not allowed");
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut tree = false;
    // Which repository, and which file of it (None: the listing).
    let (repo_id, file, rev, modelscope) = match parts.as_slice() {
        ["api", "models", org, name, "revision", rev] => {
            (format!("{org}/{name}"), None, rev.to_string(), false)
        }
        // `huggingface_hub`'s listing (`list_repo_tree`): answered as the file tree.
        ["api", "models", org, name, "tree", rev] => {
            tree = true;
            (format!("{org}/{name}"), None, rev.to_string(), false)
        }
        ["api", "v1", "models", org, name, "repo", "files"] => (
            format!("{org}/{name}"),
            None,
            query_value(&query, "Revision").unwrap_or("master".into()),
            true,
        ),
        ["api", "v1", "models", org, name, "repo"] => match query_value(&query, "FilePath") {
            Some(f) => (
                format!("{org}/{name}"),
                Some(f),
                query_value(&query, "Revision").unwrap_or("master".into()),
                true,
            ),
            None => return status(400, "FilePath missing"),
        },
        [org, name, "resolve", rev, rest @ ..] if !rest.is_empty() => (
            format!("{org}/{name}"),
            Some(percent_decode(&rest.join("/"))),
            percent_decode(rev),
            false,
        ),
        _ => return status(404, "no such route"),
    };
    let (repo, fault, gate, drop_after, corrupt, slow) = {
        let mut s = state.lock().unwrap();
        let drop_after = match &file {
            Some(f) if !is_probe(&headers) => s.drop_once.remove(f),
            _ => None,
        };
        (
            s.repos.get(&repo_id).cloned(),
            s.fail.get(&repo_id).copied(),
            s.gated.get(&repo_id).cloned(),
            drop_after,
            file.as_ref().is_some_and(|f| s.corrupt.contains(f)),
            s.slow,
        )
    };
    if let Some(code) = fault {
        return status(code, "injected failure");
    }
    if let Some(token) = gate {
        match header_str(&headers, header::AUTHORIZATION) {
            None => return status(401, "gated: a token is needed"),
            Some(a) if a != format!("Bearer {token}") => return status(403, "gated: no access"),
            Some(_) => {}
        }
    }
    let Some(repo) = repo else {
        return if modelscope {
            json(serde_json::json!({"Code": 404, "Success": false, "Message": "model not found"}))
        } else {
            status(404, "Repository not found")
        };
    };
    let rev_ok = rev == repo.commit || rev == if modelscope { "master" } else { "main" };
    if !rev_ok {
        return status(404, "Revision not found");
    }
    let Some(file) = file else {
        return if modelscope {
            let files: Vec<_> = repo
                .files
                .iter()
                .map(|(name, bytes)| {
                    serde_json::json!({
                        "Path": name, "Name": name, "Size": bytes.len(), "Type": "blob",
                        "Sha256": hex(&Sha256::digest(bytes)), "Revision": repo.commit,
                    })
                })
                .collect();
            json(serde_json::json!({"Code": 200, "Success": true, "Data": {"Files": files}}))
        } else if tree {
            let entries: Vec<_> = repo
                .files
                .iter()
                .map(|(name, bytes)| {
                    let mut e = serde_json::json!({
                        "type": "file", "path": name, "size": bytes.len(), "oid": etag("", bytes),
                    });
                    if name.ends_with(".safetensors") {
                        e["lfs"] = serde_json::json!({"oid": etag(name, bytes), "size": bytes.len(), "pointerSize": 134});
                    }
                    e
                })
                .collect();
            json(serde_json::Value::Array(entries))
        } else {
            let siblings: Vec<_> = repo
                .files
                .keys()
                .map(|f| serde_json::json!({"rfilename": f}))
                .collect();
            json(serde_json::json!({"id": repo.id, "sha": repo.commit, "siblings": siblings}))
        };
    };
    let Some(bytes) = repo.files.get(&file) else {
        return status(404, "Entry not found");
    };
    let mut body = bytes.clone();
    if corrupt && !body.is_empty() {
        let mid = body.len() / 2;
        body[mid] ^= 0x5a;
    }
    let total = body.len();
    let (start, end) = match header_str(&headers, header::RANGE)
        .as_deref()
        .and_then(parse_range)
    {
        Some((s, e)) if s < total => (s, e.unwrap_or(total - 1).min(total - 1)),
        Some(_) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{total}"))
                .body(Body::empty())
                .unwrap()
        }
        None => (0, total.saturating_sub(1)),
    };
    let ranged = header_str(&headers, header::RANGE).is_some();
    let slice = if total == 0 {
        Vec::new()
    } else {
        body[start..=end].to_vec()
    };
    let tag = etag(&file, bytes);
    let mut resp = Response::builder()
        .status(if ranged { 206 } else { 200 })
        .header(header::CONTENT_LENGTH, slice.len())
        .header(header::ETAG, format!("\"{tag}\""))
        .header("X-Repo-Commit", &repo.commit)
        .header(header::ACCEPT_RANGES, "bytes");
    if file.ends_with(".safetensors") {
        resp = resp
            .header("X-Linked-Etag", format!("\"{tag}\""))
            .header("X-Linked-Size", total);
    }
    if ranged {
        resp = resp.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{end}/{total}"),
        );
    }
    if method == Method::HEAD {
        return resp.body(Body::empty()).unwrap();
    }
    let cut = drop_after.map(|n| n.min(slice.len()));
    let chunks: Vec<Vec<u8>> = slice[..cut.unwrap_or(slice.len())]
        .chunks(64 * 1024)
        .map(<[u8]>::to_vec)
        .collect();
    let stream = futures_util::stream::unfold(
        (chunks.into_iter(), cut.is_some(), false),
        move |(mut it, cut, done)| async move {
            if done {
                return None;
            }
            match it.next() {
                Some(c) => {
                    if let Some(p) = slow {
                        tokio::time::sleep(p).await;
                    }
                    Some((Ok::<_, std::io::Error>(c), (it, cut, false)))
                }
                None if cut => Some((
                    {
                        // Let the server flush what was sent before the connection is cut.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "injected drop",
                        ))
                    },
                    (it, cut, true),
                )),
                None => None,
            }
        },
    );
    resp.body(Body::from_stream(stream)).unwrap()
}

/// The `bytes=0-0` request `hf-hub` and `huggingface_hub` make for a file's headers.
fn is_probe(h: &HeaderMap) -> bool {
    h.get(header::RANGE).and_then(|v| v.to_str().ok()) == Some("bytes=0-0")
}

/// `bytes=a-` / `bytes=a-b` → (a, b).
fn parse_range(v: &str) -> Option<(usize, Option<usize>)> {
    let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
    let a = a.trim().parse().ok()?;
    let b = if b.trim().is_empty() {
        None
    } else {
        Some(b.trim().parse().ok()?)
    };
    Some((a, b))
}
