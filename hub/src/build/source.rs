//! A pushed commit built from source: checked out into a scratch directory, its
//! dependencies fetched, built and unit-tested in the [`sandbox`](super::sandbox), its
//! images found where `unifleet.toml`'s `[build]` says. One build of an app at a time
//! (a second push waits for the first), each with the app's persistent cache
//! (`HUB/builds/APP/cache`: the cargo registry and target directory), so a one-line change
//! rebuilds in seconds.
//!
//! Of the build's steps only the fetch has the network (`[test] functional` has it too,
//! later: it must reach the staged guest, so it is code run on the hub's network, with
//! a throwaway cache), and the fetch runs cargo's own `cargo fetch --locked`
//! from outside the checkout (so the repository's `.cargo/config.toml` is not read).
//! Build and test commands run with no network and see the cache's cargo registry
//! read-only (see [`super::sandbox`]), and before the fetch the hub removes any cargo
//! configuration or credentials file from the cache's cargo home: nothing a build leaves
//! makes cargo run a program in the next fetch. What a build may still leave is its
//! target directory, which only its own app's later builds use.

use super::sandbox::{Limits, Sandbox, SandboxError};
use super::sbom;
use crate::home::Home;
use crate::publish::{FromSource, Image};
use proto::manifest::{Platform, Provenance};
use proto::Digest;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `[build]` in `unifleet.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    /// Run by `sh -c` in the checkout's root, with no network.
    pub command: String,
    /// Platform to the image file the command leaves, relative to the repository's root.
    pub images: BTreeMap<Platform, String>,
    /// The build's wall-clock limit.
    #[serde(default = "default_build_secs")]
    pub timeout_secs: u64,
}

/// `[test]` in `unifleet.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestSpec {
    /// Unit tests, run after the build in the same sandbox; a failure rejects the push.
    #[serde(default)]
    pub command: Option<String>,
    /// Run against each platform's staged instance once staging passed, in the sandbox
    /// with the network and `UNIFLEET_URL=http://GUEST:PORT`; exit 0 passes, anything
    /// else rejects the push. `UNIFLEET_APP` and `UNIFLEET_VERSION` name what is staged.
    #[serde(default)]
    pub functional: Option<String>,
    #[serde(default = "default_build_secs")]
    pub timeout_secs: u64,
}

fn default_build_secs() -> u64 {
    1800
}

/// The most a pushed `unifleet.toml` may ask for a build or test step.
pub const MAX_STEP_SECS: u64 = 3 * 3600;

/// Why a push's source did not give images.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("checking out the pushed commit into {}", dir.display())]
    Checkout {
        dir: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("preparing {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{step} failed")]
    Step {
        step: &'static str,
        #[source]
        source: SandboxError,
    },
    #[error(
        "the build left no {path} for {platform} (unifleet.toml [build] images): check the \
         build command's output paths"
    )]
    NoImage { platform: Platform, path: String },
    #[error(
        "unifleet.toml: [build] images names no image (e.g. {{ \"qemu-x86_64\" = \"out/app.elf\" }})"
    )]
    NoImages,
    #[error("[build] images: {path} leaves the repository (use a path inside it)")]
    Outside { path: String },
    #[error(transparent)]
    Lock(#[from] sbom::SbomError),
    #[error("Cargo.lock is a link or not a regular file: commit cargo's lock file itself")]
    LockNotFile,
    #[error(
        "the staging device {device} reported no address for its instance, which [test] \
         functional needs: give the release a network card (`network = true`), serve it \
         as one instance there (not on demand), and run a device agent that reports it"
    )]
    NoGuest { device: String },
}

/// What [`build`] made: the images (in `scratch`, removed when it drops) and the record
/// of how, for the release's provenance.
#[derive(Debug)]
pub struct Built {
    pub images: Vec<Image>,
    pub scratch: tempfile::TempDir,
    /// Every line the build said, as the pusher saw them.
    pub log: String,
    /// `rustc -V` in the sandbox (empty: no rustc there).
    pub toolchain: String,
    /// The CycloneDX SBOM of the commit's Cargo.lock, if it has one.
    pub sbom: Option<Vec<u8>>,
    /// The app and version built (the functional tests' `UNIFLEET_APP`, `UNIFLEET_VERSION`).
    pub app: String,
    pub version: String,
    /// The commit built and its `[build] command`.
    pub commit: git2::Oid,
    pub command: String,
}

