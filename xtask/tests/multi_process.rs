//! `finetune` launched as torchrun launches it: two processes on this machine, told their place by
//! WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (free 127.0.0.1 ports), the gradients
//! summed through rank 0's burn-collective orchestrator. Against one process with the same global
//! batch, and with a rank killed or stopped mid-run.
//!
//! Each run trains the built-in demo's tiny model for a few steps (about a second).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use test_support::{max_rel_err, read_safetensors, run_ok, trainer_step_losses, xtask_demo};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A port `p` with `p + 1` free too (the orchestrator's and the watchdog's), drawn from below the
/// range the system takes ports for outgoing connections from (32768 and up on Linux), so that
/// none of those takes it before the rank binds it.
fn free_ports() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let p = 12_000 + (h.finish() % 20_000) as u16;
        let both = TcpListener::bind(("0.0.0.0", p)).is_ok()
            && TcpListener::bind(("0.0.0.0", p + 1)).is_ok();
        if both {
            return p;
        }
    }
}

/// `finetune` on the demo into `out`, batch 2, random-initialized B (so that every element of the
/// adapter is far from zero and the comparison measures the sum, not Adam's first step on
/// near-zero gradients), then `extra`.
fn args(demo: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "finetune",
        "--model",
        s(&demo.join("model")),
        "--data",
        s(&demo.join("data.json")),
        "--output-dir",
        s(out),
        "--per-device-train-batch-size",
        "2",
        "--init-lora-weights",
        "false",
        "--logging-steps",
        "1",
        "--max-length",
        "160",
        "--lint",
        "warn",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// Starts rank `rank` of `world` with rank 0 at 127.0.0.1:`port`.
fn rank(rank: usize, world: usize, port: u16, args: &[String]) -> Child {
    Command::new(XTASK)
        .args(args)
        .env("WORLD_SIZE", world.to_string())
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child`; a child still running after `limit` is killed and the test fails (a run that
/// hangs fails here instead of hanging the suite).
fn finish(mut child: Child, what: &str, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} was still running after {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Every f32 tensor of an adapter file, by name.
fn adapter(dir: &Path) -> Vec<(String, Vec<f32>)> {
    read_safetensors(&dir.join("adapter_model.safetensors"))
        .into_iter()
        .map(|(k, (_, _, bytes))| {
            let v = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (k, v)
        })
        .collect()
}

/// A run that goes on until a rank is killed or stopped, one rank's micro-batch per step, a
/// checkpoint after every step.
const LONG_RUN: &[&str] = &[
    "--max-steps",
    "100000",
    "--save-steps",
    "1",
    "--gradient-accumulation-steps",
    "1",
];

fn demo(tmp: &Path) -> PathBuf {
    let dir = tmp.join("demo");
    xtask_demo(XTASK, &dir);
    dir
}

/// Two processes × accumulation 2 against one process × accumulation 4 (the same examples in
/// every step): the step losses are equal bit for bit (each travels exactly), the gradients differ
/// only in summation order ((g0 + g2) + (g1 + g3) against ((g0 + g1) + g2) + g3), so the adapters
/// agree within 1e-6 of each tensor's largest value. Only rank 0 writes; rank 1 prints no result.
#[test]
fn two_processes_over_loopback_equal_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = demo(tmp.path());
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let steps = ["--max-steps", "4", "--save-steps", "2"];
    run_ok(
        XTASK,
        args(
            &demo,
            &one,
            &[&steps[..], &["--gradient-accumulation-steps", "4"]].concat(),
        ),
    );
    let port = free_ports();
    let a = args(
        &demo,
        &two,
        &[&steps[..], &["--gradient-accumulation-steps", "2"]].concat(),
    );
    let r1 = rank(1, 2, port, &a);
    let r0 = rank(0, 2, port, &a);
    let limit = Duration::from_secs(300);
    let (o0, o1) = (finish(r0, "rank 0", limit), finish(r1, "rank 1", limit));
    let both = || {
        format!(
            "rank 0:\n{}\nrank 1:\n{}",
            text(&o0.stderr),
            text(&o1.stderr)
        )
    };
    assert!(o0.status.success(), "rank 0 failed: {}", both());
    assert!(o1.status.success(), "rank 1 failed: {}", both());
    assert!(
        text(&o0.stdout).contains("done: 4 steps"),
        "{}",
        text(&o0.stdout)
    );
    // The collective engine's own prints go to stderr: stdout stays the command's lines.
    assert!(
        !text(&o0.stdout).contains("Connecting to"),
        "{}",
        text(&o0.stdout)
    );
    assert!(
        !text(&o1.stdout).contains("done:"),
        "rank 1 reports nothing of its own:\n{}",
        text(&o1.stdout)
    );

    let (l1, l2) = (trainer_step_losses(&one), trainer_step_losses(&two));
    assert_eq!(l1.len(), 4);
    assert_eq!(l1[0], l2[0], "the first step's loss travels exactly");
    for (i, (a, b)) in l1.iter().zip(&l2).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * a.abs(),
            "step {}: {a} vs {b}",
            i + 1
        );
    }
    let (a1, a2) = (adapter(&one), adapter(&two));
    assert_eq!(a1.len(), a2.len());
    let mut worst = 0f32;
    for ((name, x), (_, y)) in a1.iter().zip(&a2) {
        let e = max_rel_err(y, x);
        assert!(e <= 1e-6, "{name}: {e:e}");
        worst = worst.max(e);
    }
    println!("two processes against one: adapter within {worst:e}");
    for c in ["checkpoint-2", "checkpoint-4"] {
        assert!(
            two.join(c).join("adapter_model.safetensors").is_file(),
            "{c}"
        );
    }
}

/// Waits until `dir` holds a complete `checkpoint-1` (rank 0 wrote its first checkpoint: every rank
/// is past registration and training).
fn wait_for_checkpoint(dir: &Path, ranks: &mut [Child]) {
    let start = Instant::now();
    while !dir.join("checkpoint-1/trainer_state.json").is_file() {
        if start.elapsed() > Duration::from_secs(300) {
            for r in ranks.iter_mut() {
                let _ = r.kill();
            }
            panic!("no checkpoint-1 in {} after 300 s", dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ranks 0 and 1 of a [`LONG_RUN`] on the demo into `out`, then `extra`, once rank 0 wrote
/// `checkpoint-1`.
fn start_long_pair(demo: &Path, out: &Path, extra: &[&str]) -> Vec<Child> {
    let port = free_ports();
    let a = args(demo, out, &[LONG_RUN, extra].concat());
    let mut ranks = vec![rank(0, 2, port, &a), rank(1, 2, port, &a)];
    wait_for_checkpoint(out, &mut ranks);
    ranks
}

/// Sends `child` the signal `kill -SIG` names (`INT`, `STOP`).
#[cfg(unix)]
fn signal(child: &Child, sig: &str) {
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args([&format!("-{sig}"), &pid])
        .status()
        .unwrap()
        .success());
}

/// A rank that dies makes the other stop with an error naming it (rank 1 killed: rank 0 says so;
/// rank 0 killed: rank 1 says so), the last checkpoint stays complete, and a run with another
/// world size resumes from it.
#[test]
fn a_killed_rank_stops_the_other_with_its_name() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = demo(tmp.path());
    for (killed, survivor) in [(1usize, 0usize), (0, 1)] {
        let out = tmp.path().join(format!("killed-{killed}"));
        // The closed connection names the dead rank at once; should it not arrive, its silence
        // does after this.
        let mut ranks = start_long_pair(&demo, &out, &["--ddp-timeout", "20"]);
        ranks[killed].kill().unwrap();
        let _ = ranks[killed].wait();
        let other = ranks.remove(survivor);
        let o = finish(other, &format!("rank {survivor}"), Duration::from_secs(120));
        let err = text(&o.stderr);
        assert!(!o.status.success(), "rank {survivor} must fail:\n{err}");
        assert!(
            err.contains(&format!("rank {killed} stopped"))
                || err.contains(&format!("rank {killed} has sent nothing"))
                || err.contains(&format!("rank(s) {killed} did not reach")),
            "rank {survivor}'s error names rank {killed}:\n{err}"
        );
        // The newest checkpoint is complete, and one process (2 micro-batches per step, as the
        // two ranks took) resumes from it.
        let latest = lora_trainer::checkpoint::checkpoints(&out)
            .pop()
            .expect("a checkpoint")
            .0;
        let (resumed, _) = run_ok(
            XTASK,
            args(
                &demo,
                &out,
                &[
                    "--max-steps",
                    &(latest + 1).to_string(),
                    "--save-steps",
                    "1",
                    "--gradient-accumulation-steps",
                    "2",
                    "--resume-from-checkpoint",
                    "latest",
                ],
            ),
        );
        assert!(
            resumed.contains(&format!("(1 this run, resumed at step {latest})")),
            "{resumed}"
        );
    }
}

/// Ctrl-C on rank 0 of a multi-process run stops it at once with status 130 and where to resume
/// (its orchestrator ends with the signal), and rank 1 stops naming rank 0.
#[cfg(unix)]
#[test]
fn ctrl_c_on_rank_0_stops_both() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = demo(tmp.path());
    let out = tmp.path().join("interrupted");
    let mut ranks = start_long_pair(&demo, &out, &[]);
    signal(&ranks[0], "INT");
    let r1 = ranks.pop().unwrap();
    let r0 = ranks.pop().unwrap();
    let limit = Duration::from_secs(120);
    let (o0, o1) = (finish(r0, "rank 0", limit), finish(r1, "rank 1", limit));
    let (e0, e1) = (text(&o0.stderr), text(&o1.stderr));
    assert_eq!(o0.status.code(), Some(130), "rank 0:\n{e0}");
    assert!(e0.contains("--resume-from-checkpoint latest"), "{e0}");
    assert!(!o1.status.success(), "rank 1 must fail:\n{e1}");
    assert!(e1.contains("rank 0 stopped"), "rank 1 names rank 0:\n{e1}");
}

/// A rank that hangs (stopped with SIGSTOP) makes rank 0 stop after --ddp-timeout with an error
/// naming it.
#[cfg(unix)]
#[test]
fn a_stopped_rank_is_named_after_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = demo(tmp.path());
    let out = tmp.path().join("hang");
    let mut ranks = start_long_pair(&demo, &out, &["--ddp-timeout", "3"]);
    signal(&ranks[1], "STOP");
    let r0 = ranks.remove(0);
    let o = finish(r0, "rank 0", Duration::from_secs(120));
    let _ = ranks[0].kill();
    let _ = ranks[0].wait();
    let err = text(&o.stderr);
    assert!(!o.status.success(), "rank 0 must fail:\n{err}");
    assert!(
        err.contains("rank(s) 1 did not reach") || err.contains("rank 1 has sent nothing"),
        "rank 0's error names rank 1:\n{err}"
    );
}
