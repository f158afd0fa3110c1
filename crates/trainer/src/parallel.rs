//! Data parallelism in one process: W worker threads, each with its own copy of the model (on one
//! shared device, or one device each), gradients summed with Burn's collective engine
//! (`burn-collective`, its local server: threads of one process).
//!
//! The semantics are transformers' `Trainer` under DDP. `per_device_train_batch_size` is per worker,
//! and one optimizer step consumes `W × gradient_accumulation_steps` micro-batches in the order the
//! single-device sampler hands them out; micro-batch `k` of the step goes to worker `k mod W`. So a
//! step trains on exactly the examples of a single-device step with `gradient_accumulation_steps × W`
//! (and an epoch's short last step is short in the same way). Every worker divides by the supervised
//! tokens of the whole step (the trainer's normalization), the per-worker gradient sums are
//! all-reduced (`Sum`), and every worker clips and steps its own AdamW on the same reduced gradient,
//! so the copies stay bitwise equal. A worker with no micro-batch in a step (an epoch's last step
//! can have fewer than W) contributes zeros and still joins the all-reduce.
//!
//! One all-reduce per step carries everything (DDP's gradient buckets, as one bucket): the
//! per-micro-batch losses, exactly (each f64 split into three f32 parts, every other worker adding
//! zeros), so the logged step loss is the single-device one bit for bit; the token count; and every
//! gradient, flattened on the device. The gradients differ from the single-device sum only in
//! summation order (worker sums first). Across processes (`crate::launch`) each rank is one node
//! of the collective engine's global level.
//!
//! Not burn-optim's `GradientsParams::all_reduce` (its `collective` feature): it reduces the
//! gradients a worker holds, so an idle worker (no micro-batch, no gradients) would leave the
//! others waiting; here the parameters come from the model, the same list on every worker.

use std::sync::{Arc, Mutex, MutexGuard};

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_collective::{
    all_reduce, finish_collective, register, reset_collective, CollectiveConfig, PeerId,
    ReduceOperation,
};

use crate::error::TrainError;
use crate::launch::{Node, ProcessGroup, Progress};

/// Burn's local collective server is one per backend type and process, and a peer id registers
/// once: data-parallel runs in one process (tests run in parallel) take turns.
static RUNS: Mutex<()> = Mutex::new(());

/// Holds the process's collective engine for one data-parallel run on backend `B`, cleared of
/// whatever an earlier run that failed midway (a panic) left registered.
pub(crate) fn exclusive<B: AutodiffBackend>() -> MutexGuard<'static, ()> {
    let turn = RUNS.lock().unwrap_or_else(|e| e.into_inner());
    // Queued before any of this run's registrations, on the same channel to the server.
    reset_collective::<B::InnerBackend>();
    turn
}

fn collective_error(what: &str, e: burn_collective::CollectiveError) -> TrainError {
    TrainError::Collective {
        reason: format!("{what}: {e:?}"),
    }
}

/// How long a rank whose collective operation failed waits for the watchdog to name a dead rank
/// before it reports the engine's own error.
const NAMING_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// One worker of a data-parallel run, registered with the collective engine.
pub(crate) struct Peer<B: AutodiffBackend> {
    /// This worker (0 leads: logs, checkpoints, the adapter).
    pub id: usize,
    /// Workers in all.
    pub world: usize,
    device: B::Device,
    /// In a multi-process run, the watchdog's count of this rank's operations.
    progress: Option<Arc<Progress>>,
    /// In a multi-process run, this rank as a node of the engine's global level.
    node: Option<Node>,
}

impl<B: AutodiffBackend> Peer<B> {
    /// Registers worker `id` of `world` on `device`; returns once all `world` have registered.
    /// In one process all `world` workers are its threads; with `group` (a multi-process run)
    /// this process is rank `id`'s only worker and the others join through rank 0's orchestrator.
    pub fn register(
        id: usize,
        world: usize,
        device: &B::Device,
        group: Option<(&ProcessGroup, Arc<Progress>)>,
    ) -> Result<Self, TrainError> {
        let (progress, node) = match group {
            None => {
                let config = CollectiveConfig::default().with_num_devices(world);
                register::<B::InnerBackend>(PeerId::from(id), device.clone(), config)
                    .map_err(|e| collective_error("registering a data-parallel worker", e))?;
                (None, None)
            }
            Some((g, progress)) => (Some(progress), Some(Node::new(g)?)),
        };
        Ok(Self {
            id,
            world,
            device: device.clone(),
            progress,
            node,
        })
    }