impl Built {
    /// The checkout the images were built in (where a functional test runs).
    pub fn source(&self) -> PathBuf {
        self.scratch.path().join("src")
    }

    /// The release's provenance record: [`Built::log`] and the SBOM, and what names them.
    pub fn from_source(&self) -> FromSource {
        let log = self.log.clone().into_bytes();
        FromSource {
            provenance: Provenance {
                commit: self.commit.to_string(),
                builder: builder(),
                toolchain: self.toolchain.clone(),
                command: self.command.clone(),
                log: Digest::of(&log),
                sbom: self.sbom.as_deref().map(Digest::of),
            },
            log,
            sbom: self.sbom.clone(),
        }
    }
}

impl std::fmt::Debug for Job<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("commit", &self.commit.id())
            .field("app", &self.app)
            .field("version", &self.version)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// This hub, as provenance names the builder.
pub fn builder() -> String {
    format!("unifleet-hub {}", env!("CARGO_PKG_VERSION"))
}

/// One build of one commit.
#[derive(Clone, Copy)]
pub struct Job<'a> {
    pub repo: &'a git2::Repository,
    pub commit: &'a git2::Commit<'a>,
    pub app: &'a str,
    pub version: &'a semver::Version,
    pub build: &'a BuildSpec,
    pub test: &'a TestSpec,
    /// The cache the build runs with: the app's ([`app_dir`]`/cache`, held under
    /// [`lock_app`]), or a fresh one for `hub rebuild`.
    pub cache: &'a Path,
}

/// The app's build directory: its cache and its lock. `app` is a checked name (no `/`, no
/// `..`): a pushed name that could climb out would bind any directory into the sandbox.
pub fn app_dir(home: &Home, app: &str) -> PathBuf {
    assert!(
        proto::names::check("app", app).is_ok(),
        "build directory of an unchecked app name {app:?}"
    );
    home.dir.join("builds").join(app)
}

/// Holds the app's build lock (released on drop); waits for another push's build of the
/// same app, saying so once.
pub fn lock_app(
    home: &Home,
    app: &str,
    say: &mut dyn FnMut(&str),
) -> Result<nix::fcntl::Flock<std::fs::File>, BuildError> {
    let dir = app_dir(home, app);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BuildError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    use nix::fcntl::{Flock, FlockArg};
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => Ok(locked),
        Err((file, _)) => {
            say(&format!(
                "-----> waiting for another push of {app} to finish building"
            ));
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| BuildError::Io {
                path: path.clone(),
                source: e.into(),
            })
        }
    }
}

