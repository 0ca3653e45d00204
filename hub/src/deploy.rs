//! `git push` deploys: the hub's bare deploy repository runs the publish pipeline from a
//! pre-receive hook, so `git push unifleet main` builds and publishes (Heroku style), and
//! the branch moves only if everything passed: a failed build, test, staging or signing
//! rejects the push (`! [remote rejected] … (pre-receive hook declined)`), saying which
//! step failed and why, with nothing signed or announced.
//!
//! The pushed commit must contain `unifleet.toml`:
//! ```toml
//! app = "hello"
//! version = "1.2.0"
//! [build]                     # built from source in a sandbox (see `crate::build`) …
//! command = "./build.sh"      # no network; `cargo fetch --locked` ran before it
//! images = { "qemu-x86_64" = "out/hello.elf", "qemu-aarch64" = "out/hello.img" }
//! timeout_secs = 1800
//! [test]
//! command = "cargo test --locked --lib"   # unit tests, after the build
//! ```
//! or, for an image built elsewhere and committed:
//! ```toml
//! image = "build/hello.elf"   # path inside the repository, or one image per platform:
//! # images = { "qemu-x86_64" = "build/hello.elf", "qemu-aarch64" = "build/hello-arm64.img" }
//! channel = "stable"          # optional
//! memory_mib = 32             # optional boot spec fields
//! vcpus = 1
//! cmdline = ""
//! probe = "banner"
//! probe_timeout_secs = 10
//! network = false             # the unikernel needs a network interface
//! no_staging = false
//! no_staging_for = []         # platforms without a staging device
//! waves = "1%@0,10%@1h,100%@1d"   # optional staged rollout (as `hub publish --waves`)
//! halt_after = 20             # optional: halt once 20 devices tried it and …
//! halt_failures = 10          # … this percentage of them rolled back (default 50)
//! target_tags = ["beta"]      # optional: only devices with these tags …
//! target_devices = []         # … or these names
//! follow_secs = 120           # how long the push follows the first wave
//! ```

