//! Helpers shared by the workspace's tests, benches and in-source test modules: where the shared
//! data and the fixtures are, comparisons of float slices, readers of the reference files, running
//! a command-line binary, a real tmpfs for the disk-full tests, and the RNG lock.
//!
//! A dev-dependency only (`test-support.workspace = true` under `[dev-dependencies]`). It depends on
//! no crate of the workspace, so every one of them can use it; what needs a model, a tensor or a
//! dataset type stays with the tests of the crate that has it.
#![forbid(unsafe_code)]

mod compare;
mod files;
pub mod mock_hub;
mod paths;
mod process;
pub mod tmpfs;

pub use compare::{
    assert_close, assert_close_elementwise, assert_close_scaled, assert_within_relative, max_abs,
    max_abs_err, max_rel_err,
};
pub use files::{
    copy_dir_files, edit_safetensors, read_json, read_reference, read_safetensors,
    trainer_step_losses, write_safetensors, Ref, Tensors,
};
pub use paths::{ci, fixtures, shared_data, shared_data_or_skip, workspace_root};
pub use process::{run, run_ok, xtask_demo};

use std::sync::{Mutex, MutexGuard};

/// Burn's CPU RNG is one global stream: tests that seed it and draw from it (adapter init,
/// dropout) and compare the draws must not interleave, so each holds this lock while it runs. One
/// lock per test binary (one process); a test that panicked while holding it does not block the
/// others.
pub fn rng_lock() -> MutexGuard<'static, ()> {
    static RNG: Mutex<()> = Mutex::new(());
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}
