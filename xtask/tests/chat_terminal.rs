//! `cargo xtask chat` typed at on a terminal: the command runs on a pseudo-terminal (as in a shell)
//! and the test types keys at it, as a user would. The `user> ` prompt edits the line and recalls
//! earlier messages; Ctrl-C stops the answer being generated (the partial answer stays in the
//! conversation) and, at the prompt, gives a fresh one; Ctrl-D quits with status 0 after a newline.
//!
//! The model always answers "aaaa…" (see [`a_model`]), so an answer is still being streamed when
//! the test has seen it begin, however fast or slow the machine. Every expectation has a timeout;
//! none asserts a duration.

#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::Flex;
use qwen2::{Qwen2Config, Qwen2ForCausalLM};
use rexpect::process::WaitStatus;
use rexpect::session::{spawn_with_options, Options, PtySession};
use test_support::{edit_safetensors, shared_data_or_skip};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

/// Longest wait for any one expected output (loading the model comes first). Only a failing test
/// waits this long.
const TIMEOUT_MS: u64 = 120_000;

const CTRL_A: &str = "\x01";
const CTRL_C: &str = "\x03";
const CTRL_D: &str = "\x04";
const UP: &str = "\x1b[A";
const BACKSPACE: &str = "\x7f";
const ENTER: &str = "\r";

/// A model with the real vocabulary whose greedy answer to anything is "a" repeated: every layer
/// writes zero into the residual stream, so the last hidden state is the embedding (all ones, for
/// every token), and the head scores only the token `a`. Returns the model and tokenizer
/// directories.
fn a_model(dir: &Path, shared: &Path) -> (PathBuf, PathBuf) {
    let tok = shared.join("qwen2.5-tokenizer");
    let a = tokenizers::Tokenizer::from_file(tok.join("tokenizer.json"))
        .unwrap()
        .token_to_id("a")
        .unwrap() as usize;
    let model = dir.join("model");
    let hidden = 16;
    let cfg = Qwen2Config::new(151_936, hidden, 32, 1, 2, 1, false);
    qwen2::save_model(
        &Qwen2ForCausalLM::<Flex>::new(&cfg, &Default::default()),
        &cfg,
        &model,
    )
    .unwrap();
    for file in qwen2::weight_files(&model).unwrap() {
        edit_safetensors(&file, |tensors| {
            for (name, (_, shape, bytes)) in tensors.iter_mut() {
                let mut v = vec![0f32; shape.iter().product()];
                if name.ends_with("norm.weight") || name == "model.embed_tokens.weight" {
                    v.fill(1.0);
                } else if name == "lm_head.weight" {
                    // [vocab, hidden]: only the row of `a` sees the hidden state.
                    v[a * hidden..(a + 1) * hidden].fill(1.0);
                }
                *bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            }
        });
    }
    (model, tok)
}

/// `xtask chat` (interactive, greedy) on a new pseudo-terminal, `extra` flags appended.
fn chat(model: &Path, tok: &Path, extra: &[&str]) -> PtySession {
    let mut cmd = Command::new(XTASK);
    cmd.args(["chat", "--model", model.to_str().unwrap()])
        .args(["--tokenizer", tok.to_str().unwrap(), "--greedy"])
        .args(extra)
        // A terminal the line editor drives whatever the test runner's TERM (CI may have none).
        .env("TERM", "xterm");
    let options = Options::new()
        .timeout_ms(Some(TIMEOUT_MS))
        .strip_ansi_escape_codes(true);
    let mut p = spawn_with_options(cmd, options).expect("spawning xtask chat on a pty");
    // A failing test drops the session with the command still running: kill it, then.
    p.process_mut().set_kill_timeout(Some(5_000));
    p
}

/// Types `keys` (all at once, as a fast typist would).
fn keys(p: &mut PtySession, keys: &str) {
    p.send(keys).unwrap();
    p.flush().unwrap();
}

/// Waits for `needle` in the output after what was matched last; returns the text before it.
fn expect(p: &mut PtySession, needle: &str) -> String {
    p.exp_string(needle)
        .unwrap_or_else(|e| panic!("waiting for {needle:?}: {e}"))
}

/// Waits for the command to end; returns what it printed since the last match and its exit status.
fn expect_exit(p: &mut PtySession) -> (String, WaitStatus) {
    let rest = p
        .exp_eof()
        .unwrap_or_else(|e| panic!("waiting for the command to end: {e}"));
    (rest, p.process().wait().unwrap())
}

