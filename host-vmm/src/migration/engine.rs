//! Live migration of a running VM: pre-copy rounds driven by KVM's dirty log, then
//! stop-and-copy ([`send`]); and the destination that builds the VM from the stream and runs
//! it ([`receive`]).
//!
//! # Rounds
//!
//! Round 0 sends every page with data. Each later round asks KVM's dirty log (the guest's
//! writes) and vm-memory's dirty bitmap (the VMM's own writes: virtio devices, hypercall
//! results, released ranges) what changed since the previous round and sends that. Pages the
//! host does not back (never written, or released by the guest), pages the PV guest reported
//! free, and all-zero pages are never sent as data: a page the destination may hold data for
//! (sent before) is sent as [`Message::Zeros`] instead when it became unbacked or zero; a free
//! page is skipped (its contents do not matter). A dirty page whose contents hash (128-bit
//! xxh3) to what was sent of it before is not sent again. Rounds stop when what is left would go out
//! within the downtime target at the bandwidth measured so far, or after `max_rounds`. Then
//! the source pauses the vCPU, holds its devices still, sends the last dirty pages and all
//! state, and waits for the destination to say it resumed.
//!
//! # Failure
//!
//! Any error (the peer refuses, disappears, or stalls past the I/O timeout) ends the
//! migration on both ends: the destination exits without having run guest code, and the
//! source VM goes on running (or stays paused, [`OnFailure::Pause`]) with nothing lost — the
//! source never changes the guest.

use std::io::Write;
use std::time::{Duration, Instant};

use hypercall_abi::layout::PAGE_SIZE;
use serde::{Deserialize, Serialize};

use crate::config::{KernelImage, VmConfig};
use crate::dirty::DirtyLog;
use crate::error::{Error, Result};
use crate::machine::MachineState;
use crate::memory::{PageBits, PageClass, RamView};
use crate::snapshot::{Elided, SavedConfig};
use crate::vcpu::VcpuState;
use crate::vm::{Vm, VmHandle};

use super::endpoint::{Conn, Endpoint, Listener};
use super::wire::{
    Counted, Message, MigrationError, PAGES_MAX_PER_MESSAGE, Receiver, write_message, write_pages,
};

/// What the source does with its VM when a migration fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Let it run on (the default).
    #[default]
    Resume,
    /// Leave it paused (resume it through the API socket).
    Pause,
}

/// How to migrate.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Pre-copy rounds after the first full one, at most.
    pub max_rounds: u32,
    /// Stop pre-copying once the rest would take at most this long to send.
    pub downtime_target: Duration,
    /// A peer silent this long (connecting, sending or answering) fails the migration.
    pub io_timeout: Duration,
    /// What the source VM does if the migration fails.
    pub on_failure: OnFailure,
}

impl Default for MigrateOptions {
    fn default() -> MigrateOptions {
        MigrateOptions {
            max_rounds: 8,
            downtime_target: Duration::from_millis(20),
            io_timeout: Duration::from_secs(10),
            on_failure: OnFailure::Resume,
        }
    }
}

/// One round's figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Round {
    /// Pages looked at (all of RAM in round 0, then the dirty ones).
    pub pages_considered: u64,
    /// Pages sent with their data.
    pub pages_sent: u64,
    /// Pages sent as zero (the destination held data for them).
    pub pages_zeroed: u64,
    /// Dirty pages not sent again because their contents are what was sent before (same
    /// 128-bit hash): KVM reports a page the guest only read as dirty when it had to map
    /// it again (e.g. after the host split a huge page around a released range).
    pub pages_unchanged: u64,
    /// Pages not sent, by reason.
    pub elided: Elided,
    /// Bytes on the wire in this round.
    pub bytes: u64,
    /// Time the round took.
    pub ns: u64,
}

