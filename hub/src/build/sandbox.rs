//! Runs one untrusted command of a pushed repository (a build or its tests) in a
//! bubblewrap sandbox (issue 29, "Builds are isolated").
//!
//! **What the command sees.** A fresh root holding only: `/usr` read-only and Debian's
//! `/bin`, `/lib`, `/lib64`, `/sbin` (symlinks into `/usr` on a merged-/usr system,
//! bound read-only where they are real directories); a few files of `/etc` that a shell,
//! cargo, rustc and cc need (users, the loader's cache, `alternatives` for `cc`, CA
//! certificates; DNS files only with network), never `/etc` whole (`/etc/ssl/private`);
//! the rust toolchain read-only at the paths it has on the hub (`RUSTUP_HOME` and
//! `CARGO_HOME/bin` of the hub's environment, or `~/.rustup` and `~/.cargo/bin`; the
//! same paths so rustup's absolute toolchain links resolve; only `bin` of the hub's
//! cargo home, never its registry credentials); the checkout read-write at `/src` (the
//! working directory) and the app's cache read-write at `/cache`; a private `/proc`,
//! a minimal `/dev` and an empty `/tmp`; the sandbox's own root is read-only too. Nothing
//! else of the host: the hub's home (keys, store, deploy repository) is simply not there,
//! wherever it lives. `/` is never bound.
//!
//! **What it may do.** Every namespace is new (`--unshare-all`: user, pid, network, ipc,
//! uts, cgroup); the network namespace is shared only when [`Sandbox::network`] is set.
//! All capabilities are dropped (`--cap-drop ALL`): a hub running as root maps the
//! command to uid 0 in its user namespace with every capability there, and measured
//! here, without the drop it could `mount -o remount,rw` the read-only `/usr` bind and
//! write to the host's `/usr`. File descriptors the hub leaked without close-on-exec
//! reach the sandbox through bubblewrap (seen here: a descriptor opened by the calling
//! shell was readable inside), so a first step inside closes every descriptor above 2
//! before the command starts. The environment is cleared but for the variables named on
//! [`Sandbox::env`]. `--new-session` keeps it off the hub's terminal; `--die-with-parent`
//! and the pid namespace kill everything in it when the hub (the thread that called
//! [`Sandbox::run`]) goes away.
//!
//! **Limits**, set as hard limits inside the sandbox (by `prlimit`, after the user
//! namespace exists: capabilities there do not allow raising a hard limit, and the
//! process count is then this sandbox's own, see below). The workspace forbids `unsafe`,
//! so there is no `pre_exec`/`setrlimit` in the hub itself.
//! - *wall time*: [`Sandbox::run`] kills bubblewrap at the deadline; the pid namespace
//!   dies with it (its init is killed by `--die-with-parent`), taking every process.
//! - *CPU*: `RLIMIT_CPU` per process: `SIGXCPU` at [`Limits::cpu_secs`], `SIGKILL` a
//!   second later. Per process, not per build; the wall time bounds the whole.
//! - *memory*: `RLIMIT_DATA` per process (private writable memory: heap, anonymous
//!   mappings), measured against rustc compiling regex-syntax at `-C opt-level=3` with 16
//!   codegen units (290 MB resident at peak): it ran under a 384 MiB `RLIMIT_DATA` and
//!   aborted at 320 MiB, while under `RLIMIT_AS` it aborted at 512 MiB and needed 1 GiB
//!   (address space counts reserved ranges: thread stacks, allocator arenas), so DATA
//!   tracks real use and AS would have to be set at several times it. A cgroup would cap
//!   the build as a whole, but it is not reliably available: this machine (cgroup v1,
//!   root) can make a child memory cgroup, but the packaged hub runs as the `unifleet`
//!   user under systemd's cgroup v2, where it may create none without `Delegate=yes` and
//!   moving itself into a leaf first (v2 has no processes in inner cgroups). So a build
//!   of `cargo -jN` may hold up to N × [`Limits::memory_mib`]; a cgroup is the follow-up.
//! - *processes*: `RLIMIT_NPROC`. Inside a user namespace the kernel counts it per user
//!   *and namespace*, so for a hub running as a regular user (the package's `unifleet`)
//!   it counts this sandbox's processes only (checked here: with 20, the 19th fork
//!   failed). The kernel never enforces it for real root, not even in a user namespace
//!   (checked: 45 processes under a limit of 20), so a hub running as root has no process
//!   limit; a `pids` cgroup would be the fix there, with the caveats above.
//! - *files*: `RLIMIT_FSIZE` per file ([`Limits::file_mib`]); `/tmp` is a tmpfs of that
//!   size. `/src` and `/cache` are the hub's disk, bounded only per file.
//! - core dumps are off (`RLIMIT_CORE` 0): none written to `/src`, none piped to the
//!   host's crash handler.
//!
//! Output: stdout and stderr share one pipe, so lines arrive in the order they were
//! written, read by one named thread and handed to the caller's thread.