use crate::build::source::{BuildError, BuildSpec, TestSpec};
use crate::home::Home;
use crate::publish::{publish, Image, PublishArgs, PublishError};
use proto::manifest::Platform;
use serde::Deserialize;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why the deploy repository could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("creating {}", path.display())]
    Repository {
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("locating the hub binary")]
    Exe(#[source] std::io::Error),
    #[error("resolving {}", path.display())]
    Resolve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the deploy hook {}", path.display())]
    Hook {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a push was not deployed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("opening the deploy repository {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("reading the pushed refs")]
    Refs(#[source] std::io::Error),
    #[error("reading pushed commit {commit}")]
    Commit {
        commit: String,
        #[source]
        source: git2::Error,
    },
    #[error("{path} is not in the pushed commit")]
    Missing {
        path: String,
        #[source]
        source: git2::Error,
    },
    #[error("reading {path} from the pushed commit")]
    Blob {
        path: String,
        #[source]
        source: git2::Error,
    },
    #[error("parsing unifleet.toml")]
    Parse(#[source] Box<toml::de::Error>),
    #[error(
        "unifleet.toml: give either `image` or `images` (or a [build] section), not both or \
         neither"
    )]
    Images,
    #[error("unifleet.toml: [build] images name the images; drop `image`/`images`")]
    BuildAndImages,
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("unifleet.toml: waves")]
    Waves(#[source] proto::rollout::BadWaves),
    #[error("unifleet.toml: the rollout (waves, halt_after, halt_failures, targets)")]
    Rollout(#[source] proto::Invalid),
    #[error("making a directory for the pushed images")]
    TempDir(#[source] std::io::Error),
    #[error("writing {}", path.display())]
    WriteImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("push of {refname} rejected")]
    Rejected {
        refname: String,
        #[source]
        source: Box<DeployError>,
    },
}

type Result<T, E = DeployError> = std::result::Result<T, E>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployFile {
    app: String,
    version: semver::Version,
    #[serde(default)]
    image: Option<String>,
    /// Platform to path, for a release of several platforms.
    #[serde(default)]
    images: std::collections::BTreeMap<Platform, String>,
    #[serde(default = "stable")]
    channel: String,
    #[serde(default = "mem")]
    memory_mib: u32,
    #[serde(default = "one")]
    vcpus: u32,
    #[serde(default)]
    cmdline: String,
    #[serde(default = "banner")]
    probe: String,
    #[serde(default = "ten")]
    probe_timeout_secs: u64,
    #[serde(default)]
    network: bool,
    #[serde(default)]
    no_staging: bool,
    #[serde(default)]
    no_staging_for: Vec<Platform>,
    #[serde(default = "staging_timeout")]
    staging_timeout_secs: u64,
    #[serde(default)]
    waves: Option<String>,
    #[serde(default)]
    halt_after: Option<u32>,
    #[serde(default = "fifty")]
    halt_failures: u8,
    #[serde(default)]
    target_tags: Vec<String>,
    #[serde(default)]
    target_devices: Vec<String>,
    /// How long a push follows the release's first wave before it returns.
    #[serde(default = "follow_secs")]
    follow_secs: u64,
    #[serde(default)]
    build: Option<BuildSpec>,
    #[serde(default)]
    test: Option<TestSpec>,
}

impl DeployFile {
    /// The rollout it asks for, its spelling checked as `hub publish` checks it.
    fn rollout(&self) -> Result<proto::rollout::Rollout> {
        let waves = match &self.waves {
            Some(w) => proto::rollout::parse_waves(w).map_err(DeployError::Waves)?,
            None => vec![],
        };
        let rollout = proto::rollout::Rollout {
            waves,
            tags: self.target_tags.clone(),
            devices: self.target_devices.clone(),
            halt: self.halt_after.map(|n| proto::rollout::HaltPolicy {
                min_attempts: n,
                max_failure_percent: self.halt_failures,
            }),
        };
        rollout.validate().map_err(DeployError::Rollout)?;
        Ok(rollout)
    }

    /// The pipeline's arguments (a push is never held for co-signing).
    fn into_publish(self) -> Result<PublishArgs> {
        let rollout = self.rollout()?;
        Ok(PublishArgs {
            app: self.app,
            version: self.version,
            channel: self.channel,
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            cmdline: self.cmdline,
            probe: self.probe,
            probe_timeout_secs: self.probe_timeout_secs,
            network: self.network,
            no_staging: self.no_staging,
            no_staging_for: self.no_staging_for,
            staging_timeout_secs: self.staging_timeout_secs,
            hold: false,
            rollout,
        })
    }
}

fn follow_secs() -> u64 {
    120
}

fn fifty() -> u8 {
    50
}

fn staging_timeout() -> u64 {
    120
}

fn stable() -> String {
    "stable".into()
}
fn mem() -> u32 {
    32
}
fn one() -> u32 {
    1
}
fn banner() -> String {
    "banner".into()
}
fn ten() -> u64 {
    10
}

/// The hook's mark: what tells a hook as this hub's (an operator's own hook is left alone).
const HOOK_MARK: &str = "# unifleet:";

/// Creates `DIR/deploy.git` with the hook that calls this hub binary.
pub fn create(dir: &Path) -> Result<(), CreateError> {
    let path = dir.join("deploy.git");
    if let Err(source) = git2::Repository::init_bare(&path) {
        return Err(CreateError::Repository { path, source });
    }
    install_hook(dir)
}

/// Writes the deploy repository's pre-receive hook for this hub binary; a post-receive
/// hook an older hub wrote (which published after the branch had moved) is removed.
pub fn install_hook(dir: &Path) -> Result<(), CreateError> {
    let hooks = dir.join("deploy.git/hooks");
    let exe = std::env::current_exe().map_err(CreateError::Exe)?;
    let home = std::fs::canonicalize(dir).map_err(|source| CreateError::Resolve {
        path: dir.into(),
        source,
    })?;
    let hook = format!(
        "#!/bin/sh\n{HOOK_MARK} build, test, stage and publish what was pushed; the branch \
         moves only if all passed\nexec '{}' deploy-hook --dir '{}'\n",
        exe.display(),
        home.display()
    );
    let path = hooks.join("pre-receive");
    let tmp = hooks.join("pre-receive.tmp");
    use std::os::unix::fs::PermissionsExt;
    let hook_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CreateError::Hook { path, source }
    };
    std::fs::write(&tmp, hook)
        .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(hook_error(&path))?;
    let old = hooks.join("post-receive");
    if std::fs::read_to_string(&old).is_ok_and(|t| t.contains(HOOK_MARK)) {
        std::fs::remove_file(&old).map_err(hook_error(&old))?;
    }
    Ok(())
}

/// The pre-receive hook: reads `old new ref` lines from stdin and builds (or takes the
/// committed images of) and publishes each pushed commit; an error rejects the whole
/// push. Output goes back to the pusher as `remote:` lines. Runs inside git's quarantine:
/// the pushed objects are found through the environment git sets for the hook.
pub fn hook(home: &Home, input: impl BufRead, progress: &mut dyn FnMut(&str)) -> Result<()> {
    let path = home.dir.join("deploy.git");
    let repo = match std::env::var_os("GIT_DIR") {
        Some(_) => git2::Repository::open_from_env(),
        None => git2::Repository::open_bare(&path),
    };
    let repo = repo.map_err(|source| DeployError::Open { path, source })?;
    for line in input.lines() {
        let line = line.map_err(DeployError::Refs)?;
        let mut parts = line.split_whitespace();
        let (Some(_old), Some(new), Some(refname)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if new.chars().all(|c| c == '0') {
            continue; // branch deleted
        }
        let began = Instant::now();
        progress(&format!(
            "unifleet: deploying {refname} at {}",
            &new[..new.len().min(12)]
        ));
        deploy(home, &repo, new, progress).map_err(|e| DeployError::Rejected {
            refname: refname.into(),
            source: Box::new(e),
        })?;
        progress(&format!(
            "unifleet: done in {}",
            crate::build::source::seconds(began.elapsed())
        ));
    }
    Ok(())
}

/// Builds, or reads the committed images of, the pushed commit `new`, and publishes them.
fn deploy(
    home: &Home,
    repo: &git2::Repository,
    new: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let commit_error = |source| DeployError::Commit {
        commit: new.into(),
        source,
    };
    let commit = git2::Oid::from_str(new)
        .and_then(|id| repo.find_commit(id))
        .map_err(commit_error)?;
    let tree = commit.tree().map_err(commit_error)?;
    let read = |p: &str| read_pushed(repo, &tree, p);
    let mut spec: DeployFile = toml::from_str(&String::from_utf8_lossy(&read("unifleet.toml")?))
        .map_err(|e| DeployError::Parse(Box::new(e)))?;
    // Built here (the scratch directory lives until the release is stored, the build lock
    // until then too) or committed (written to a directory of their own).
    let (files, _dir, _lock) = match spec.build.take() {
        Some(build) => {
            if spec.image.is_some() || !spec.images.is_empty() {
                return Err(DeployError::BuildAndImages);
            }
            let lock = crate::build::source::lock_app(home, &spec.app, progress)?;
            let test = spec.test.take().unwrap_or_default();
            let built = crate::build::source::build(
                home, repo, &commit, &spec.app, &build, &test, progress,
            )?;
            (built.images, built.scratch, Some(lock))
        }
        None => {
            let (files, dir) = committed_images(&spec, &read)?;
            (files, dir, None)
        }
    };
    let follow = Duration::from_secs(spec.follow_secs);
    let args = spec.into_publish()?;
    let infos = publish(home, &files, &args, progress)?;
    let announced = crate::control::notify(home, progress);
    let release = infos[0].release;
    progress(&format!(
        "unifleet: released {} release {release} on {} for {}",
        args.app,
        args.channel,
        crate::publish::platforms(&infos)
    ));
    if announced {
        follow_first_wave(home, &args.app, &args.channel, release, follow, progress);
    }
    progress(&format!(
        "unifleet: to go back: hub rollback {} --channel {}",
        args.app, args.channel
    ));
    Ok(())
}

/// The images committed in the repository (`image` or `images`), each written to a file of
/// its own in a directory removed when it drops.
fn committed_images(
    spec: &DeployFile,
    read: &dyn Fn(&str) -> Result<Vec<u8>>,
) -> Result<(Vec<Image>, tempfile::TempDir)> {
    let images: Vec<(Option<Platform>, &String)> = match (&spec.image, spec.images.is_empty()) {
        (Some(path), true) => vec![(None, path)],
        (None, false) => spec
            .images
            .iter()
            .map(|(p, path)| (Some(*p), path))
            .collect(),
        _ => return Err(DeployError::Images),
    };
    let dir = tempfile::Builder::new()
        .prefix("unifleet-deploy-")
        .tempdir()
        .map_err(DeployError::TempDir)?;
    let mut files = vec![];
    for (i, (platform, path)) in images.into_iter().enumerate() {
        let file = dir.path().join(format!("image-{i}"));
        if let Err(source) = std::fs::write(&file, read(path)?) {
            return Err(DeployError::WriteImage { path: file, source });
        }
        files.push(Image {
            platform,
            path: file,
        });
    }
    Ok((files, dir))
}

/// One line on a wave. Devices appear once they report on the release (within seconds of
/// hearing of it).
fn wave_line(w: &crate::rollout::WaveCounts) -> String {
    if w.total() == 0 {
        return "-----> first wave: no device has reported on it yet".into();
    }
    format!(
        "-----> first wave: active {}/{}, pending {}, downloading {}, failed {}, rolled back {}",
        w.active,
        w.total(),
        w.pending,
        w.downloading,
        w.failed,
        w.rolled_back
    )
}

/// Says how the release's first wave is doing, a line each time that changes, until
/// none of its devices is still pending or downloading, or `limit` passes. The hub
/// writes the inventory it reads about once a second.
fn follow_first_wave(
    home: &Home,
    app: &str,
    channel: &str,
    release: u64,
    limit: Duration,
    progress: &mut dyn FnMut(&str),
) {
    let began = Instant::now();
    let mut last = String::new();
    loop {
        let wave = match crate::rollout::status(home, app, channel, Some(release)) {
            Ok(s) => s.waves_detail.into_iter().next().unwrap_or_default(),
            Err(e) => {
                let e = proto::Chain(&e);
                return progress(&format!("-----> not following the rollout: {e}"));
            }
        };
        let line = wave_line(&wave);
        if line != last {
            progress(&line);
            last = line;
        }
        if wave.total() > 0 && wave.pending + wave.downloading == 0 {
            return;
        }
        if began.elapsed() >= limit {
            return progress(&format!(
                "-----> still rolling out after {} (follow it: hub rollout watch {app})",
                crate::build::source::seconds(limit)
            ));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The file at `path` in the pushed `tree`.
fn read_pushed(repo: &git2::Repository, tree: &git2::Tree<'_>, path: &str) -> Result<Vec<u8>> {
    let entry = tree
        .get_path(Path::new(path))
        .map_err(|source| DeployError::Missing {
            path: path.into(),
            source,
        })?;
    match repo.find_blob(entry.id()) {
        Ok(blob) => Ok(blob.content().to_vec()),
        Err(source) => Err(DeployError::Blob {
            path: path.into(),
            source,
        }),
    }
}
