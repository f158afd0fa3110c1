//! Several processes, on one machine or many: the launch `torchrun` (and Slurm through it, or by
//! hand) describes with environment variables, Burn's collective orchestrator for the gradients,
//! and a watchdog so that a rank that dies or hangs stops the others with an error naming it.
//!
//! Each process is one rank with one worker. Rank 0 hosts `burn-collective`'s global orchestrator
//! at `MASTER_PORT` (every rank connects to it at `MASTER_ADDR:MASTER_PORT`) and the watchdog's
//! control socket at `MASTER_PORT + 1`. Every rank serves its tensors (the peer-to-peer half of the
//! all-reduce) on a free port of its own, announced to the others through the orchestrator.
//!
//! The watchdog (our code, plain TCP, one line per message): every rank but 0 keeps a connection
//! to rank 0 and sends, each second, how many collective operations it has entered and finished.
//! Rank 0 stops the run, naming the rank, when a connection closes before its rank said it was
//! done (the process exited or was killed), when a rank has sent nothing for `ddp_timeout`
//! seconds (stopped, or its machine gone), when a rank has waited `ddp_timeout` seconds in an
//! operation that another rank has not reached (the other one hangs), or in one every rank reached
//! (the engine is stuck). It tells the others why and
//! every process exits with status 1, as torch's NCCL watchdog aborts a process: a rank blocked in
//! the collective engine cannot be handed an error. Checkpoints are written atomically, so the last
//! complete one stays whatever moment the exit comes at.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn_collective::CollectiveConfig;
use serde::{Deserialize, Serialize};

use crate::error::TrainError;

/// This process's place in a multi-process run: what `torchrun` puts in the environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessGroup {
    /// This process's rank, `0..world_size` (`RANK`); rank 0 leads: logs, checkpoints, the adapter.
    pub rank: usize,
    /// Its rank on its machine (`LOCAL_RANK`): which GPU it takes.
    pub local_rank: usize,
    /// Processes in all (`WORLD_SIZE`).
    pub world_size: usize,
    /// Rank 0's host, as every rank reaches it (`MASTER_ADDR`).
    pub master_addr: String,
    /// Rank 0's orchestrator port (`MASTER_PORT`); its watchdog listens on the next one.
    pub master_port: u16,
}

impl ProcessGroup {
    /// The process group `torchrun` describes in the environment (`WORLD_SIZE`, `RANK`,
    /// `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`); `None` without `WORLD_SIZE` or with
    /// `WORLD_SIZE=1` (one process: nothing to join). A missing or malformed variable is an error
    /// naming it.
    pub fn from_env() -> Result<Option<Self>, TrainError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Self::from_env`] with the variables from `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, TrainError> {
        let bad = |name: &str, reason: String| TrainError::BadOption {
            option: format!("environment variable {name}"),
            reason,
        };
        let number = |name: &str| -> Result<usize, TrainError> {
            let v = var(name).ok_or_else(|| {
                bad(
                    name,
                    "is not set; a multi-process run (WORLD_SIZE > 1) needs WORLD_SIZE, RANK, \
                     MASTER_ADDR and MASTER_PORT, as torchrun sets them"
                        .into(),
                )
            })?;
            v.trim()
                .parse()
                .map_err(|_| bad(name, format!("is {v:?}; it must be a whole number")))
        };
        let Some(_) = var("WORLD_SIZE") else {
            return Ok(None);
        };
        let world_size = number("WORLD_SIZE")?;
        if world_size == 0 {
            return Err(bad("WORLD_SIZE", "is 0; it must be at least 1".into()));
        }
        if world_size == 1 {
            return Ok(None);
        }
        let rank = number("RANK")?;
        if rank >= world_size {
            return Err(bad(
                "RANK",
                format!("is {rank}; with WORLD_SIZE={world_size} it must be below {world_size}"),
            ));
        }
        let local_rank = match var("LOCAL_RANK") {
            Some(_) => number("LOCAL_RANK")?,
            None => 0,
        };
        let master_addr = var("MASTER_ADDR")
            .filter(|a| !a.trim().is_empty())
            .ok_or_else(|| {
                bad(
                    "MASTER_ADDR",
                    "is not set; give rank 0's host name or address".into(),
                )
            })?;
        let port = number("MASTER_PORT")?;
        let master_port = u16::try_from(port)
            .ok()
            .filter(|p| *p > 0 && *p < u16::MAX)
            .ok_or_else(|| {
                bad(
                    "MASTER_PORT",
                    format!("is {port}; it must be a port from 1 to 65534 (the watchdog takes the next one)"),
                )
            })?;
        Ok(Some(Self {
            rank,
            local_rank,
            world_size,
            master_addr: master_addr.trim().to_string(),
            master_port,
        }))
    }