fn assert_exit_0(status: WaitStatus, transcript: &str) {
    assert!(
        matches!(status, WaitStatus::Exited(_, 0)),
        "exit status {status:?}; output:\n{transcript}"
    );
}

/// The next speed line (`[prompt N tokens (M cached), … | stop: …]`): N, M and the whole line.
fn expect_stats(p: &mut PtySession) -> (usize, usize, String) {
    expect(p, "[prompt ");
    let line = expect(p, "]");
    let parsed = line.split_once(" tokens (").and_then(|(n, rest)| {
        let (m, _) = rest.split_once(" cached)")?;
        Some((n.trim().parse().ok()?, m.trim().parse().ok()?))
    });
    let (n, m) = parsed.unwrap_or_else(|| panic!("not a speed line: [prompt {line}]"));
    (n, m, line)
}

/// Editing keys work at the prompt: `xit`, Ctrl-A (start of line), `e`, Enter sends `exit`, which
/// ends the session at once (without an editor the line would be `xit\x01e`, a message to answer).
#[test]
fn the_prompt_edits_the_line() {
    let Some(shared) = shared_data_or_skip("the_prompt_edits_the_line") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (model, tok) = a_model(tmp.path(), &shared);
    let mut p = chat(&model, &tok, &["--max-new-tokens", "3"]);
    expect(&mut p, "user> ");
    keys(&mut p, &format!("xit{CTRL_A}e{ENTER}"));
    let (rest, status) = expect_exit(&mut p);
    assert!(!rest.contains("[prompt "), "nothing answered: {rest}");
    assert_exit_0(status, &rest);
}

/// Up recalls the previous message: `exitx` is answered; Up, Backspace, Enter sends `exit`.
#[test]
fn up_recalls_the_previous_message() {
    let Some(shared) = shared_data_or_skip("up_recalls_the_previous_message") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (model, tok) = a_model(tmp.path(), &shared);
    let mut p = chat(&model, &tok, &["--max-new-tokens", "3"]);
    expect(&mut p, "user> ");
    keys(&mut p, &format!("exitx{ENTER}"));
    let (_, _, stats) = expect_stats(&mut p);
    assert!(stats.contains("stop: max_new_tokens"), "{stats}");
    expect(&mut p, "user> ");
    keys(&mut p, &format!("{UP}{BACKSPACE}{ENTER}"));
    let (rest, status) = expect_exit(&mut p);
    assert!(!rest.contains("[prompt "), "`exit` is not answered: {rest}");
    assert_exit_0(status, &rest);
}

/// Ctrl-C at the prompt gives a fresh prompt; Ctrl-C during an answer stops it, keeps the partial
/// answer as the assistant's turn (the next turn continues from it in the cache) and prompts
/// again; Ctrl-D at the prompt prints a newline and ends the session with status 0.
#[test]
fn ctrl_c_stops_the_answer_not_the_session_and_ctrl_d_quits() {
    let Some(shared) = shared_data_or_skip("ctrl_c_stops_the_answer_not_the_session") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (model, tok) = a_model(tmp.path(), &shared);
    // Far more tokens than any answer gets before the Ctrl-C that stops it.
    let mut p = chat(&model, &tok, &["--max-new-tokens", "1000000"]);
    expect(&mut p, "user> ");
    keys(&mut p, CTRL_C);
    expect(&mut p, "user> ");

    keys(&mut p, &format!("hello{ENTER}"));
    expect(&mut p, "aa");
    keys(&mut p, CTRL_C);
    let (first_prompt, cached, stats) = expect_stats(&mut p);
    assert_eq!(cached, 0, "{stats}");
    assert!(stats.contains("stop: interrupted"), "{stats}");
    expect(&mut p, "user> ");

    // The second prompt renders the first turn with its partial answer, so all of the first
    // prompt is reused from the cache. Had the answer been dropped, the conversation would go on
    // with a user turn where the assistant's began, two tokens before the end of the first prompt.
    keys(&mut p, &format!("again{ENTER}"));
    expect(&mut p, "aa");
    keys(&mut p, CTRL_C);
    let (_, cached, stats) = expect_stats(&mut p);
    assert!(
        cached >= first_prompt,
        "the first prompt ({first_prompt} tokens) and the partial answer are cached: {stats}"
    );
    assert!(stats.contains("stop: interrupted"), "{stats}");
    expect(&mut p, "user> ");

    keys(&mut p, CTRL_D);
    let (rest, status) = expect_exit(&mut p);
    assert!(
        rest.contains('\n'),
        "a newline after the prompt before exiting, so the shell's prompt starts a line: {rest:?}"
    );
    assert_exit_0(status, &rest);
}