/// What a migration did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrationReport {
    /// Pre-copy rounds (round 0 included); the stop-and-copy round is `last`.
    pub rounds: Vec<Round>,
    /// The stop-and-copy round, sent with the vCPU paused.
    pub last: Round,
    /// Bytes sent in all (messages, framing, state, kernel).
    pub bytes_sent: u64,
    /// Pause to the destination's "resumed".
    pub downtime_ns: u64,
    /// Connection to the destination's "resumed".
    pub total_ns: u64,
    /// State bytes (vCPU and machine, JSON).
    pub state_bytes: u64,
}

impl MigrationReport {
    /// Pages elided over all rounds, by reason.
    pub fn elided(&self) -> Elided {
        let mut e = Elided::default();
        for r in self.rounds.iter().chain(std::iter::once(&self.last)) {
            e.unbacked += r.elided.unbacked;
            e.free += r.elided.free;
            e.zero += r.elided.zero;
        }
        e
    }

    /// Dirty pages not sent again because they had not changed, over all rounds.
    pub fn pages_unchanged(&self) -> u64 {
        self.rounds
            .iter()
            .chain(std::iter::once(&self.last))
            .map(|r| r.pages_unchanged)
            .sum()
    }

    /// Pages sent with data over all rounds.
    pub fn pages_sent(&self) -> u64 {
        self.rounds
            .iter()
            .chain(std::iter::once(&self.last))
            .map(|r| r.pages_sent)
            .sum()
    }
}

/// The state sent last: the vCPU and the machine.
#[derive(Deserialize)]
struct WireState {
    vcpu: VcpuState,
    machine: MachineState,
}

/// [`WireState`] as sent, borrowed.
#[derive(Serialize)]
struct WireStateRef<'a> {
    vcpu: &'a VcpuState,
    machine: &'a MachineState,
}

fn encode<T: Serialize>(what: &str, v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Io {
        what: format!("cannot encode the {what}"),
        source: std::io::Error::other(e),
    })
}

fn mig(e: MigrationError) -> Error {
    e.into()
}

/// Sends pages of one round: data pages in runs of up to [`PAGES_MAX_PER_MESSAGE`], zeroed
/// ones as [`Message::Zeros`] runs.
struct RoundWriter<'a, W: Write> {
    out: &'a mut Counted<W>,
    /// Pages the destination may hold data for.
    sent: &'a PageBits,
    /// The hash of what was sent of each page in `sent`.
    hashes: &'a mut [u128],
    run: Vec<u8>,
    run_first: u64,
    zeros: Option<(u64, u64)>,
    round: Round,
}