    fn control_port(&self) -> u16 {
        self.master_port + 1
    }

    /// Keeps the collective engine's servers quiet: they log every connection and transfer at INFO
    /// to a subscriber they install unless the process has one; this installs one that drops all.
    pub(crate) fn quiet() {
        let _ =
            tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default());
    }
}

/// This rank as a node of the collective engine's global level. What stays the same from one
/// operation to the next is found once: rank 0's address, the address the others reach this rank
/// by, and where the system's ports for outgoing connections start; each operation's settings
/// ([`Node::config`]) add a fresh port for this rank's tensors.
pub(crate) struct Node {
    world_size: usize,
    /// `ws://MASTER_ADDR:MASTER_PORT`.
    global: String,
    host: IpAddr,
    /// The first port of Linux's `ip_local_port_range` (0 when unknown).
    ephemeral_low: u16,
}

impl Node {
    pub fn new(group: &ProcessGroup) -> Result<Self, TrainError> {
        let net = |what: &str, e: std::io::Error| failure(format!("{what}: {e}"));
        // The address this machine reaches rank 0 from is the one rank 0 (and the others, on the
        // same network) reach it by; no packet is sent.
        let master = (group.master_addr.as_str(), group.master_port)
            .to_socket_addrs()
            .map_err(|e| net(&format!("MASTER_ADDR {:?}", group.master_addr), e))?
            .next()
            .ok_or_else(|| {
                failure(format!(
                    "MASTER_ADDR {:?} resolves to no address",
                    group.master_addr
                ))
            })?;
        let host = UdpSocket::bind(("0.0.0.0", 0))
            .and_then(|udp| udp.connect(master).map(|()| udp))
            .and_then(|udp| udp.local_addr())
            .map_err(|e| net("finding this host's address", e))?
            .ip();
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(0);
        Ok(Self {
            world_size: group.world_size,
            global: format!("ws://{}:{}", group.master_addr, group.master_port),
            host,
            ephemeral_low,
        })
    }

    /// The collective engine's settings for one operation: one device here, `world_size` nodes,
    /// the orchestrator at rank 0, this rank's tensors on a port free now.
    pub fn config(&self) -> Result<CollectiveConfig, TrainError> {
        let port = self
            .free_port()
            .map_err(|e| failure(format!("finding a free port for this rank's tensors: {e}")))?;
        let parse = |s: String| s.parse().map_err(|e| failure(format!("address {s}: {e}")));
        Ok(CollectiveConfig::default()
            .with_num_devices(1)
            .with_num_nodes(self.world_size as u32)
            .with_global_address(parse(self.global.clone())?)
            .with_node_address(parse(format!("ws://{}:{port}", self.host))?)
            .with_data_service_port(port)
            // Ring needs every tensor to split world_size ways (a step's one-value vote does not).
            .with_global_all_reduce_strategy(burn_collective::AllReduceStrategy::Tree(2)))
    }