/// Checks the job's commit out into a fresh scratch directory and builds and tests it
/// there; every line said is kept for the build log.
pub fn build(job: Job<'_>, say: &mut dyn FnMut(&str)) -> Result<Built, BuildError> {
    let mut log = super::lines::Log::default();
    let mut say = |line: &str| {
        log.push(line);
        say(line);
    };
    let scratch = tempfile::Builder::new()
        .prefix("unifleet-build-")
        .tempdir()
        .map_err(|source| BuildError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    let src = scratch.path().join("src");
    checkout(job.repo, job.commit, &src)?;
    std::fs::create_dir_all(job.cache).map_err(|source| BuildError::Io {
        path: job.cache.to_path_buf(),
        source,
    })?;
    let sandbox = |network, secs: u64| Sandbox {
        source: src.clone(),
        cache: job.cache.to_path_buf(),
        network,
        limits: Limits {
            wall: Duration::from_secs(secs.min(MAX_STEP_SECS)),
            ..Limits::default()
        },
        env: vec![],
    };
    let lock = read_lock(&src)?;
    if let Some(lock) = &lock {
        // Only cargo runs with the network, and only for what the lock file names.
        sbom::check_sources(lock)?;
        // From /tmp, not the checkout: the repository's .cargo/config.toml is not read.
        let fetch = "cd /tmp && cargo fetch --locked --manifest-path /src/Cargo.toml";
        step("fetch", &sandbox(true, 600), fetch, &mut say)?;
    }
    let toolchain = toolchain(&sandbox(false, 60))?;
    step(
        "build",
        &sandbox(false, job.build.timeout_secs),
        &job.build.command,
        &mut say,
    )?;
    if let Some(command) = &job.test.command {
        step(
            "test",
            &sandbox(false, job.test.timeout_secs),
            command,
            &mut say,
        )?;
    }
    let images = images(&src, job.build)?;
    say_images(&images, &src, &mut say);
    let sbom = lock.map(|lock| {
        say(&format!("-----> {}", sbom::summary(&lock)));
        let commit = job.commit.id().to_string();
        sbom::cyclonedx(&lock, job.app, &job.version.to_string(), &commit)
    });
    Ok(Built {
        images,
        scratch,
        log: log.text(),
        toolchain,
        sbom,
        app: job.app.into(),
        version: job.version.to_string(),
        commit: job.commit.id(),
        command: job.build.command.clone(),
    })
}

/// One line per image: its platform, path in the checkout and size.
fn say_images(images: &[Image], src: &Path, say: &mut dyn FnMut(&str)) {
    for image in images {
        let size = std::fs::metadata(&image.path).map(|m| m.len()).unwrap_or(0);
        say(&format!(
            "-----> image for {}: {} ({size} bytes)",
            image.platform.map(|p| p.to_string()).unwrap_or_default(),
            image
                .path
                .strip_prefix(src)
                .unwrap_or(&image.path)
                .display(),
        ));
    }
}

/// The checkout's Cargo.lock, if it has one (a project without one builds with no fetch
/// step and no SBOM).
fn read_lock(src: &Path) -> Result<Option<sbom::Lock>, BuildError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let path = src.join("Cargo.lock");
    let io = |source| BuildError::Io {
        path: path.clone(),
        source,
    };
    // The hub reads it itself, outside the sandbox: never through a link the pusher
    // committed (to the hub's keys), never from a device or a pipe.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(&path);
    let file = match file {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(BuildError::LockNotFile)
        }
        Err(source) => return Err(io(source)),
    };
    if !file.metadata().map_err(io)?.is_file() {
        return Err(BuildError::LockNotFile);
    }
    let mut bytes = vec![];
    let limit = sbom::MAX_LOCK_BYTES as u64 + 1;
    file.take(limit).read_to_end(&mut bytes).map_err(io)?;
    Ok(Some(sbom::parse_lock(&String::from_utf8_lossy(&bytes))?))
}

/// `rustc -V` in the build sandbox: what provenance names as the toolchain.
fn toolchain(sandbox: &Sandbox) -> Result<String, BuildError> {
    let mut first = None;
    sandbox
        .run("rustc -V 2>/dev/null || true", &mut |line| {
            first.get_or_insert_with(|| line.to_string());
        })
        .map_err(|source| BuildError::Step {
            step: "toolchain",
            source,
        })?;
    Ok(first.unwrap_or_default())
}

/// Runs `[test] functional` of the checkout `built` against a staged instance.
pub fn functional(
    built: &Built,
    test: &TestSpec,
    staged: &crate::staging::Staged,
    say: &mut dyn FnMut(&str),
) -> Result<(), BuildError> {
    let Some(command) = &test.functional else {
        return Ok(());
    };
    let guest = staged.guest.ok_or_else(|| BuildError::NoGuest {
        device: staged.device.clone(),
    })?;
    let url = match guest {
        std::net::IpAddr::V4(ip) => format!("http://{ip}:{}", staged.port),
        std::net::IpAddr::V6(ip) => format!("http://[{ip}]:{}", staged.port),
    };
    say(&format!(
        "-----> functional tests against {} on {} at {url}",
        staged.platform, staged.device
    ));
    let sandbox = Sandbox {
        source: built.source(),
        // Never the app's cache: this step has the network, and what it could leave
        // there would be in the next build.
        cache: built.scratch.path().join("functional-cache"),
        network: true,
        limits: Limits {
            wall: Duration::from_secs(test.timeout_secs.min(MAX_STEP_SECS)),
            ..Limits::default()
        },
        env: vec![
            ("UNIFLEET_URL".into(), url),
            ("UNIFLEET_APP".into(), built.app.clone()),
            ("UNIFLEET_VERSION".into(), built.version.clone()),
        ],
    };
    step("functional", &sandbox, command, say)
}