impl<'a, W: Write> RoundWriter<'a, W> {
    fn new(
        out: &'a mut Counted<W>,
        sent: &'a PageBits,
        hashes: &'a mut [u128],
    ) -> RoundWriter<'a, W> {
        RoundWriter {
            out,
            sent,
            hashes,
            run: Vec::with_capacity(PAGES_MAX_PER_MESSAGE * PAGE_SIZE as usize),
            run_first: 0,
            zeros: None,
            round: Round::default(),
        }
    }

    fn page(&mut self, page: u64, class: PageClass, data: &[u8]) -> Result<()> {
        self.round.pages_considered += 1;
        match class {
            PageClass::Data => {
                let hash = xxhash_rust::xxh3::xxh3_128(data);
                if self.sent.get(page) && self.hashes[page as usize] == hash {
                    self.round.pages_unchanged += 1;
                    return Ok(());
                }
                self.hashes[page as usize] = hash;
                let next = self.run_first + self.run.len() as u64 / PAGE_SIZE;
                if !self.run.is_empty()
                    && (next != page
                        || self.run.len() >= PAGES_MAX_PER_MESSAGE * PAGE_SIZE as usize)
                {
                    self.flush_run()?;
                }
                if self.run.is_empty() {
                    self.run_first = page;
                }
                self.run.extend_from_slice(data);
                self.sent.set(page);
                self.round.pages_sent += 1;
            }
            PageClass::Free => self.round.elided.count(class),
            PageClass::Unbacked | PageClass::Zero => {
                self.round.elided.count(class);
                if self.sent.get(page) {
                    // The destination holds older data for it: make it zero there.
                    match &mut self.zeros {
                        Some((first, count)) if *first + *count == page => *count += 1,
                        _ => {
                            self.flush_zeros()?;
                            self.zeros = Some((page, 1));
                        }
                    }
                    self.sent.clear_range(page, 1);
                    self.round.pages_zeroed += 1;
                }
            }
        }
        Ok(())
    }

    fn flush_run(&mut self) -> Result<()> {
        if !self.run.is_empty() {
            write_pages(self.out, self.run_first, &self.run).map_err(mig)?;
            self.run.clear();
        }
        Ok(())
    }

    fn flush_zeros(&mut self) -> Result<()> {
        if let Some((first_page, count)) = self.zeros.take() {
            write_message(self.out, &Message::Zeros { first_page, count }).map_err(mig)?;
        }
        Ok(())
    }

    /// Sends what is buffered and the round's end; returns its figures.
    fn finish(mut self, number: u32, started: Instant, bytes_before: u64) -> Result<Round> {
        self.flush_run()?;
        self.flush_zeros()?;
        write_message(self.out, &Message::RoundEnd { round: number }).map_err(mig)?;
        self.out
            .flush()
            .map_err(|e| mig(MigrationError::from_io(e, "a round")))?;
        self.round.bytes = self.out.byte_count() - bytes_before;
        self.round.ns = started.elapsed().as_nanos() as u64;
        Ok(self.round)
    }
}

/// One round over the pages set in `only` (all of RAM if `None`).
fn send_round<W: Write>(
    out: &mut Counted<W>,
    ram: &RamView,
    only: Option<&PageBits>,
    free: &PageBits,
    sent: &PageBits,
    hashes: &mut [u128],
    number: u32,
) -> Result<Round> {
    let started = Instant::now();
    let before = out.byte_count();
    let mut writer = RoundWriter::new(out, sent, hashes);
    ram.scan::<Error>(only, free, |page, class, data| {
        writer.page(page, class, data)
    })?;
    writer.finish(number, started, before)
}

/// The pages changed since the last look: the guest's (KVM) and the VMM's own.
fn take_dirty(dirty: &DirtyLog, ram: &RamView) -> Result<PageBits> {
    let guest = dirty.take()?;
    let host = ram.take_host_dirty();
    let merged = PageBits::new(guest.pages());
    for i in 0..guest.pages() {
        if guest.get(i) || host.get(i) {
            merged.set(i);
        }
    }
    Ok(merged)
}

/// The pages the guest reports free now (a short pause to read its list).
/// A VM paused before the migration stays paused for it (and after it, if it fails).
fn free_now(handle: &VmHandle) -> Result<PageBits> {
    let vcpu = handle.vcpu();
    let control = |e: crate::vcpu::ControlError| Error::Io {
        what: "cannot read the guest's free list".into(),
        source: std::io::Error::other(e),
    };
    let was_paused = vcpu.is_paused();
    vcpu.pause(Duration::from_secs(5)).map_err(control)?;
    let free = vcpu.with_parked(|m: &mut crate::machine::Machine| m.free_pages());
    if !was_paused {
        vcpu.resume();
    }
    free.map_err(control)
}

