//! Downloads against the mock hub on a loopback port: the cache layout Python uses, no request for a
//! complete copy, resume after a dropped connection or a killed process, checksums, HTTP errors,
//! offline mode, ModelScope.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lora_hub::{fetch_hf, fetch_modelscope, HfConfig, HubError, Kind, MsConfig};
use test_support::mock_hub::{etag, MockHub, MockRepo};

const REPO: &str = "Qwen/Tiny-Instruct";
const WEIGHTS: &str = "model.safetensors";

/// Bytes that differ at every position (so a resumed or corrupted download cannot pass by luck).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn model_files(model_type: &str) -> BTreeMap<String, Vec<u8>> {
    let mut f = BTreeMap::new();
    let config =
        format!(r#"{{"model_type": "{model_type}", "architectures": ["Qwen2ForCausalLM"]}}"#);
    let config = if model_type == "qwen2" {
        config
    } else {
        format!(r#"{{"model_type": "{model_type}", "architectures": ["LlamaForCausalLM"]}}"#)
    };
    f.insert("config.json".into(), config.into_bytes());
    f.insert(
        "generation_config.json".into(),
        br#"{"eos_token_id": 2}"#.to_vec(),
    );
    f.insert("tokenizer.json".into(), br#"{"model": {}}"#.to_vec());
    f.insert("tokenizer_config.json".into(), br#"{}"#.to_vec());
    f.insert(WEIGHTS.into(), noise(300_000, 1));
    // Not needed by a run: never fetched.
    f.insert("README.md".into(), b"# tiny".to_vec());
    f.insert("pytorch_model.bin".into(), noise(1000, 2));
    f
}

fn tiny() -> MockRepo {
    MockRepo::new(REPO, model_files("qwen2"))
}

fn cfg(hub: &MockHub, cache: &Path) -> HfConfig {
    HfConfig {
        endpoint: hub.url(),
        cache: cache.to_path_buf(),
        token: None,
        offline: false,
    }
}

fn ms_cfg(hub: &MockHub, cache: &Path) -> MsConfig {
    MsConfig {
        endpoint: hub.url(),
        cache: cache.to_path_buf(),
        token: None,
        offline: false,
    }
}

fn get(cfg: &HfConfig, repo: &str) -> Result<PathBuf, HubError> {
    fetch_hf(cfg, repo, Kind::Model, Some("main"))
}

/// The bodies fetched (not the `bytes=0-0` header probes), by file.
fn bodies(hub: &MockHub) -> Vec<String> {
    hub.requests()
        .into_iter()
        .filter(|r| r.range.as_deref() != Some("bytes=0-0") && r.method == "GET")
        .filter_map(|r| {
            let uri = r.uri;
            if let Some(i) = uri.find("/resolve/") {
                Some(
                    uri[i + 9..]
                        .split_once('/')
                        .map_or(uri.clone(), |x| x.1.to_string()),
                )
            } else {
                uri.split("FilePath=").nth(1).map(str::to_string)
            }
        })
        .collect()
}

#[test]
fn a_model_lands_in_the_hub_cache_layout_and_a_second_run_asks_nothing() {
    let repo = tiny();
    let hub = MockHub::start(vec![repo.clone()], 0);
    let cache = tempfile::tempdir().unwrap();
    let c = cfg(&hub, cache.path());
    let dir = get(&c, REPO).unwrap();

    let root = cache.path().join("models--Qwen--Tiny-Instruct");
    assert_eq!(dir, root.join("snapshots").join(&repo.commit));
    assert_eq!(
        std::fs::read_to_string(root.join("refs/main")).unwrap(),
        repo.commit
    );
    for name in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        WEIGHTS,
    ] {
        let p = dir.join(name);
        let link = std::fs::read_link(&p).unwrap_or_else(|e| panic!("{name} is not a link: {e}"));
        let tag = etag(name, &repo.files[name]);
        assert_eq!(link, Path::new("../../blobs").join(&tag), "{name}");
        assert_eq!(std::fs::read(&p).unwrap(), repo.files[name], "{name}");
    }
    // What a run does not read is not fetched; what the repo lacks is marked as Python marks it.
    assert!(!dir.join("README.md").exists() && !dir.join("pytorch_model.bin").exists());
    assert!(root
        .join(".no_exist")
        .join(&repo.commit)
        .join("vocab.json")
        .is_file());
    let mut fetched = bodies(&hub);
    fetched.sort();
    assert_eq!(
        fetched,
        [
            "config.json",
            "generation_config.json",
            WEIGHTS,
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    // Nothing partial is left.
    for e in std::fs::read_dir(root.join("blobs")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(
            name.len() == 64 || name.len() == 40,
            "left in blobs/: {name}"
        );
    }

    hub.clear_log();
    assert_eq!(get(&c, REPO).unwrap(), dir);
    assert_eq!(
        fetch_hf(&c, REPO, Kind::Model, Some(&repo.commit)).unwrap(),
        dir
    );
    assert!(
        hub.requests().is_empty(),
        "a complete copy made requests: {:?}",
        hub.requests()
    );
}

#[test]
fn sharded_weights_come_with_every_shard_the_index_names() {
    let mut files = model_files("qwen2");
    files.remove(WEIGHTS);
    files.insert(
        "model.safetensors.index.json".into(),
        br#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#
            .to_vec(),
    );
    files.insert("model-00001-of-00002.safetensors".into(), noise(70_000, 3));
    files.insert("model-00002-of-00002.safetensors".into(), noise(50_000, 4));
    let repo = MockRepo::new(REPO, files);
    let hub = MockHub::start(vec![repo.clone()], 0);
    let cache = tempfile::tempdir().unwrap();
    let dir = get(&cfg(&hub, cache.path()), REPO).unwrap();
    for name in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        assert_eq!(std::fs::read(dir.join(name)).unwrap(), repo.files[name]);
    }
}

#[test]
fn a_dropped_connection_resumes_from_the_bytes_received() {
    let repo = tiny();
    let hub = MockHub::start(vec![repo.clone()], 0);
    hub.drop_once(WEIGHTS, 100_000);
    let cache = tempfile::tempdir().unwrap();
    let dir = get(&cfg(&hub, cache.path()), REPO).unwrap();
    assert_eq!(
        std::fs::read(dir.join(WEIGHTS)).unwrap(),
        repo.files[WEIGHTS]
    );
    let ranges: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.uri.ends_with(WEIGHTS))
        .filter_map(|r| r.range)
        .collect();
    assert!(
        ranges.contains(&"bytes=100000-".to_string()),
        "no resumed request: {:?}",
        hub.requests()
    );
}

#[test]
fn a_partial_file_left_by_a_killed_process_is_continued() {
    let repo = tiny();
    let hub = MockHub::start(vec![repo.clone()], 0);
    let cache = tempfile::tempdir().unwrap();
    let tag = etag(WEIGHTS, &repo.files[WEIGHTS]);
    let blobs = cache.path().join("models--Qwen--Tiny-Instruct/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(
        blobs.join(format!("{tag}.incomplete")),
        &repo.files[WEIGHTS][..123_456],
    )
    .unwrap();
    let dir = get(&cfg(&hub, cache.path()), REPO).unwrap();
    assert_eq!(
        std::fs::read(dir.join(WEIGHTS)).unwrap(),
        repo.files[WEIGHTS]
    );
    let ranges: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.uri.ends_with(WEIGHTS) && r.range.as_deref() != Some("bytes=0-0"))
        .map(|r| r.range)
        .collect();
    assert_eq!(ranges, [Some("bytes=123456-".to_string())]);
    assert!(!blobs.join(format!("{tag}.incomplete")).exists());
}

#[test]
fn a_corrupted_body_is_caught_by_the_checksum_and_nothing_is_kept() {
    let repo = tiny();
    let hub = MockHub::start(vec![repo.clone()], 0);
    hub.corrupt(WEIGHTS);
    let cache = tempfile::tempdir().unwrap();
    let e = get(&cfg(&hub, cache.path()), REPO).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, HubError::Integrity { .. }), "{msg}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("sha256"),
        "{msg}"
    );
    let root = cache.path().join("models--Qwen--Tiny-Instruct");
    let tag = etag(WEIGHTS, &repo.files[WEIGHTS]);
    assert!(!root.join("blobs").join(&tag).exists());
    assert!(!root
        .join("blobs")
        .join(format!("{tag}.incomplete"))
        .exists());
    assert!(!root
        .join("snapshots")
        .join(&repo.commit)
        .join(WEIGHTS)
        .exists());
    // A small (git) file is checked too.
    hub.corrupt("tokenizer.json");
    let e = get(&cfg(&hub, tempfile::tempdir().unwrap().path()), REPO).unwrap_err();
    assert!(
        e.to_string().contains("tokenizer.json") && e.to_string().contains("git blob sha1"),
        "{e}"
    );
}