/// Writes `commit`'s tree into `dir`.
fn checkout(repo: &git2::Repository, commit: &git2::Commit, dir: &Path) -> Result<(), BuildError> {
    let fail = |source| BuildError::Checkout {
        dir: dir.to_path_buf(),
        source,
    };
    let tree = commit.tree().map_err(fail)?;
    let mut opts = git2::build::CheckoutBuilder::new();
    // Not the deploy repository's index: the hook runs in git's quarantine, and two
    // pushes at once would race on its lock.
    opts.target_dir(dir)
        .force()
        .recreate_missing(true)
        .update_index(false);
    repo.checkout_tree(tree.as_object(), Some(&mut opts))
        .map_err(fail)
}

/// Runs one step, its output streamed indented, its end said with its time.
fn step(
    name: &'static str,
    sandbox: &Sandbox,
    command: &str,
    say: &mut dyn FnMut(&str),
) -> Result<(), BuildError> {
    say(&format!("-----> {name}: {command}"));
    let began = Instant::now();
    let out = sandbox.run(command, &mut |line| say(&format!("       {line}")));
    match out {
        Ok(_) => {
            say(&format!(
                "-----> {name} passed in {}",
                seconds(began.elapsed())
            ));
            Ok(())
        }
        Err(source) => Err(BuildError::Step { step: name, source }),
    }
}

/// "41.2 s".
pub fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// `[build] images` names at least one image, each by a relative path that stays inside
/// the repository (checked before the build: [`images`] checks the files after it).
pub fn check_images(spec: &BuildSpec) -> Result<(), BuildError> {
    if spec.images.is_empty() {
        return Err(BuildError::NoImages);
    }
    for path in spec.images.values() {
        let rel = Path::new(path);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(BuildError::Outside { path: path.clone() });
        }
    }
    Ok(())
}

/// The images `[build]` names, each a file inside the checkout.
fn images(src: &Path, spec: &BuildSpec) -> Result<Vec<Image>, BuildError> {
    check_images(spec)?;
    let mut out = vec![];
    for (platform, path) in &spec.images {
        let rel = Path::new(path);
        let missing = || BuildError::NoImage {
            platform: *platform,
            path: path.clone(),
        };
        // The build may have left a symlink out of the checkout (at the hub's keys, which
        // the hub itself can read): the file must resolve to one inside it.
        let file = std::fs::canonicalize(src.join(rel)).map_err(|_| missing())?;
        let root = std::fs::canonicalize(src).map_err(|_| missing())?;
        if !file.starts_with(&root) {
            return Err(BuildError::Outside { path: path.clone() });
        }
        if !file.is_file() {
            return Err(missing());
        }
        out.push(Image {
            platform: Some(*platform),
            path: file,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: &str) -> BuildSpec {
        BuildSpec {
            command: "true".into(),
            images: [(Platform::QemuX86_64, path.to_string())].into(),
            timeout_secs: 10,
        }
    }

    #[test]
    fn image_paths_must_stay_inside_the_repository() {
        for bad in ["/etc/passwd", "../out.elf", "out/../../x"] {
            assert!(
                matches!(check_images(&spec(bad)), Err(BuildError::Outside { .. })),
                "{bad}"
            );
        }
        assert!(check_images(&spec("out/app.elf")).is_ok());
        let none = BuildSpec {
            images: BTreeMap::new(),
            ..spec("x")
        };
        assert!(matches!(check_images(&none), Err(BuildError::NoImages)));
    }

    #[test]
    fn an_image_the_build_linked_out_of_the_checkout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (src, secret) = (dir.path().join("src"), dir.path().join("release.key"));
        std::fs::create_dir_all(src.join("out")).unwrap();
        std::fs::write(&secret, b"key").unwrap();
        std::os::unix::fs::symlink(&secret, src.join("out/app.elf")).unwrap();
        assert!(matches!(
            images(&src, &spec("out/app.elf")),
            Err(BuildError::Outside { .. })
        ));
        // A directory linked out of it too.
        std::os::unix::fs::symlink(dir.path(), src.join("up")).unwrap();
        assert!(matches!(
            images(&src, &spec("up/release.key")),
            Err(BuildError::Outside { .. })
        ));
        assert!(matches!(
            images(&src, &spec("out/missing.elf")),
            Err(BuildError::NoImage { .. })
        ));
        std::fs::remove_file(src.join("out/app.elf")).unwrap();
        std::fs::write(src.join("out/app.elf"), b"image").unwrap();
        let found = images(&src, &spec("out/app.elf")).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].platform, Some(Platform::QemuX86_64));
    }
}