/// Migrates the running VM behind `handle` (configured as `cfg`; `dirty` is its dirty log)
/// to the destination at `to`. On success the destination runs the VM and the caller stops
/// this one; on failure this VM runs on (or stays paused, by option) and nothing is lost.
pub fn send(
    handle: &VmHandle,
    dirty: &mut DirtyLog,
    cfg: &VmConfig,
    to: &Endpoint,
    opts: &MigrateOptions,
) -> Result<MigrationReport> {
    // A VM the operator paused before migrating it is not resumed by a failed migration.
    let was_paused = handle.vcpu().is_paused();
    let connected = to.connect(opts.io_timeout).and_then(|conn| {
        conn.set_io_timeout(opts.io_timeout)?;
        let answers = conn.try_clone()?;
        Ok((conn, answers))
    });
    let result = match connected {
        Ok((conn, mut answers)) => {
            let mut out = Counted::new(std::io::BufWriter::with_capacity(1 << 20, conn));
            let result = send_on(handle, dirty, cfg, &mut out, &mut answers, opts);
            let _ = dirty.stop();
            if result.is_err() {
                // Tell the destination, if it still listens, that nothing more comes.
                let _ = write_message(&mut out, &Message::Error("the source gave up".into()));
                let _ = out.flush();
            }
            result
        }
        // Not connected: a failure like any other (`--on-failure pause` pauses the VM too).
        Err(e) => Err(mig(e)),
    };
    if result.is_err() {
        let vcpu = handle.vcpu();
        if opts.on_failure == OnFailure::Pause {
            let _ = vcpu.pause(Duration::from_secs(5));
        } else if !was_paused {
            vcpu.resume();
        }
    }
    result
}

fn expect_answer(answers: &mut Conn, during: &str) -> Result<()> {
    match super::wire::read_message(answers).map_err(mig)? {
        Message::Ack | Message::Resumed => Ok(()),
        Message::Error(why) => Err(mig(MigrationError::Peer(why))),
        other => Err(mig(MigrationError::Unexpected {
            expected: format!("an answer to {during}"),
            got: other.name(),
        })),
    }
}

fn send_on<W: Write>(
    handle: &VmHandle,
    dirty: &mut DirtyLog,
    cfg: &VmConfig,
    out: &mut Counted<W>,
    answers: &mut Conn,
    opts: &MigrateOptions,
) -> Result<MigrationReport> {
    let started = Instant::now();
    let ram = handle.ram();
    let flush = |out: &mut Counted<W>, during: &str| {
        out.flush()
            .map_err(|e| mig(MigrationError::from_io(e, during)))
    };
    write_message(out, &Message::hello(ram.size())).map_err(mig)?;
    flush(out, "the hello")?;
    expect_answer(answers, "the hello")?;
    write_message(
        out,
        &Message::Config(encode("configuration", &SavedConfig::of(cfg))?),
    )
    .map_err(mig)?;
    write_message(out, &Message::Kernel(cfg.kernel.bytes.to_vec())).map_err(mig)?;

    let mut report = MigrationReport::default();
    let sent = PageBits::new(ram.size() / PAGE_SIZE);
    let mut hashes = vec![0u128; (ram.size() / PAGE_SIZE) as usize];
    dirty.start()?;
    ram.take_host_dirty();
    let free = free_now(handle)?;
    report
        .rounds
        .push(send_round(out, ram, None, &free, &sent, &mut hashes, 0)?);

    // Bytes per second so far, to judge when the rest fits the downtime target.
    let rate = |report: &MigrationReport| {
        let (bytes, ns) = report
            .rounds
            .iter()
            .fold((0u64, 0u64), |(b, n), r| (b + r.bytes, n + r.ns));
        if ns == 0 {
            f64::INFINITY
        } else {
            bytes as f64 * 1e9 / ns as f64
        }
    };
    for number in 1..=opts.max_rounds {
        let changed = take_dirty(dirty, ram)?;
        let left = changed.count() * PAGE_SIZE;
        let fits = left as f64 <= rate(&report) * opts.downtime_target.as_secs_f64();
        if fits {
            // Put back what was taken: the final round sends it.
            for i in 0..changed.pages() {
                if changed.get(i) {
                    ram.mark_host_dirty(i * PAGE_SIZE, PAGE_SIZE);
                }
            }
            break;
        }
        let free = free_now(handle)?;
        report.rounds.push(send_round(
            out,
            ram,
            Some(&changed),
            &free,
            &sent,
            &mut hashes,
            number,
        )?);
    }

    // Stop and copy.
    let paused = Instant::now();
    handle
        .vcpu()
        .pause(opts.io_timeout)
        .map_err(|e| Error::Io {
            what: "cannot pause the VM".into(),
            source: std::io::Error::other(e),
        })?;
    let frozen = handle.freeze().map_err(|e| Error::Io {
        what: "cannot save the VM".into(),
        source: std::io::Error::other(e),
    })?;
    let changed = take_dirty(dirty, ram)?;
    let number = report.rounds.len() as u32;
    report.last = send_round(
        out,
        ram,
        Some(&changed),
        &frozen.free,
        &sent,
        &mut hashes,
        number,
    )?;
    let state = encode(
        "VM state",
        &WireStateRef {
            vcpu: frozen.vcpu(),
            machine: frozen.machine(),
        },
    )?;
    report.state_bytes = state.len() as u64;
    write_message(out, &Message::State(state)).map_err(mig)?;
    write_message(out, &Message::Done).map_err(mig)?;
    flush(out, "the VM state")?;
    expect_answer(answers, "the VM state")?;
    report.downtime_ns = paused.elapsed().as_nanos() as u64;
    report.total_ns = started.elapsed().as_nanos() as u64;
    report.bytes_sent = out.byte_count();
    // The VM runs at the destination now; this one must never run again. The caller stops
    // it; the devices stay held still until then.
    frozen.keep_devices_paused();
    Ok(report)
}