    /// A port for this rank's tensor server, free now. The engine binds it itself a moment later,
    /// and the port must still be free then: a port the system hands out for outgoing connections
    /// (every operation opens several) could be taken in between, so it is drawn at random from
    /// below the system's range for those (32768 and up by default) and checked. Where that range
    /// is unknown or starts low, the system picks.
    fn free_port(&self) -> std::io::Result<u16> {
        use std::hash::{BuildHasher, Hasher};
        const LOW: u16 = 10_000;
        if self.ephemeral_low > LOW + 1_000 {
            for _ in 0..64 {
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u32(std::process::id());
                let p = LOW + (h.finish() % u64::from(self.ephemeral_low - LOW)) as u16;
                if TcpListener::bind(("0.0.0.0", p)).is_ok() {
                    return Ok(p);
                }
            }
        }
        Ok(TcpListener::bind(("0.0.0.0", 0))?.local_addr()?.port())
    }
}

/// Starts `burn-collective`'s global orchestrator on `port` in a thread of its own (rank 0). Its
/// server stops on SIGINT/SIGTERM, and every later operation needs it, so either signal ends this
/// process (the others then stop, naming rank 0): SIGTERM as it would without the server (torchrun
/// stops its workers with it), Ctrl-C with status 130 and where to resume from, instead of the
/// single-process "stop after this step".
pub(crate) fn start_orchestrator(port: u16) -> Result<(), TrainError> {
    // Fails early, with the port named, when another program holds it.
    drop(TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
        failure(format!(
            "MASTER_PORT {port}: rank 0 cannot listen there ({e}); pick a free port"
        ))
    })?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| failure(format!("starting the orchestrator's runtime: {e}")))?;
    std::thread::Builder::new()
        .name("collective-orchestrator".into())
        .spawn(move || {
            runtime.block_on(async {
                #[cfg(unix)]
                tokio::spawn(async {
                    use tokio::signal::unix::{signal, SignalKind};
                    if let Ok(mut term) = signal(SignalKind::terminate()) {
                        term.recv().await;
                        std::process::exit(143); // 128 + SIGTERM
                    }
                });
                tokio::spawn(async {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        eprintln!(
                            "\ninterrupted: a multi-process run stops at once (its orchestrator \
                             ends with Ctrl-C); resume from its last complete checkpoint with \
                             --resume-from-checkpoint latest"
                        );
                        std::process::exit(130); // 128 + SIGINT
                    }
                });
                burn_collective::start_global_orchestrator(port).await
            })
        })
        .map_err(|e| failure(format!("starting the orchestrator's thread: {e}")))?;
    Ok(())
}

/// Collective operations this process has entered and finished (the watchdog reads them).
#[derive(Debug, Default)]
pub(crate) struct Progress {
    entered: AtomicU64,
    done: AtomicU64,
}

impl Progress {
    pub fn enter(&self) {
        self.entered.fetch_add(1, Ordering::SeqCst);
    }
    pub fn leave(&self) {
        self.done.fetch_add(1, Ordering::SeqCst);
    }
    fn read(&self) -> (u64, u64) {
        (
            self.entered.load(Ordering::SeqCst),
            self.done.load(Ordering::SeqCst),
        )
    }
}

/// A failure of the multi-process machinery (sockets, addresses, a rank missing).
fn failure(reason: String) -> TrainError {
    TrainError::Collective { reason }
}

/// The watchdog's table of ranks (a thread that panicked holding it left it usable).
fn lock(seen: &Mutex<Vec<Seen>>) -> std::sync::MutexGuard<'_, Vec<Seen>> {
    seen.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ends the process when the worker thread holding it panics: in one process the other workers
/// would wait for it in the collective engine forever.
pub(crate) struct ExitOnPanic(pub usize);

impl Drop for ExitOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            abort(&format!(
                "worker {} panicked (above); the run stops",
                self.0
            ))
        }
    }
}

/// Ends the process: the error on stderr, status 1.
fn abort(message: &str) -> ! {
    eprintln!("error: data-parallel training: {message}");
    std::process::exit(1)
}

/// One rank as rank 0's watchdog sees it.
struct Seen {
    /// Operations entered and finished, as last reported.
    entered: u64,
    done: u64,
    /// When `entered` last changed, and when anything was last heard.
    since: Instant,
    heard: Instant,
    /// It said it finished its run; its connection may close.
    finished: bool,
    /// Its connection, to tell it why the run stops.
    stream: Option<TcpStream>,
}