use super::lines::{read_lines, Tail};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// Lines read ahead of the caller's callback.
const LINE_QUEUE: usize = 256;
/// Where the sandbox sees the checkout and the cache.
const SRC: &str = "/src";
const CACHE: &str = "/cache";
/// Debian's top-level directories that are symlinks into `/usr` on a merged-/usr system.
const TOP_LEVEL: [&str; 4] = ["/bin", "/lib", "/lib64", "/sbin"];
/// What a shell, cargo, rustc and cc need of `/etc` (absent ones are skipped).
const ETC: [&str; 9] = [
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/ssl/certs",
];
/// Run inside before the command: closes every inherited descriptor above 2 (bash, as
/// dash cannot close a descriptor named by a variable), then becomes `sh -c COMMAND`.
const CLOSE_FDS_THEN_SH: &str = r#"for fd in /proc/self/fd/*; do fd=${fd##*/}; if [ "$fd" -gt 2 ] && [ -e "/proc/self/fd/$fd" ]; then exec {fd}>&-; fi; done; exec /bin/sh -c "$1""#;

// Linux's numbers (the same on x86_64, arm and aarch64).
const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;
const SIGSEGV: i32 = 11;
const SIGXCPU: i32 = 24;

/// Resource limits of one run; see the module doc for how each is enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// CPU seconds per process (`SIGXCPU`, then `SIGKILL` a second later).
    pub cpu_secs: u64,
    /// Private writable memory per process (`RLIMIT_DATA`), in MiB.
    pub memory_mib: u64,
    /// The whole run, from start to the last process gone.
    pub wall: Duration,
    /// Processes (and threads) at once; not enforced when the hub runs as root.
    pub processes: u64,
    /// The largest file a process may write (`RLIMIT_FSIZE`), in MiB; `/tmp` (memory)
    /// holds at most this much too.
    pub file_mib: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpu_secs: 1800,
            memory_mib: 4096,
            wall: Duration::from_secs(30 * 60),
            processes: 512,
            file_mib: 2048,
        }
    }
}

/// One sandbox configuration; [`Sandbox::run`] may be called on it any number of times.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// The checkout: mounted read-write at /src (the build writes its outputs there), the
    /// working directory.
    pub source: PathBuf,
    /// The app's persistent cache, read-write at /cache: CARGO_HOME=/cache/cargo,
    /// CARGO_TARGET_DIR=/cache/target. Created if missing.
    pub cache: PathBuf,
    /// Network access: false for build and test commands (a separate fetch step may
    /// have it).
    pub network: bool,
    pub limits: Limits,
    /// Extra environment, set last (so it may override the defaults). The environment
    /// is otherwise cleared but for PATH (the toolchain's bin, /usr/local/bin, /usr/bin,
    /// /bin), HOME=/tmp, RUSTUP_HOME (when the hub has rustup),
    /// CARGO_HOME/CARGO_TARGET_DIR, LANG=C.UTF-8 and CARGO_NET_OFFLINE=true when
    /// `!network`. Values are on bubblewrap's command line: visible in the hub host's
    /// process list, so no secrets here.
    pub env: Vec<(String, String)>,
}

/// A command that exited 0.
#[derive(Debug, Clone)]
pub struct Finished {
    pub took: Duration,
    /// The last lines of its output (at most 40), joined by newlines.
    pub log_tail: String,
}

/// Why a command did not finish successfully. Each `log_tail` is the last lines of its
/// output (at most 40) for the caller to show the pusher.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("bubblewrap (bwrap) is not installed on the hub, so it cannot build: apt-get install bubblewrap")]
    NoBubblewrap,
    #[error(
        "{} is a symlink: the build cache was tampered with; remove it (the hub makes it \
         again)",
        path.display()
    )]
    Symlink { path: PathBuf },
    #[error("could not start bubblewrap")]
    Spawn {
        #[source]
        source: io::Error,
    },
    /// bubblewrap itself refused (its own `bwrap: …` message): a problem of the hub's
    /// machine, not of the pushed code.
    #[error(
        "the hub could not set up the build sandbox: {message} (bubblewrap needs user \
         namespaces; check user.max_user_namespaces or AppArmor's restriction of them)"
    )]
    Setup { message: String },
    #[error("the {what} directory {} does not exist", path.display())]
    MissingDir { what: &'static str, path: PathBuf },
    #[error("environment variable name {name:?} is empty or holds '=' or NUL")]
    InvalidEnv { name: String },
    #[error("the command exited with code {code}")]
    Failed { code: i32, log_tail: String },
    #[error(
        "the command was still running after {} (the time limit) and was stopped",
        humantime::format_duration(*after)
    )]
    TimedOut { after: Duration, log_tail: String },
    #[error("the command was killed by signal {signal}: {cause}")]
    Killed {
        signal: i32,
        cause: KillCause,
        log_tail: String,
    },
    #[error("{doing}")]
    Io {
        doing: &'static str,
        #[source]
        source: io::Error,
    },
}

impl SandboxError {
    /// The output's last lines, for the variants that ran the command.
    pub fn log_tail(&self) -> Option<&str> {
        match self {
            SandboxError::Failed { log_tail, .. }
            | SandboxError::TimedOut { log_tail, .. }
            | SandboxError::Killed { log_tail, .. } => Some(log_tail),
            _ => None,
        }
    }
}

fn io_error(doing: &'static str) -> impl FnOnce(io::Error) -> SandboxError {
    move |source| SandboxError::Io { doing, source }
}

/// Files in a cargo home that make cargo run programs or use credentials (a
/// `rustc-wrapper`, a credential provider, `git-fetch-with-cli`): removed before every
/// run, whatever an earlier run left there.
const CARGO_HOME_CONFIG: [&str; 4] = ["config", "config.toml", "credentials", "credentials.toml"];