    /// Whether micro-batch `k` of a step is this worker's.
    pub fn owns(&self, k: usize) -> bool {
        k % self.world == self.id
    }

    fn reduce<const D: usize>(
        &self,
        t: Tensor<B::InnerBackend, D>,
    ) -> Result<Tensor<B::InnerBackend, D>, TrainError> {
        if let Some(p) = &self.progress {
            p.enter();
        }
        // Across processes each operation registers, reduces and leaves. burn-collective 0.21.0
        // can do one global operation per registration: `SyncService::sync`
        // (src/global/node/sync.rs) empties a copy of its list of synced peers, never the list,
        // so a node's second operation waits forever. A registration builds the node (its sync
        // service included) afresh and leaving drops it (src/local/server.rs), so every operation
        // starts from an empty list. Each costs an orchestrator round trip and new connections
        // (docs/training.md has the measured cost); a step makes two (the vote and the step).
        let id = PeerId::from(self.id);
        let reduced = match &self.node {
            None => {
                all_reduce::<B::InnerBackend>(id, t.into_primitive().tensor(), ReduceOperation::Sum)
                    .map_err(|e| collective_error("all-reduce", e))
            }
            Some(node) => node
                .config()
                .and_then(|config| {
                    register::<B::InnerBackend>(id, self.device.clone(), config)
                        .map_err(|e| collective_error("registering a data-parallel worker", e))
                })
                .and_then(|()| {
                    all_reduce::<B::InnerBackend>(
                        id,
                        t.into_primitive().tensor(),
                        ReduceOperation::Sum,
                    )
                    .map_err(|e| collective_error("all-reduce", e))
                })
                .and_then(|p| {
                    finish_collective::<B::InnerBackend>(id)
                        .map(|()| p)
                        .map_err(|e| collective_error("finishing a data-parallel worker", e))
                })
                .map_err(|e| {
                    // The engine names a lost peer by its own node number, not by rank. When a
                    // rank died, the watchdog learns which from its closed connection and ends
                    // this process with its name; give it the time to.
                    std::thread::sleep(NAMING_GRACE);
                    let what = match e {
                        TrainError::Collective { reason } => reason,
                        other => other.to_string(),
                    };
                    TrainError::Collective {
                        reason: format!(
                            "{what}; the watchdog found no rank dead within {} s",
                            NAMING_GRACE.as_secs()
                        ),
                    }
                }),
        }?;
        if let Some(p) = &self.progress {
            p.leave();
        }
        Ok(Tensor::from_primitive(TensorPrimitive::Float(reduced)))
    }

    /// Whether every worker goes on with another step: the leader says `go_on`, the others `true`.
    /// Before each step, so a leader that stops (or fails) releases the others.
    pub fn agree(&self, go_on: bool) -> Result<bool, TrainError> {
        let t = Tensor::<B::InnerBackend, 1>::from_data(
            TensorData::from([if go_on { 1.0f32 } else { 0.0 }]),
            &self.device,
        );
        let sum = self
            .reduce(t)?
            .into_data()
            .to_vec::<f32>()
            .unwrap_or_default();
        Ok(sum.first().copied() == Some(self.world as f32))
    }