/// The watchdog of a multi-process run (see the module's documentation). [`Watchdog::finish`]
/// after a run that ended normally tells rank 0 this rank is done (rank 0 waits for every rank's
/// word, up to the timeout); dropped without it, the threads watch on until the process ends.
pub(crate) struct Watchdog {
    pub progress: Arc<Progress>,
    finished: Arc<AtomicBool>,
    control: Option<TcpStream>,
    seen: Option<Arc<Mutex<Vec<Seen>>>>,
    timeout: Duration,
}

const BEAT: Duration = Duration::from_secs(1);

impl Watchdog {
    /// Joins the watchdog of `group`: rank 0 listens for the others (each must connect within
    /// `timeout`), the others connect to it (retrying for up to `timeout` while it starts).
    pub fn start(group: &ProcessGroup, timeout: Duration) -> Result<Self, TrainError> {
        let progress = Arc::new(Progress::default());
        let finished = Arc::new(AtomicBool::new(false));
        if group.rank == 0 {
            Self::lead(group, timeout, progress, finished)
        } else {
            Self::follow(group, timeout, progress, finished)
        }
    }

    fn lead(
        group: &ProcessGroup,
        timeout: Duration,
        progress: Arc<Progress>,
        finished: Arc<AtomicBool>,
    ) -> Result<Self, TrainError> {
        let port = group.control_port();
        let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
            failure(format!(
                "rank 0's watchdog cannot listen on port {port} (MASTER_PORT + 1): {e}; pick \
                     a MASTER_PORT whose next port is free too"
            ))
        })?;
        let now = Instant::now();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(
            (0..group.world_size)
                .map(|_| Seen {
                    entered: 0,
                    done: 0,
                    since: now,
                    heard: now,
                    finished: false,
                    stream: None,
                })
                .collect(),
        ));
        // Every other rank connects and says which it is.
        listener
            .set_nonblocking(true)
            .map_err(|e| failure(format!("watchdog socket: {e}")))?;
        let mut joined = 1;
        while joined < group.world_size {
            match listener.accept() {
                Ok((stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    let mut reader = BufReader::new(
                        stream
                            .try_clone()
                            .map_err(|e| failure(format!("watchdog socket: {e}")))?,
                    );
                    let mut hello = String::new();
                    // A rank says which it is at once; anything else connecting is dropped.
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let rank = reader
                        .read_line(&mut hello)
                        .ok()
                        .and_then(|_| hello.trim().strip_prefix("rank ")?.parse::<usize>().ok())
                        .filter(|r| (1..group.world_size).contains(r));
                    let Some(rank) = rank else {
                        continue; // not one of ours
                    };
                    let _ = stream.set_read_timeout(None);
                    {
                        let mut s = lock(&seen);
                        if s[rank].stream.is_some() {
                            return Err(failure(format!(
                                "two processes say they are rank {rank}: give each its own RANK"
                            )));
                        }
                        s[rank].stream = Some(stream);
                        s[rank].heard = Instant::now();
                    }
                    joined += 1;
                    let (seen, finished) = (seen.clone(), finished.clone());
                    std::thread::spawn(move || listen_to(rank, reader, seen, finished));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if now.elapsed() > timeout {
                        let s = lock(&seen);
                        let missing: Vec<String> = (1..group.world_size)
                            .filter(|&r| s[r].stream.is_none())
                            .map(|r| r.to_string())
                            .collect();
                        return Err(failure(format!(
                            "rank(s) {} did not join within {} s (--ddp-timeout); start every \
                                 rank with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT",
                            missing.join(", "),
                            timeout.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(failure(format!("watchdog socket: {e}"))),
            }
        }
        {
            let seen = seen.clone();
            let progress = progress.clone();
            let finished = finished.clone();
            std::thread::spawn(move || watch(seen, progress, finished, timeout));
        }
        Ok(Self {
            progress,
            finished,
            control: None,
            seen: Some(seen),
            timeout,
        })
    }

    fn follow(
        group: &ProcessGroup,
        timeout: Duration,
        progress: Arc<Progress>,
        finished: Arc<AtomicBool>,
    ) -> Result<Self, TrainError> {
        let addr = (group.master_addr.as_str(), group.control_port());
        let start = Instant::now();
        let mut stream = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > timeout => {
                    return Err(failure(format!(
                        "rank 0's watchdog at {}:{} did not answer within {} s: {e}; start \
                             rank 0 too, with the same MASTER_ADDR and MASTER_PORT",
                        group.master_addr,
                        group.control_port(),
                        timeout.as_secs()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let io = |e: std::io::Error| failure(format!("rank 0's watchdog: {e}"));
        writeln!(stream, "rank {}", group.rank).map_err(io)?;
        let reader = BufReader::new(stream.try_clone().map_err(io)?);
        // When rank 0 was last heard from (it beats too), in milliseconds since `start`.
        let heard = Arc::new(AtomicU64::new(0));
        {
            let finished = finished.clone();
            let heard = heard.clone();
            std::thread::spawn(move || {
                for line in reader.lines() {
                    match line {
                        Ok(l) => {
                            heard.store(start.elapsed().as_millis() as u64, Ordering::SeqCst);
                            if let Some(why) = l.strip_prefix("stop ") {
                                abort(why)
                            }
                        }
                        Err(_) => break,
                    }
                }
                if !finished.load(Ordering::SeqCst) {
                    abort(
                        "rank 0 stopped (its connection closed: the process exited or was killed)",
                    )
                }
            });
        }
        {
            let mut beat = stream.try_clone().map_err(io)?;
            let progress = progress.clone();
            let finished = finished.clone();
            // A write that cannot go through (rank 0 stopped, its buffers full) gives up after a
            // beat, so that the silence below is still noticed.
            let _ = beat.set_write_timeout(Some(BEAT));
            std::thread::spawn(move || loop {
                let (entered, done) = progress.read();
                if finished.load(Ordering::SeqCst) {
                    break;
                }
                let _ = writeln!(beat, "beat {entered} {done}");
                let silent = start
                    .elapsed()
                    .saturating_sub(Duration::from_millis(heard.load(Ordering::SeqCst)));
                if silent > timeout {
                    abort(&format!(
                        "rank 0 has sent nothing for {} s (--ddp-timeout): it hangs, was \
                         stopped, or its machine is unreachable",
                        timeout.as_secs()
                    ))
                }
                std::thread::sleep(BEAT);
            });
        }
        Ok(Self {
            progress,
            finished,
            control: Some(stream),
            seen: None,
            timeout,
        })
    }

    /// The run ended normally on this rank: the others give rank 0 their word, rank 0 waits (up to
    /// the timeout) for everyone's before it goes on to write the adapter.
    pub fn finish(mut self) {
        self.finished.store(true, Ordering::SeqCst);
        if let Some(mut s) = self.control.take() {
            // Before the connection closes (TCP keeps the order): rank 0 then takes the close
            // for the end it is, not for a death.
            let _ = writeln!(s, "finished");
            let _ = s.shutdown(Shutdown::Write);
        }
        if let Some(seen) = &self.seen {
            let start = Instant::now();
            loop {
                let all = {
                    let s = lock(seen);
                    s.iter().skip(1).all(|r| r.finished)
                };
                if all || start.elapsed() > self.timeout {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut s = lock(seen);
            for r in s.iter_mut() {
                if let Some(st) = r.stream.take() {
                    let _ = st.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

/// Rank 0's reader of rank `rank`'s connection. A connection that closes once rank 0 itself has
/// finished (every operation done) stops nothing: the run's result is complete.
fn listen_to(
    rank: usize,
    reader: BufReader<TcpStream>,
    seen: Arc<Mutex<Vec<Seen>>>,
    finished: Arc<AtomicBool>,
) {
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let mut s = lock(&seen);
        let r = &mut s[rank];
        r.heard = Instant::now();
        if line == "finished" {
            r.finished = true;
        } else if let Some(nums) = line.strip_prefix("beat ") {
            let mut it = nums.split(' ').filter_map(|n| n.parse::<u64>().ok());
            if let (Some(entered), Some(done)) = (it.next(), it.next()) {
                if entered != r.entered {
                    r.since = Instant::now();
                }
                (r.entered, r.done) = (entered, done);
            }
        }
    }
    let gone = !lock(&seen)[rank].finished && !finished.load(Ordering::SeqCst);
    if gone {
        stop_all(
            &seen,
            &format!(
                "rank {rank} stopped (its connection closed: the process exited or was killed)"
            ),
        );
    }
}

/// Tells every connected rank why the run stops, and ends this process (rank 0). Takes the table
/// unlocked: the writes happen outside its lock.
fn stop_all(seen: &Mutex<Vec<Seen>>, why: &str) -> ! {
    send_all(seen, &format!("stop {why}"));
    abort(why)
}

/// Writes `line` to every connected rank, on copies of the connections taken under the table's
/// lock and written outside it, so that a write that blocks (a rank stopped with a full buffer)
/// never holds up the readers that would notice a death.
fn send_all(seen: &Mutex<Vec<Seen>>, line: &str) {
    let streams: Vec<TcpStream> = lock(seen)
        .iter()
        .filter_map(|r| r.stream.as_ref()?.try_clone().ok())
        .collect();
    for mut st in streams {
        let _ = st.set_write_timeout(Some(BEAT));
        let _ = writeln!(st, "{line}");
    }
}

/// Rank 0's check, every beat, for a rank gone silent or left behind.
fn watch(
    seen: Arc<Mutex<Vec<Seen>>>,
    progress: Arc<Progress>,
    finished: Arc<AtomicBool>,
    timeout: Duration,
) {
    let mut mine = (0u64, 0u64, Instant::now());
    let mut beat = Instant::now();
    loop {
        std::thread::sleep(BEAT / 4);
        if finished.load(Ordering::SeqCst) {
            return;
        }
        if beat.elapsed() >= BEAT {
            beat = Instant::now();
            send_all(&seen, "beat");
        }
        let (entered, done) = progress.read();
        if entered != mine.0 {
            mine = (entered, done, Instant::now());
        }
        mine.1 = done;
        let why = {
            let mut s = lock(&seen);
            s[0].entered = mine.0;
            s[0].done = mine.1;
            s[0].since = mine.2;
            s[0].heard = Instant::now();
            verdict(&s, timeout)
        };
        if let Some(why) = why {
            stop_all(&seen, &why);
        }
    }
}

/// Why the run must stop, if it must: a rank silent for `timeout`, or one that has not reached an
/// operation another rank has waited in for `timeout`.
fn verdict(seen: &[Seen], timeout: Duration) -> Option<String> {
    let secs = timeout.as_secs();
    for (rank, r) in seen.iter().enumerate() {
        if !r.finished && r.heard.elapsed() > timeout {
            return Some(format!(
                "rank {rank} has sent nothing for {secs} s (--ddp-timeout): it hangs, was \
                 stopped, or its machine is unreachable"
            ));
        }
    }
    for r in seen.iter() {
        let waiting = r.entered > r.done && r.since.elapsed() > timeout;
        if !waiting {
            continue;
        }
        // The ranks still running that `test` picks, as "1, 3".
        let ranks = |test: &dyn Fn(&Seen) -> bool| {
            let picked: Vec<String> = seen
                .iter()
                .enumerate()
                .filter(|(_, o)| !o.finished && test(o))
                .map(|(k, _)| k.to_string())
                .collect();
            picked.join(", ")
        };
        let behind = ranks(&|o| o.entered < r.entered);
        if !behind.is_empty() {
            return Some(format!(
                "rank(s) {behind} did not reach collective operation {} within {secs} s \
                 (--ddp-timeout): hung or much slower than the others",
                r.entered
            ));
        }
        // Every rank reached it and it has not completed: the transfer itself is lost.
        return Some(format!(
            "collective operation {} has not completed within {secs} s (--ddp-timeout) on \
             rank(s) {}, though every rank reached it: the collective engine is stuck",
            r.entered,
            ranks(&|o| o.done < r.entered)
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(vars: &[(&str, &str)]) -> Result<Option<ProcessGroup>, TrainError> {
        ProcessGroup::from_vars(|k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        })
    }

    const RANK1: &[(&str, &str)] = &[
        ("WORLD_SIZE", "4"),
        ("RANK", "1"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node-a"),
        ("MASTER_PORT", "29500"),
    ];

    /// A rank's row: operations entered and finished, `since` seconds in its current one,
    /// last heard `heard` seconds ago.
    fn row(entered: u64, done: u64, since: u64, heard: u64) -> Seen {
        let ago = |s: u64| Instant::now() - Duration::from_secs(s);
        Seen {
            entered,
            done,
            since: ago(since),
            heard: ago(heard),
            finished: false,
            stream: None,
        }
    }

    #[test]
    fn the_watchdog_names_the_rank_that_holds_the_others_up() {
        let t = Duration::from_secs(5);
        // Healthy: rank 1 is one operation behind, but nobody has waited long.
        assert_eq!(verdict(&[row(4, 3, 1, 0), row(3, 3, 1, 0)], t), None);
        // Rank 2 silent past the timeout.
        let v = verdict(&[row(4, 3, 1, 0), row(4, 3, 1, 1), row(4, 3, 1, 9)], t).unwrap();
        assert!(v.starts_with("rank 2 has sent nothing for 5 s"), "{v}");
        // Ranks 0 and 2 wait in operation 4 for 9 s; rank 1 never reached it.
        let v = verdict(&[row(4, 3, 9, 0), row(3, 3, 1, 0), row(4, 3, 9, 0)], t).unwrap();
        assert!(
            v.starts_with("rank(s) 1 did not reach collective operation 4"),
            "{v}"
        );
        // Every rank is inside operation 4 and it never completes.
        let v = verdict(&[row(4, 3, 9, 0), row(4, 3, 9, 0)], t).unwrap();
        assert!(
            v.contains("operation 4 has not completed") && v.contains("rank(s) 0, 1"),
            "{v}"
        );
        // A rank that said it finished is neither silent nor behind.
        let mut done = row(2, 2, 9, 9);
        done.finished = true;
        assert_eq!(verdict(&[row(2, 2, 1, 0), done], t), None);
    }

    #[test]
    fn torchruns_variables_give_the_place() {
        assert_eq!(
            group(RANK1).unwrap(),
            Some(ProcessGroup {
                rank: 1,
                local_rank: 1,
                world_size: 4,
                master_addr: "node-a".into(),
                master_port: 29500,
            })
        );
        // No launcher, or a world of one: no group.
        assert_eq!(group(&[]).unwrap(), None);
        assert_eq!(group(&[("WORLD_SIZE", "1")]).unwrap(), None);
        // LOCAL_RANK may be left out (one process per machine).
        let without: Vec<_> = RANK1
            .iter()
            .copied()
            .filter(|(k, _)| *k != "LOCAL_RANK")
            .collect();
        assert_eq!(group(&without).unwrap().unwrap().local_rank, 0);
    }

    #[test]
    fn a_missing_or_bad_variable_is_named() {
        let with = |k: &str, v: Option<&str>| -> String {
            let vars: Vec<(&str, &str)> = RANK1
                .iter()
                .copied()
                .filter(|(name, _)| *name != k)
                .chain(v.map(|v| (k, v)))
                .collect();
            group(&vars).expect_err("refused").to_string()
        };
        for (k, v, says) in [
            ("RANK", None, "is not set"),
            ("RANK", Some("4"), "must be below 4"),
            ("RANK", Some("one"), "whole number"),
            ("MASTER_ADDR", None, "is not set"),
            ("MASTER_PORT", None, "is not set"),
            ("MASTER_PORT", Some("65535"), "from 1 to 65534"),
            ("MASTER_PORT", Some("0"), "from 1 to 65534"),
            ("WORLD_SIZE", Some("0"), "at least 1"),
        ] {
            let msg = with(k, v);
            assert!(
                msg.contains(&format!("environment variable {k}")) && msg.contains(says),
                "{k}={v:?}: {msg}"
            );
        }
    }
}