#[test]
fn http_errors_say_what_to_do() {
    let hub = MockHub::start(
        vec![tiny(), MockRepo::new("Org/Gated", model_files("qwen2"))],
        0,
    );
    let cache = tempfile::tempdir().unwrap();
    let c = cfg(&hub, cache.path());

    let e = get(&c, "Org/Missing").unwrap_err().to_string();
    assert!(
        e.contains("has no repository Org/Missing") && e.contains("404"),
        "{e}"
    );
    let e = fetch_hf(&c, REPO, Kind::Model, Some("no-such-branch"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("revision no-such-branch"), "{e}");

    hub.gate("Org/Gated", "secret");
    let e = get(&c, "Org/Gated").unwrap_err().to_string();
    assert!(e.contains("401") && e.contains("HF_TOKEN"), "{e}");
    let wrong = HfConfig {
        token: Some("other".into()),
        ..c.clone()
    };
    let e = get(&wrong, "Org/Gated").unwrap_err().to_string();
    assert!(
        e.contains("403") && e.contains("accept the model's terms"),
        "{e}"
    );
    let right = HfConfig {
        token: Some("secret".into()),
        ..c.clone()
    };
    get(&right, "Org/Gated").unwrap();
    assert!(hub
        .requests()
        .iter()
        .filter(|r| r.uri.contains("Org/Gated") && r.uri.contains("/resolve/"))
        .all(|r| r.authorization.is_some()));

    hub.fail(REPO, 500);
    let e = get(&c, REPO).unwrap_err().to_string();
    assert!(
        e.contains("HTTP 500") && e.contains("try again later"),
        "{e}"
    );
}

#[test]
fn offline_mode_uses_the_cache_only() {
    let hub = MockHub::start(vec![tiny()], 0);
    let cache = tempfile::tempdir().unwrap();
    let offline = HfConfig {
        offline: true,
        ..cfg(&hub, cache.path())
    };
    let e = get(&offline, REPO).unwrap_err().to_string();
    assert!(e.contains("HF_HUB_OFFLINE") && e.contains(REPO), "{e}");
    assert!(hub.requests().is_empty());
    let dir = get(&cfg(&hub, cache.path()), REPO).unwrap();
    hub.clear_log();
    assert_eq!(get(&offline, REPO).unwrap(), dir);
    assert!(hub.requests().is_empty());
}

#[test]
fn no_network_and_nothing_cached_names_what_is_missing() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cache = tempfile::tempdir().unwrap();
    let c = HfConfig {
        endpoint: format!("http://127.0.0.1:{port}"),
        cache: cache.path().to_path_buf(),
        token: None,
        offline: false,
    };
    let e = get(&c, REPO).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, HubError::Unreachable { .. }), "{msg}");
    assert!(
        msg.contains("cannot reach")
            && msg.contains("HF_ENDPOINT")
            && msg.contains("revision main"),
        "{msg}"
    );
}