fn scrub_cargo_home(home: &Path) -> Result<(), SandboxError> {
    for name in CARGO_HOME_CONFIG {
        match fs::remove_file(home.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_error("removing configuration from the cargo home")(e))
            }
            _ => {}
        }
    }
    Ok(())
}

impl Sandbox {
    /// Runs `command` with `sh -c` inside the sandbox; every output line (stdout and
    /// stderr, in order as far as practical) is passed to `line` as it comes; also kept for
    /// the tail. Blocks the calling thread until every process of the sandbox is gone
    /// (at most [`Limits::wall`] and the moment a kill takes).
    pub fn run(&self, command: &str, line: &mut dyn FnMut(&str)) -> Result<Finished, SandboxError> {
        let started = Instant::now();
        let deadline = started + self.limits.wall;
        let (mut child, output) = self.spawn(command)?;
        let mut tail = Tail::default();
        let mut keep = |text: String| {
            line(&text);
            tail.push(text);
        };
        let (timed_out, read) = stream(&mut child, output, deadline, &mut keep);
        let (status, timed_out) =
            reap(&mut child, deadline, timed_out).map_err(io_error("waiting for the sandbox"))?;
        read.map_err(io_error("reading the command's output"))?;
        let ran = Ran {
            status,
            timed_out,
            took: started.elapsed(),
            first_line: tail.first.take(),
            log_tail: tail.text(),
        };
        ran.outcome(&self.limits)
    }

    /// Starts bubblewrap with stdout and stderr on one pipe, whose read end comes back.
    fn spawn(&self, command: &str) -> Result<(Child, io::PipeReader), SandboxError> {
        let mut bwrap = self.command(command)?;
        let (output, writer) = io::pipe().map_err(io_error("creating the output pipe"))?;
        let stdout = writer
            .try_clone()
            .map_err(io_error("creating the output pipe"))?;
        bwrap.stdin(Stdio::null()).stdout(stdout).stderr(writer);
        let child = bwrap.spawn().map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => SandboxError::NoBubblewrap,
            _ => SandboxError::Spawn { source },
        })?;
        // `bwrap` (dropped here) held our copies of the write end: the reader sees the
        // end of the output only once they are closed too.
        Ok((child, output))
    }

    /// The cache directory (made if missing, never a symlink), its cargo registry
    /// directories, and its cargo home scrubbed of configuration.
    fn prepare_cache(&self) -> Result<(PathBuf, [PathBuf; 2]), SandboxError> {
        fs::create_dir_all(&self.cache).map_err(io_error("creating the build cache directory"))?;
        // The cache and its parent are made by the hub, never by a build: one that is a
        // symlink was planted (by a build writing its cache) to bind elsewhere.
        for dir in [Some(self.cache.as_path()), self.cache.parent()]
            .into_iter()
            .flatten()
        {
            if fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(SandboxError::Symlink {
                    path: dir.to_path_buf(),
                });
            }
        }
        let cache =
            fs::canonicalize(&self.cache).map_err(io_error("finding the build cache directory"))?;
        let registry = ["registry", "git"].map(|d| cache.join("cargo").join(d));
        for dir in &registry {
            fs::create_dir_all(dir).map_err(io_error("creating the cargo registry directory"))?;
        }
        scrub_cargo_home(&cache.join("cargo"))?;
        Ok((cache, registry))
    }

    /// The bubblewrap command line for `script` (checks the directories, creates the cache).
    fn command(&self, script: &str) -> Result<Command, SandboxError> {
        let source = fs::canonicalize(&self.source).map_err(|_| SandboxError::MissingDir {
            what: "source",
            path: self.source.clone(),
        })?;
        let (cache, registry) = self.prepare_cache()?;
        if let Some((name, _)) = self.env.iter().find(|(name, _)| !valid_env_name(name)) {
            return Err(SandboxError::InvalidEnv { name: name.clone() });
        }

        let toolchain = Toolchain::discover();
        let mut args = Args::default();
        args.flags(&[
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
        ]);
        args.flags(&["--cap-drop", "ALL", "--hostname", "unifleet-build"]);
        if self.network {
            args.flags(&["--share-net"]);
        }
        // The empty /tmp first, so that a toolchain kept under /tmp is bound over it.
        let tmp_bytes = self.limits.file_mib.saturating_mul(1024 * 1024).to_string();
        args.flags(&[
            "--proc", "/proc", "--dev", "/dev", "--size", &tmp_bytes, "--tmpfs", "/tmp",
        ]);
        system_binds(&mut args, self.network);
        for dir in toolchain.dirs() {
            args.pair("--ro-bind", dir, dir);
        }
        args.pair("--bind", &source, SRC);
        args.pair("--bind", &cache, CACHE);
        // Without the network (build, test) the registry is read-only: only the fetch
        // writes it, so a build cannot change the sources the next build compiles.
        if !self.network {
            for dir in &registry {
                let inside =
                    Path::new(CACHE).join(dir.strip_prefix(&cache).expect("under the cache"));
                args.pair("--ro-bind", dir, inside);
            }
        }
        // The sandbox's own root (where /etc's files and the mount points sit) last, once
        // everything is mounted on it.
        args.flags(&["--remount-ro", "/", "--chdir", SRC]);
        for (name, value) in self.environment(&toolchain) {
            args.pair("--setenv", name, value);
        }

        let limits = &self.limits;
        let mut bwrap = Command::new("bwrap");
        bwrap.args(args.0).arg("--").arg("/usr/bin/prlimit");
        bwrap.arg(format!(
            "--cpu={}:{}",
            limits.cpu_secs,
            limits.cpu_secs.saturating_add(1)
        ));
        bwrap.arg(format!(
            "--data={}",
            limits.memory_mib.saturating_mul(1024 * 1024)
        ));
        bwrap
            .arg(format!("--nproc={}", limits.processes))
            .arg(format!(
                "--fsize={}",
                limits.file_mib.saturating_mul(1024 * 1024)
            ))
            .arg("--core=0");
        bwrap.args([
            "--",
            "/bin/bash",
            "-c",
            CLOSE_FDS_THEN_SH,
            "unifleet-sandbox",
            script,
        ]);
        Ok(bwrap)
    }

    /// The whole environment of the command, later entries winning.
    fn environment(&self, toolchain: &Toolchain) -> Vec<(OsString, OsString)> {
        let mut path = OsString::new();
        if let Some(bin) = &toolchain.cargo_bin {
            path.push(bin);
            path.push(":");
        }
        path.push("/usr/local/bin:/usr/bin:/bin");
        let mut env: Vec<(OsString, OsString)> = vec![("PATH".into(), path)];
        if let Some(home) = &toolchain.rustup_home {
            env.push(("RUSTUP_HOME".into(), home.into()));
        }
        for (name, value) in [
            ("HOME", "/tmp"),
            ("CARGO_HOME", "/cache/cargo"),
            ("CARGO_TARGET_DIR", "/cache/target"),
            ("LANG", "C.UTF-8"),
        ] {
            env.push((name.into(), value.into()));
        }
        if !self.network {
            env.push(("CARGO_NET_OFFLINE".into(), "true".into()));
        }
        env.extend(self.env.iter().map(|(n, v)| (n.into(), v.into())));
        env
    }
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['=', '\0'])
}

