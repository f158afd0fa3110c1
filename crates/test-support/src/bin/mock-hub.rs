//! `mock-hub --repo ORG/NAME=DIR ... [--port N]`: the tests' mock of the Hugging Face hub and
//! ModelScope as a process, for scripts that point Python's `huggingface_hub` / `modelscope` at it.
//! Prints `listening http://127.0.0.1:PORT` and serves until killed.

use std::io::Write;
use std::path::Path;

use test_support::mock_hub::{MockHub, MockRepo};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut repos = Vec::new();
    let mut port = 0u16;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--repo" => {
                let spec = it.next().expect("--repo ORG/NAME=DIR");
                let (id, dir) = spec.split_once('=').expect("--repo ORG/NAME=DIR");
                repos.push(MockRepo::from_dir(id, Path::new(dir)));
            }
            "--port" => port = it.next().and_then(|p| p.parse().ok()).expect("--port N"),
            other => {
                eprintln!("mock-hub: unknown argument {other}; usage: mock-hub --repo ORG/NAME=DIR ... [--port N]");
                std::process::exit(2);
            }
        }
    }
    let hub = MockHub::start(repos, port);
    println!("listening {}", hub.url());
    std::io::stdout().flush().ok();
    loop {
        std::thread::park();
    }
}