#[test]
fn another_architecture_stops_before_its_weights() {
    let hub = MockHub::start(vec![MockRepo::new("meta/Llama", model_files("llama"))], 0);
    let cache = tempfile::tempdir().unwrap();
    let e = get(&cfg(&hub, cache.path()), "meta/Llama")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not a Qwen2 model") && e.contains("llama"),
        "{e}"
    );
    assert_eq!(bodies(&hub), ["config.json"]);
}

#[test]
fn adapters_come_as_their_two_files() {
    let mut files = BTreeMap::new();
    files.insert("adapter_config.json".to_string(), br#"{"r": 8}"#.to_vec());
    files.insert("adapter_model.safetensors".to_string(), noise(5000, 9));
    files.insert("README.md".to_string(), b"x".to_vec());
    let repo = MockRepo::new("me/lora", files);
    let hub = MockHub::start(vec![repo.clone(), tiny()], 0);
    let cache = tempfile::tempdir().unwrap();
    let c = cfg(&hub, cache.path());
    let dir = fetch_hf(&c, "me/lora", Kind::Adapter, None).unwrap();
    assert_eq!(
        std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
        repo.files["adapter_model.safetensors"]
    );
    assert!(!dir.join("README.md").exists());
    let e = fetch_hf(&c, REPO, Kind::Adapter, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("has no adapter_config.json") && e.contains("not a PEFT adapter"),
        "{e}"
    );
}

#[test]
fn modelscope_downloads_into_its_own_layout() {
    let repo = MockRepo::new("qwen/Tiny-Instruct", model_files("qwen2"));
    let hub = MockHub::start(vec![repo.clone()], 0);
    let cache = tempfile::tempdir().unwrap();
    let c = ms_cfg(&hub, cache.path());
    hub.drop_once(WEIGHTS, 70_000);
    let dir = fetch_modelscope(&c, "qwen/Tiny-Instruct", Kind::Model, None).unwrap();
    assert_eq!(
        dir,
        cache
            .path()
            .join("models/qwen--Tiny-Instruct/snapshots/master")
    );
    for name in ["config.json", "tokenizer.json", WEIGHTS] {
        assert_eq!(
            std::fs::read(dir.join(name)).unwrap(),
            repo.files[name],
            "{name}"
        );
    }
    assert!(!dir.join("README.md").exists());
    assert!(
        bodies(&hub)
            .iter()
            .filter(|f| f.as_str() == WEIGHTS)
            .count()
            == 2,
        "{:?}",
        bodies(&hub)
    );
    hub.clear_log();
    assert_eq!(
        fetch_modelscope(&c, "qwen/Tiny-Instruct", Kind::Model, None).unwrap(),
        dir
    );
    assert!(hub.requests().is_empty());

    // An older `modelscope`'s layout is used as it is.
    let old = tempfile::tempdir().unwrap();
    let legacy = old.path().join("hub/models/qwen/Tiny___Instruct2");
    std::fs::create_dir_all(&legacy).unwrap();
    for name in ["config.json", "tokenizer.json", WEIGHTS] {
        std::fs::write(legacy.join(name), &repo.files[name]).unwrap();
    }
    let c_old = ms_cfg(&hub, old.path());
    assert_eq!(
        fetch_modelscope(&c_old, "qwen/Tiny.Instruct2", Kind::Model, None).unwrap(),
        legacy
    );

    let fresh = tempfile::tempdir().unwrap();
    hub.corrupt(WEIGHTS);
    let e = fetch_modelscope(
        &ms_cfg(&hub, fresh.path()),
        "qwen/Tiny-Instruct",
        Kind::Model,
        None,
    )
    .unwrap_err();
    assert!(matches!(e, HubError::Integrity { .. }), "{e}");
    assert!(!fresh
        .path()
        .join("models/qwen--Tiny-Instruct/snapshots/master")
        .join(WEIGHTS)
        .exists());
    let e = fetch_modelscope(
        &ms_cfg(&hub, fresh.path()),
        "qwen/Nothing",
        Kind::Model,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("ModelScope has no repository qwen/Nothing"),
        "{e}"
    );
}

#[test]
fn a_full_disk_stops_cleanly_and_the_download_resumes_after() {
    let Some(fs) = test_support::tmpfs::Tmpfs::mount(200 * 1024) else {
        return;
    };
    let repo = tiny();
    let hub = MockHub::start(vec![repo.clone()], 0);
    let c = cfg(&hub, fs.path());
    let e = get(&c, REPO).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, HubError::DiskFull { .. }), "{msg}");
    assert!(
        msg.contains("disk full") && msg.contains("HF_HUB_CACHE"),
        "{msg}"
    );
    let root = fs.path().join("models--Qwen--Tiny-Instruct");
    assert!(!root
        .join("snapshots")
        .join(&repo.commit)
        .join(WEIGHTS)
        .exists());
    fs.resize(2 * 1024 * 1024);
    hub.clear_log();
    let dir = get(&c, REPO).unwrap();
    assert_eq!(
        std::fs::read(dir.join(WEIGHTS)).unwrap(),
        repo.files[WEIGHTS]
    );
    let resumed = hub
        .requests()
        .into_iter()
        .any(|r| r.uri.ends_with(WEIGHTS) && r.range.as_deref().is_some_and(|x| x != "bytes=0-0"));
    assert!(resumed, "the second run started over");
}

#[test]
fn a_config_alone_is_fetched_alone_and_the_model_completes_it_later() {
    let repo = tiny();
    let hub = MockHub::start(vec![repo.clone()], 0);
    let cache = tempfile::tempdir().unwrap();
    let c = cfg(&hub, cache.path());
    let dir = fetch_hf(&c, REPO, Kind::Config, Some("main")).unwrap();
    assert_eq!(bodies(&hub), ["config.json"]);
    assert!(dir.join("config.json").is_file() && !dir.join(WEIGHTS).exists());
    hub.clear_log();
    assert_eq!(fetch_hf(&c, REPO, Kind::Config, Some("main")).unwrap(), dir);
    assert!(hub.requests().is_empty());
    assert_eq!(get(&c, REPO).unwrap(), dir);
    assert_eq!(
        std::fs::read(dir.join(WEIGHTS)).unwrap(),
        repo.files[WEIGHTS]
    );
}