/// bubblewrap's arguments, built up in order.
#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn flags(&mut self, flags: &[&str]) {
        self.0.extend(flags.iter().map(OsString::from));
    }

    fn pair(&mut self, option: &str, a: impl Into<OsString>, b: impl Into<OsString>) {
        self.0.extend([option.into(), a.into(), b.into()]);
    }
}

/// The read-only system: `/usr`, the top-level directories as they are on the host
/// (symlink or directory), and the few `/etc` files a build needs.
fn system_binds(args: &mut Args, network: bool) {
    args.pair("--ro-bind", "/usr", "/usr");
    for dir in TOP_LEVEL {
        match fs::read_link(dir) {
            Ok(target) => args.pair("--symlink", target, dir),
            Err(_) if Path::new(dir).is_dir() => args.pair("--ro-bind", dir, dir),
            Err(_) => {}
        }
    }
    // `-try`: a file this host lacks is skipped, not an error. A symlinked source (such
    // as resolv.conf into /run) is followed by the bind.
    for file in ETC {
        args.pair("--ro-bind-try", file, file);
    }
    if network {
        args.pair("--ro-bind-try", "/etc/resolv.conf", "/etc/resolv.conf");
    }
}

/// The hub's rust toolchain: rustup's home and the directory of cargo's binaries (the
/// rustup proxies), each only if it exists (a Debian-packaged rustc is in `/usr`).
#[derive(Debug)]
struct Toolchain {
    rustup_home: Option<PathBuf>,
    cargo_bin: Option<PathBuf>,
}

impl Toolchain {
    fn discover() -> Toolchain {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let from_env = |var: &str, default: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|home| home.join(default)))
        };
        let existing = |dir: Option<PathBuf>| dir.filter(|dir| dir.is_absolute() && dir.is_dir());
        Toolchain {
            rustup_home: existing(from_env("RUSTUP_HOME", ".rustup")),
            cargo_bin: existing(from_env("CARGO_HOME", ".cargo").map(|home| home.join("bin"))),
        }
    }

    fn dirs(&self) -> impl Iterator<Item = &PathBuf> {
        self.rustup_home.iter().chain(self.cargo_bin.iter())
    }
}

/// Reads the output on a thread of its own and passes each line to `keep` on this one,
/// until the output ends; at the deadline, stops the sandbox (true) and passes on what it
/// wrote until then. Also the reader's result.
fn stream(
    child: &mut Child,
    output: io::PipeReader,
    deadline: Instant,
    keep: &mut impl FnMut(String),
) -> (bool, io::Result<()>) {
    thread::scope(|scope| {
        let (lines, received) = mpsc::sync_channel(LINE_QUEUE);
        let reading = thread::Builder::new()
            .name("sandbox-output".into())
            .spawn_scoped(scope, move || read_lines(output, &lines));
        let reading = match reading {
            Ok(reading) => reading,
            Err(e) => {
                stop(child);
                return (false, Err(e));
            }
        };
        let timed_out = forward(&received, deadline, keep);
        if timed_out {
            stop(child);
        }
        // The rest (all of it once the sandbox is gone), so the reader never blocks.
        received.iter().for_each(keep);
        let read = reading
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (timed_out, read)
    })
}