/// What the destination received, ready to run.
#[derive(Debug)]
pub struct Received {
    /// The VM, its state loaded.
    pub vm: Vm,
    /// Its configuration.
    pub config: VmConfig,
    /// Bytes read from the stream.
    pub bytes: u64,
    /// Rounds seen.
    pub rounds: u32,
}

/// Accepts one migration on `listener` (waiting at most `accept_timeout`), lets `adjust`
/// change (or refuse) the configuration the stream describes — the stream never picks host
/// files: a disk is the destination's own, given by its operator — builds the VM it
/// describes, fills its RAM and state from the stream, and answers "resumed" just before
/// returning it: run it next. `console` gets the guest's output. Anything wrong in the stream
/// is refused (and told to the source) before any guest code runs.
pub fn receive(
    listener: &Listener,
    accept_timeout: Option<Duration>,
    io_timeout: Duration,
    console: crate::console::ConsoleSink,
    adjust: impl FnOnce(&mut VmConfig) -> std::result::Result<(), String>,
) -> Result<Received> {
    let conn = listener.accept(accept_timeout).map_err(mig)?;
    conn.set_io_timeout(io_timeout).map_err(mig)?;
    let mut replies = conn.try_clone().map_err(mig)?;
    let mut input = Counted::new(std::io::BufReader::with_capacity(1 << 20, conn));
    let result = receive_on(&mut input, &mut replies, console, adjust);
    match result {
        Ok(mut received) => {
            received.bytes = input.byte_count();
            write_message(&mut replies, &Message::Resumed).map_err(mig)?;
            Ok(received)
        }
        Err(e) => {
            let _ = write_message(&mut replies, &Message::Error(e.to_string()));
            Err(e)
        }
    }
}