    /// Sums the step over the workers: `values` are this worker's `(k, loss)` of the step's `n_micro`
    /// micro-batches, `tokens` the tokens it trained on, `grads` its gradient sum. Returns the step
    /// loss (summed in micro-batch order, as one device sums it), all workers' tokens, and the
    /// reduced gradients of every trainable parameter of `model` (in model order; a worker without
    /// a gradient for one adds zeros; one that no worker has a gradient for stays absent, as it
    /// would on one device).
    ///
    /// One all-reduce for all of it (DDP's buckets, as one): the losses, the token count, which
    /// parameters have a gradient, and every gradient, flattened into one tensor on the device.
    pub fn all_reduce_step<M: AutodiffModule<B>>(
        &self,
        model: &M,
        n_micro: usize,
        values: &[(usize, f64)],
        tokens: usize,
        mut grads: GradientsParams,
    ) -> Result<(f64, GradientsParams, usize), TrainError> {
        let mut pack = Pack::<B> {
            grads: &mut grads,
            flags: Vec::new(),
            parts: Vec::new(),
        };
        model.visit(&mut pack);
        let Pack { flags, parts, .. } = pack;
        // Each loss as three f32 parts (exact: hi + mid + lo == the f64), the token count, the
        // presence flags.
        let mut meta = vec![0f32; 3 * n_micro + 1 + flags.len()];
        for &(k, v) in values {
            let hi = v as f32;
            let r = v - f64::from(hi);
            let mid = r as f32;
            meta[3 * k] = hi;
            meta[3 * k + 1] = mid;
            meta[3 * k + 2] = (r - f64::from(mid)) as f32;
        }
        meta[3 * n_micro] = tokens as f32;
        for (i, &f) in flags.iter().enumerate() {
            meta[3 * n_micro + 1 + i] = f32::from(u8::from(f));
        }
        let m = meta.len();
        let meta =
            Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(meta, [m]), &self.device);
        let flat = self.reduce(Tensor::cat(std::iter::once(meta).chain(parts).collect(), 0))?;
        let meta = flat
            .clone()
            .slice(0..m)
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| TrainError::Collective {
                reason: format!("reading the reduced step: {e:?}"),
            })?;
        let loss = (0..n_micro).fold(0.0f64, |acc, k| {
            let part = |j: usize| f64::from(meta[3 * k + j]);
            acc + ((part(0) + part(1)) + part(2))
        });
        let tokens = meta[3 * n_micro] as usize;
        let anywhere: Vec<bool> = meta[3 * n_micro + 1..].iter().map(|&c| c > 0.0).collect();
        let mut unpack = Unpack::<B> {
            flat,
            offset: m,
            grads: &mut grads,
            anywhere: &anywhere,
            next: 0,
        };
        model.visit(&mut unpack);
        Ok((loss, grads, tokens))
    }

    /// Leaves the collective engine.
    pub fn finish(self) -> Result<(), TrainError> {
        if self.node.is_some() {
            return Ok(());
        }
        finish_collective::<B::InnerBackend>(PeerId::from(self.id))
            .map_err(|e| collective_error("finishing a data-parallel worker", e))
    }
}

/// Takes, per trainable parameter in model order, this worker's gradient out of `grads`, flattened
/// (zeros where it has none), and whether it had one.
struct Pack<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    flags: Vec<bool>,
    parts: Vec<Tensor<B::InnerBackend, 1>>,
}

/// A parameter trains here unless frozen or never loaded (a 4-bit base's placeholder: frozen and
/// not materialized).
fn trains<B: AutodiffBackend, const D: usize>(p: &Param<Tensor<B, D>>) -> bool {
    p.is_initialized() && p.val().is_require_grad()
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Pack<'_, B> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        if !trains(p) {
            return;
        }
        let g = self.grads.remove::<B::InnerBackend, D>(p.id);
        self.flags.push(g.is_some());
        let g = g.unwrap_or_else(|| p.val().inner().zeros_like());
        let n = g.shape().num_elements();
        self.parts.push(g.reshape([n]));
    }
}

/// Puts back, in model order, the reduced gradient of every trainable parameter some worker had
/// one for, cut out of the reduced `flat` tensor.
struct Unpack<'a, B: AutodiffBackend> {
    flat: Tensor<B::InnerBackend, 1>,
    offset: usize,
    grads: &'a mut GradientsParams,
    anywhere: &'a [bool],
    next: usize,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Unpack<'_, B> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        if !trains(p) {
            return;
        }
        let shape = p.val().shape();
        let n = shape.num_elements();
        let (start, i) = (self.offset, self.next);
        self.offset += n;
        self.next += 1;
        if self.anywhere[i] {
            let g = self.flat.clone().slice(start..start + n).reshape(shape);
            self.grads.register::<B::InnerBackend, D>(p.id, g);
        }
    }
}