/// The exit status, once the output has ended, and whether the deadline passed: the
/// output may end before the processes do (a command may close it).
fn reap(child: &mut Child, deadline: Instant, timed_out: bool) -> io::Result<(ExitStatus, bool)> {
    if timed_out {
        return Ok((child.wait()?, true));
    }
    match wait_until(child, deadline)? {
        Some(status) => Ok((status, false)),
        None => {
            stop(child);
            Ok((child.wait()?, true))
        }
    }
}

/// Passes lines on until the output ends (false) or the deadline passes (true).
fn forward(
    received: &mpsc::Receiver<String>,
    deadline: Instant,
    keep: &mut impl FnMut(String),
) -> bool {
    loop {
        match received.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(text) => keep(text),
            Err(RecvTimeoutError::Timeout) => return true,
            Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
}

/// Waits for the child, or until the deadline (`None`).
fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Kills bubblewrap; `--die-with-parent` kills the sandbox's init, and with it the pid
/// namespace. An error means it has already exited.
fn stop(child: &mut Child) {
    let _ = child.kill();
}

/// How a run ended, before it is judged.
#[derive(Debug)]
struct Ran {
    status: ExitStatus,
    timed_out: bool,
    took: Duration,
    first_line: Option<String>,
    log_tail: String,
}

impl Ran {
    fn outcome(self, limits: &Limits) -> Result<Finished, SandboxError> {
        let Ran {
            status,
            timed_out,
            took,
            first_line,
            log_tail,
        } = self;
        if timed_out {
            return Err(SandboxError::TimedOut {
                after: limits.wall,
                log_tail,
            });
        }
        if status.success() {
            return Ok(Finished { took, log_tail });
        }
        // bubblewrap reports a command killed by signal N as exit code 128 + N (so does
        // sh for its children); a signal on bubblewrap itself came from elsewhere.
        let signal = status.signal().or(status
            .code()
            .filter(|code| (129..=192).contains(code))
            .map(|code| code - 128));
        match (signal, status.code()) {
            (Some(signal), _) => Err(SandboxError::Killed {
                signal,
                cause: KillCause::of(signal, limits),
                log_tail,
            }),
            (None, Some(1))
                if first_line
                    .as_deref()
                    .is_some_and(|l| l.starts_with("bwrap: ")) =>
            {
                Err(SandboxError::Setup {
                    message: first_line.unwrap_or_default(),
                })
            }
            (None, code) => Err(SandboxError::Failed {
                code: code.unwrap_or(-1),
                log_tail,
            }),
        }
    }
}

/// What a pusher should read into a signal.
/// What a signal that killed the command most likely means, given its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillCause {
    CpuLimit { cpu_secs: u64 },
    KilledOutright,
    Aborted { memory_mib: u64 },
    Crashed,
    Other,
}

impl KillCause {
    fn of(signal: i32, limits: &Limits) -> KillCause {
        match signal {
            SIGXCPU => KillCause::CpuLimit {
                cpu_secs: limits.cpu_secs,
            },
            SIGKILL => KillCause::KilledOutright,
            SIGABRT => KillCause::Aborted {
                memory_mib: limits.memory_mib,
            },
            SIGSEGV => KillCause::Crashed,
            _ => KillCause::Other,
        }
    }
}