fn receive_on(
    input: &mut impl std::io::Read,
    replies: &mut Conn,
    console: crate::console::ConsoleSink,
    adjust: impl FnOnce(&mut VmConfig) -> std::result::Result<(), String>,
) -> Result<Received> {
    let mut rx = Receiver::new();
    let mut next = |rx: &mut Receiver| rx.read(input).map_err(mig);
    let ram_size = match next(&mut rx)? {
        Message::Hello { ram_size, .. } => ram_size,
        _ => unreachable!("Receiver returns a Hello first or an error"),
    };
    crate::memory::check_mem_size(ram_size)?;
    write_message(replies, &Message::Ack).map_err(mig)?;
    let unexpected = |expected: &str, got: &Message| {
        mig(MigrationError::Unexpected {
            expected: expected.into(),
            got: got.name(),
        })
    };
    let saved: SavedConfig = match next(&mut rx)? {
        Message::Config(json) => serde_json::from_slice(&json)
            .map_err(|e| mig(MigrationError::Corrupt(format!("configuration: {e}"))))?,
        other => return Err(unexpected("the configuration", &other)),
    };
    if saved.mem_size != ram_size {
        return Err(mig(MigrationError::Corrupt(
            "the configuration's RAM size is not the hello's".into(),
        )));
    }
    let kernel = match next(&mut rx)? {
        Message::Kernel(bytes) => KernelImage {
            name: "the migrated kernel".into(),
            bytes: bytes.into(),
        },
        other => return Err(unexpected("the kernel", &other)),
    };
    let mut config = saved
        .to_config(kernel)
        .map_err(|e| mig(MigrationError::Corrupt(format!("configuration: {e}"))))?;
    // The destination's own choices (timeouts, sandbox, its copy of the disk); it may refuse.
    adjust(&mut config).map_err(|why| Error::Io {
        what: "the destination refuses the VM".into(),
        source: std::io::Error::other(why),
    })?;
    // RAM starts all zero (nothing is loaded into it): the source sends only pages with data.
    let mut vm = crate::builder::build_to_restore(&config, console)?;
    let mut rounds = 0;
    let state = loop {
        match next(&mut rx)? {
            Message::Pages { first_page, data } => vm.write_ram(first_page * PAGE_SIZE, &data)?,
            Message::Zeros { first_page, count } => {
                vm.zero_ram(first_page * PAGE_SIZE, count * PAGE_SIZE)?
            }
            Message::RoundEnd { .. } => rounds += 1,
            Message::State(json) => break json,
            Message::Error(why) => return Err(mig(MigrationError::Peer(why))),
            other => return Err(unexpected("pages, a round's end or the state", &other)),
        }
    };
    match next(&mut rx)? {
        Message::Done => {}
        Message::Error(why) => return Err(mig(MigrationError::Peer(why))),
        other => return Err(unexpected("the end of the stream", &other)),
    }
    let state: WireState = serde_json::from_slice(&state)
        .map_err(|e| mig(MigrationError::Corrupt(format!("VM state: {e}"))))?;
    vm.restore_received(&state.vcpu, &state.machine)?;
    Ok(Received {
        vm,
        config,
        bytes: 0,
        rounds,
    })
}

/// A running VM that can be migrated: its handle, configuration, dirty log and stopper.
/// Make one before [`Vm::run`]; [`Source::migrate`] may run on any thread while the VM runs.
#[derive(Debug)]
pub struct Source {
    handle: VmHandle,
    cfg: VmConfig,
    dirty: std::sync::Mutex<DirtyLog>,
    stopper: crate::stop::Stopper,
}

impl Source {
    /// The migration side of `vm`, configured as `cfg`.
    pub fn new(vm: &Vm, cfg: VmConfig) -> Result<Source> {
        Ok(Source {
            handle: vm.handle(),
            cfg,
            dirty: std::sync::Mutex::new(vm.dirty_log()?),
            stopper: vm.stopper(),
        })
    }

    /// The VM's handle.
    pub fn handle(&self) -> &VmHandle {
        &self.handle
    }

    /// The VM's configuration.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// Migrates the VM to `to` ([`send`]); on success stops this copy of it (its run ends
    /// with [`crate::stop::StopReason::Migrated`]). One migration at a time.
    pub fn migrate(&self, to: &Endpoint, opts: &MigrateOptions) -> Result<MigrationReport> {
        let mut dirty = self
            .dirty
            .try_lock()
            .map_err(|_| Error::Unsupported("a migration of this VM is already running"))?;
        let report = send(&self.handle, &mut dirty, &self.cfg, to, opts)?;
        self.stopper.stop(crate::stop::StopReason::Migrated);
        Ok(report)
    }
}