impl std::fmt::Display for KillCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KillCause::CpuLimit { cpu_secs } => write!(
                f,
                "SIGXCPU, a process used its {cpu_secs} s of CPU time (the CPU limit per process)"
            ),
            KillCause::KilledOutright => f.write_str(
                "SIGKILL, killed outright (a process went on after the CPU limit's SIGXCPU, or \
                 the machine ran out of memory)",
            ),
            KillCause::Aborted { memory_mib } => write!(
                f,
                "SIGABRT, a process aborted; past the memory limit ({memory_mib} MiB per \
                 process) rustc aborts with \"memory allocation of … bytes failed\""
            ),
            KillCause::Crashed => f.write_str("SIGSEGV, a process crashed"),
            KillCause::Other => f.write_str("a process was killed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::lines::TAIL_LINES;
    use std::net::TcpListener;
    use std::os::unix::process::ExitStatusExt;
    use tempfile::TempDir;

    /// A sandbox on `DIR/src` and `DIR/cache`, default limits, no network.
    fn sandbox(dir: &Path) -> Sandbox {
        let source = dir.join("src");
        fs::create_dir_all(&source).unwrap();
        Sandbox {
            source,
            cache: dir.join("cache"),
            network: false,
            limits: Limits::default(),
            env: Vec::new(),
        }
    }

    /// Runs `command`, returning its result and every line the callback saw.
    fn run(sandbox: &Sandbox, command: &str) -> (Result<Finished, SandboxError>, Vec<String>) {
        let mut lines = Vec::new();
        let result = sandbox.run(command, &mut |l| lines.push(l.to_string()));
        (result, lines)
    }

    #[test]
    fn output_lines_arrive_in_order_and_the_exit_code_comes_with_the_tail() {
        let dir = TempDir::new().unwrap();
        let command = "for i in $(seq 1 30); do echo out$i; echo err$i >&2; done; exit 3";
        let (result, lines) = run(&sandbox(dir.path()), command);

        let expected: Vec<String> = (1..=30)
            .flat_map(|i| [format!("out{i}"), format!("err{i}")])
            .collect();
        assert_eq!(lines, expected, "stdout and stderr interleaved as written");
        match result {
            Err(SandboxError::Failed { code: 3, log_tail }) => {
                assert_eq!(log_tail, expected[expected.len() - TAIL_LINES..].join("\n"));
            }
            other => panic!("expected Failed with code 3, got {other:?}"),
        }

        let (result, lines) = run(&sandbox(dir.path()), "echo one; printf 'two\\r\\nthree'");
        assert_eq!(lines, ["one", "two", "three"]);
        assert_eq!(result.unwrap().log_tail, "one\ntwo\nthree");
    }

    #[test]
    fn the_hub_home_outside_the_binds_cannot_be_read_or_changed() {
        // The checkout and the cache inside the hub's home, beside its keys.
        let hub = TempDir::new().unwrap();
        let keys = hub.path().join("keys");
        fs::create_dir_all(&keys).unwrap();
        let key = keys.join("release.key");
        fs::write(&key, "SECRET-RELEASE-KEY\n").unwrap();
        let sandbox = sandbox(&hub.path().join("builds/app"));

        let key = key.display();
        let hub_dir = hub.path().display();
        let command = format!(
            "ls {hub_dir}; ls /src/../keys; echo changed > {key}; rm -f {key}; \
             grep -rs SECRET-RELEASE-KEY /src /cache /tmp; cat {key}"
        );
        let (result, lines) = run(&sandbox, &command);

        assert!(
            matches!(result, Err(SandboxError::Failed { .. })),
            "{result:?}"
        );
        assert!(!lines.iter().any(|l| l.contains("SECRET")), "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("No such file or directory")),
            "{lines:?}"
        );
        assert_eq!(
            fs::read_to_string(hub.path().join("keys/release.key")).unwrap(),
            "SECRET-RELEASE-KEY\n"
        );
    }

    #[test]
    fn the_system_is_read_only() {
        let dir = TempDir::new().unwrap();
        let marker = format!("/usr/unifleet-sandbox-test-{}", std::process::id());
        let command = format!(
            "touch {marker} || echo usr-refused; touch /etc/x || echo etc-refused; \
             mount -o remount,rw /usr || echo mount-refused; \
             test -e /etc/ssl/private || echo no-private-keys; touch /src/mine && echo src-ok"
        );
        let (result, lines) = run(&sandbox(dir.path()), &command);

        assert!(result.is_ok(), "{result:?}");
        for said in [
            "usr-refused",
            "etc-refused",
            "mount-refused",
            "no-private-keys",
            "src-ok",
        ] {
            assert!(
                lines.iter().any(|l| l == said),
                "{said} missing from {lines:?}"
            );
        }
        assert!(!Path::new(&marker).exists());
        assert!(dir.path().join("src/mine").exists());
    }

    #[test]
    fn a_connection_to_the_hub_fails_without_network() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let dir = TempDir::new().unwrap();
        let mut sandbox = sandbox(dir.path());
        let command = format!("bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' && echo connected");

        let (result, lines) = run(&sandbox, &command);
        assert!(
            matches!(result, Err(SandboxError::Failed { .. })),
            "{result:?}"
        );
        assert!(!lines.iter().any(|l| l == "connected"), "{lines:?}");
        let accepted = listener.accept();
        assert!(accepted.is_err(), "a connection arrived: {accepted:?}");

        // The same command with network: the refusal above was the sandbox's doing.
        sandbox.network = true;
        let (result, lines) = run(&sandbox, &command);
        assert!(result.is_ok(), "{result:?} {lines:?}");
        assert!(lines.iter().any(|l| l == "connected"), "{lines:?}");
        assert!(listener.accept().is_ok());
    }

    #[test]
    fn the_wall_time_limit_stops_every_process_and_says_so() {
        let dir = TempDir::new().unwrap();
        let mut sandbox = sandbox(dir.path());
        sandbox.limits.wall = Duration::from_secs(1);
        // A duration no other process has on its command line.
        let sleep = format!("100.{}", std::process::id());
        let started = Instant::now();
        let (result, _) = run(
            &sandbox,
            &format!("echo started; sleep {sleep} & sleep {sleep}"),
        );

        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        match &result {
            Err(SandboxError::TimedOut { after, log_tail }) => {
                assert_eq!(*after, Duration::from_secs(1));
                assert_eq!(log_tail, "started");
            }
            other => panic!("expected TimedOut, got {other:?}"),
        }
        assert!(result
            .unwrap_err()
            .to_string()
            .contains("after 1s (the time limit)"));
        let gone = Instant::now() + Duration::from_secs(5);
        while sleeping(&sleep) {
            assert!(Instant::now() < gone, "a sleep {sleep} survived the kill");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a `sleep DURATION` runs anywhere on this machine.
    fn sleeping(duration: &str) -> bool {
        let wanted = format!("sleep\0{duration}\0");
        fs::read_dir("/proc").unwrap().flatten().any(|entry| {
            fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| cmdline == wanted.as_bytes())
        })
    }

    #[test]
    fn a_cpu_limit_kill_is_reported_as_such() {
        let dir = TempDir::new().unwrap();
        let mut sandbox = sandbox(dir.path());
        sandbox.limits.cpu_secs = 1;
        sandbox.limits.wall = Duration::from_secs(60);
        let (result, _) = run(&sandbox, "echo spinning; while :; do :; done");

        match result {
            Err(
                error @ SandboxError::Killed {
                    signal: SIGXCPU, ..
                },
            ) => {
                assert!(error.to_string().contains("1 s of CPU time"), "{error}");
                assert_eq!(error.log_tail(), Some("spinning"));
            }
            other => panic!("expected Killed by SIGXCPU, got {other:?}"),
        }
    }

    #[test]
    fn the_memory_limit_refuses_a_big_allocation() {
        let dir = TempDir::new().unwrap();
        let mut sandbox = sandbox(dir.path());
        sandbox.limits.memory_mib = 64;
        // dd allocates its block size at once.
        let (result, _) = run(
            &sandbox,
            "dd if=/dev/zero of=/dev/null bs=16M count=1 status=none",
        );
        assert!(result.is_ok(), "{result:?}");
        let (result, lines) = run(
            &sandbox,
            "dd if=/dev/zero of=/dev/null bs=256M count=1 status=none",
        );
        assert!(
            matches!(result, Err(SandboxError::Failed { code: 1, .. })),
            "{result:?}"
        );
        assert!(
            lines.iter().any(|l| l.contains("memory exhausted")),
            "{lines:?}"
        );
    }

    #[test]
    fn limits_are_hard_and_cannot_be_raised_inside() {
        let dir = TempDir::new().unwrap();
        let mut sandbox = sandbox(dir.path());
        sandbox.limits = Limits {
            cpu_secs: 7,
            memory_mib: 100,
            wall: Duration::from_secs(60),
            processes: 50,
            file_mib: 3,
        };
        let command =
            "cat /proc/self/limits; prlimit --cpu=100:100 --pid $$ && echo raised || echo refused";
        let (result, lines) = run(&sandbox, command);

        assert!(result.is_ok(), "{result:?}");
        let limit = |name: &str| {
            let line = lines
                .iter()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("{name} in {lines:?}"));
            line[name.len()..]
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(limit("Max cpu time"), "7 8");
        assert_eq!(
            limit("Max data size"),
            format!("{0} {0}", 100 * 1024 * 1024)
        );
        assert_eq!(limit("Max processes"), "50 50");
        assert_eq!(limit("Max core file size"), "0 0");
        assert_eq!(limit("Max file size"), format!("{0} {0}", 3 * 1024 * 1024));
        assert_eq!(lines.last().map(String::as_str), Some("refused"));
    }

    #[test]
    fn a_file_past_the_file_limit_is_refused_in_the_checkout_and_in_tmp() {
        let dir = TempDir::new().unwrap();
        let mut sandbox = sandbox(dir.path());
        sandbox.limits.file_mib = 1;
        let (result, lines) = run(
            &sandbox,
            "for f in /src/big /tmp/big; do \
               dd if=/dev/zero of=$f bs=64k count=32 2>/dev/null && echo wrote $f || echo refused $f; \
             done",
        );
        assert!(result.is_ok(), "{result:?}");
        assert!(lines.contains(&"refused /src/big".to_string()), "{lines:?}");
        assert!(lines.contains(&"refused /tmp/big".to_string()), "{lines:?}");
        let kept = fs::metadata(dir.path().join("src/big")).map_or(0, |m| m.len());
        assert!(kept <= 1024 * 1024, "{kept}");
    }

    #[test]
    fn the_environment_is_cleared() {
        // Each test is a process of its own under nextest; nothing else reads this one.
        std::env::set_var("UNIFLEET_SANDBOX_TEST_SECRET", "hub-secret");
        let dir = TempDir::new().unwrap();
        let mut sandbox = sandbox(dir.path());
        sandbox.env = vec![("BUILD_PROFILE".into(), "release".into())];
        let (result, lines) = run(&sandbox, "env");

        assert!(result.is_ok(), "{result:?}");
        assert!(!lines.iter().any(|l| l.contains("hub-secret")), "{lines:?}");
        let mut names: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.split_once('='))
            .map(|(n, _)| n)
            .collect();
        names.sort_unstable();
        // PWD and SHLVL are the shells' own.
        let mut expected = vec![
            "BUILD_PROFILE",
            "CARGO_HOME",
            "CARGO_NET_OFFLINE",
            "CARGO_TARGET_DIR",
            "HOME",
            "LANG",
            "PATH",
            "PWD",
            "SHLVL",
        ];
        if Toolchain::discover().rustup_home.is_some() {
            expected.push("RUSTUP_HOME");
        }
        expected.sort_unstable();
        assert_eq!(names, expected, "{lines:?}");
        for wanted in [
            "HOME=/tmp",
            "CARGO_HOME=/cache/cargo",
            "CARGO_TARGET_DIR=/cache/target",
            "LANG=C.UTF-8",
        ] {
            assert!(
                lines.iter().any(|l| l == wanted),
                "{wanted} missing from {lines:?}"
            );
        }

        sandbox.env = vec![("A=B".into(), "x".into())];
        let (result, _) = run(&sandbox, "true");
        assert!(
            matches!(result, Err(SandboxError::InvalidEnv { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn the_cache_is_writable_and_persists_between_runs() {
        let dir = TempDir::new().unwrap();
        let (result, _) = run(
            &sandbox(dir.path()),
            "mkdir -p /cache/cargo && echo kept > /cache/cargo/note",
        );
        assert!(result.is_ok(), "{result:?}");
        let (result, lines) = run(&sandbox(dir.path()), "cat /cache/cargo/note");
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(lines, ["kept"]);
        assert_eq!(
            fs::read_to_string(dir.path().join("cache/cargo/note")).unwrap(),
            "kept\n"
        );
    }

    #[test]
    fn the_toolchain_is_reachable_and_only_its_binaries_of_the_cargo_home() {
        let dir = TempDir::new().unwrap();
        let (result, lines) = run(
            &sandbox(dir.path()),
            "cargo --version && rustc --version && cc --version",
        );
        assert!(result.is_ok(), "{result:?} {lines:?}");
        assert!(lines[0].starts_with("cargo "), "{lines:?}");
        assert!(lines[1].starts_with("rustc "), "{lines:?}");

        // The hub's cargo home holds registry credentials: only bin/ may be there.
        if let Some(bin) = Toolchain::discover().cargo_bin {
            let home = bin.parent().unwrap().display().to_string();
            let (result, lines) = run(&sandbox(dir.path()), &format!("ls -A {home}"));
            assert!(result.is_ok(), "{result:?}");
            assert_eq!(lines, ["bin"]);
        }
    }

    #[test]
    fn a_tiny_cargo_project_builds_offline_into_the_cache() {
        let dir = TempDir::new().unwrap();
        let sandbox = sandbox(dir.path());
        fs::create_dir_all(sandbox.source.join("src")).unwrap();
        let manifest = "[package]\nname = \"tiny\"\nversion = \"0.1.0\"\nedition = \"2021\"\n";
        fs::write(sandbox.source.join("Cargo.toml"), manifest).unwrap();
        fs::write(
            sandbox.source.join("src/main.rs"),
            "fn main() { println!(\"built in the sandbox\"); }\n",
        )
        .unwrap();

        let (result, lines) = run(&sandbox, "cargo build && /cache/target/debug/tiny");
        assert!(result.is_ok(), "{result:?} {lines:?}");
        assert_eq!(
            lines.last().map(String::as_str),
            Some("built in the sandbox")
        );
        assert!(dir.path().join("cache/target/debug/tiny").is_file());
        assert!(
            sandbox.source.join("Cargo.lock").is_file(),
            "the build writes into /src"
        );
    }

    #[test]
    fn a_descriptor_leaked_by_the_hub_is_closed_before_the_command() {
        let dir = TempDir::new().unwrap();
        let key = dir.path().join("release.key");
        fs::write(&key, "SECRET-RELEASE-KEY\n").unwrap();
        let bwrap = sandbox(dir.path()).command("cat <&7").unwrap();
        // A shell opens the key on descriptor 7 without close-on-exec, as a careless
        // library in the hub might, and starts the sandbox with it open.
        let output = Command::new("bash")
            .args(["-c", "exec 7<\"$0\"; exec \"$@\""])
            .arg(&key)
            .arg(bwrap.get_program())
            .args(bwrap.get_args())
            .output()
            .unwrap();

        assert!(!output.status.success());
        assert!(!String::from_utf8_lossy(&output.stdout).contains("SECRET"));
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("Bad file descriptor"),
            "{output:?}"
        );
    }

    #[test]
    fn a_missing_source_is_said_before_anything_runs() {
        let dir = TempDir::new().unwrap();
        let mut sandbox = sandbox(dir.path());
        sandbox.source = dir.path().join("nowhere");
        let (result, lines) = run(&sandbox, "true");
        assert!(
            matches!(result, Err(SandboxError::MissingDir { what: "source", .. })),
            "{result:?}"
        );
        assert!(lines.is_empty());
    }

    #[test]
    fn exits_are_told_apart() {
        let ran = |status: i32, first: Option<&str>| Ran {
            status: ExitStatus::from_raw(status),
            timed_out: false,
            took: Duration::ZERO,
            first_line: first.map(String::from),
            log_tail: "tail".into(),
        };
        let limits = Limits::default();
        let code = |code: i32| code << 8;
        assert!(ran(code(0), None).outcome(&limits).is_ok());
        assert!(matches!(
            ran(code(2), None).outcome(&limits),
            Err(SandboxError::Failed { code: 2, .. })
        ));
        assert!(matches!(
            ran(code(1), Some("error[E0308]")).outcome(&limits),
            Err(SandboxError::Failed { code: 1, .. })
        ));
        let setup = ran(
            code(1),
            Some("bwrap: No permissions to create new namespace"),
        )
        .outcome(&limits);
        assert!(
            matches!(setup, Err(SandboxError::Setup { .. })),
            "{setup:?}"
        );
        let cpu = ran(code(128 + SIGXCPU), None).outcome(&limits);
        assert!(
            matches!(
                cpu,
                Err(SandboxError::Killed {
                    signal: SIGXCPU,
                    ..
                })
            ),
            "{cpu:?}"
        );
        let abort = ran(code(128 + SIGABRT), None).outcome(&limits).unwrap_err();
        assert!(
            abort.to_string().contains("4096 MiB per process"),
            "{abort}"
        );
        assert!(matches!(
            ran(SIGKILL, None).outcome(&limits),
            Err(SandboxError::Killed {
                signal: SIGKILL,
                ..
            })
        ));
        let mut late = ran(SIGKILL, None);
        late.timed_out = true;
        assert!(matches!(
            late.outcome(&limits),
            Err(SandboxError::TimedOut { .. })
        ));
    }
}
