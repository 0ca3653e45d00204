//! `git push` deploys: the hub's bare deploy repository runs the publish pipeline from a
//! pre-receive hook, so `git push unifleet main` builds and publishes (Heroku style), and
//! the branch moves only if everything passed: a failed build, test, staging or signing
//! rejects the push (`! [remote rejected] … (pre-receive hook declined)`), saying which
//! step failed and why, with nothing released on the app's channel (a candidate that
//! failed staging was signed for the staging channel only). One branch per push (tags
//! and deletions pass untouched): git moves the refs only after the hook, so a release
//! of one branch must not go out with another refused. Two pushes to the same branch at
//! once both build and publish in turn, and git then refuses the later ref update: the
//! release stays (a later push supersedes it).
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
    #[error(
        "{} is not this hub's hook: left as it is, so pushes are not deployed; move it \
         aside (or call `hub deploy-hook --dir HUB` from it) and restart hub serve",
        path.display()
    )]
    Foreign { path: PathBuf },
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
    /// Checked before a build of up to half an hour that could not be released.
    #[error(transparent)]
    Root(#[from] crate::home::HomeError),
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
    #[error(
        "this push updates {} branches ({}): push one branch at a time, each is built and \
         released on its own",
        .0.len(),
        .0.join(", ")
    )]
    SeveralBranches(Vec<String>),
    #[error("unifleet.toml: app {0:?}: lower-case letters, digits, '-', '_' and '.' only")]
    AppName(#[source] proto::names::BadName),
    #[error("unifleet.toml: channel {0:?}")]
    ChannelName(#[source] proto::names::BadName),
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
            from_source: None,
        })
    }
}

fn follow_secs() -> u64 {
    120
}

/// The most a push may ask to follow its first wave (`follow_secs`).
const MAX_FOLLOW_SECS: u64 = 600;
/// How long a push waits for any device of the channel to report before it stops
/// following the first wave.
const NOBODY_WITHIN: Duration = Duration::from_secs(5);

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
    if std::fs::read_to_string(&path).is_ok_and(|t| !t.contains(HOOK_MARK)) {
        return Err(CreateError::Foreign { path });
    }
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
    let mut branches = vec![];
    for line in input.lines() {
        let line = line.map_err(DeployError::Refs)?;
        let mut parts = line.split_whitespace();
        let (Some(_old), Some(new), Some(refname)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        // Deleted branches and tags are let through untouched: only a branch deploys.
        if new.chars().all(|c| c == '0') || !refname.starts_with("refs/heads/") {
            continue;
        }
        branches.push((new.to_string(), refname.to_string()));
    }
    // Git moves the refs only after the hook: a release of one branch would be out even
    // if another branch of the same push were refused.
    if branches.len() > 1 {
        let names = branches.into_iter().map(|(_, r)| r).collect();
        return Err(DeployError::SeveralBranches(names));
    }
    for (new, refname) in branches {
        let (new, refname) = (new.as_str(), refname.as_str());
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
    // Everything that can be checked is, before a build of up to half an hour; the app's
    // name also names its build directory.
    proto::names::check("app", &spec.app).map_err(DeployError::AppName)?;
    home.trusted_root()?;
    proto::names::check("channel", &spec.channel).map_err(DeployError::ChannelName)?;
    spec.rollout()?;
    let follow = Duration::from_secs(spec.follow_secs.min(MAX_FOLLOW_SECS));
    // The scratch directory and the build lock live until the release is stored.
    let pushed = build_or_read(home, repo, &commit, &mut spec, &read, progress)?;
    let mut args = spec.into_publish()?;
    let infos = match &pushed {
        Pushed::Source { built, test, .. } => {
            args.from_source = Some(built.from_source());
            let mut check = |staged: &crate::staging::Staged, say: &mut dyn FnMut(&str)| {
                crate::build::source::functional(built, test, staged, say).map_err(Into::into)
            };
            let check = test.functional.is_some().then_some(&mut check as _);
            crate::publish::publish_checked(home, &built.images, &args, check, progress)?
        }
        Pushed::Committed { files, .. } => publish(home, files, &args, progress)?,
    };
    drop(pushed);
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

/// Where a push's images came from: built from its source (the checkout, for the
/// functional tests, and the app's build lock), or committed in it (written out to a
/// directory of their own). Held until the release is stored.
enum Pushed {
    Source {
        built: Box<crate::build::source::Built>,
        test: TestSpec,
        _lock: nix::fcntl::Flock<std::fs::File>,
    },
    Committed {
        files: Vec<Image>,
        _images: tempfile::TempDir,
    },
}

/// Builds the pushed commit if its `unifleet.toml` has `[build]` (under the app's build
/// lock), else writes out the images it names.
fn build_or_read(
    home: &Home,
    repo: &git2::Repository,
    commit: &git2::Commit<'_>,
    spec: &mut DeployFile,
    read: &dyn Fn(&str) -> Result<Vec<u8>>,
    progress: &mut dyn FnMut(&str),
) -> Result<Pushed> {
    let Some(build) = spec.build.take() else {
        let (files, dir) = committed_images(spec, read)?;
        return Ok(Pushed::Committed {
            files,
            _images: dir,
        });
    };
    if spec.image.is_some() || !spec.images.is_empty() {
        return Err(DeployError::BuildAndImages);
    }
    crate::build::source::check_images(&build)?;
    let lock = crate::build::source::lock_app(home, &spec.app, progress)?;
    let test = spec.test.take().unwrap_or_default();
    let cache = crate::build::source::app_dir(home, &spec.app).join("cache");
    let job = crate::build::source::Job {
        repo,
        commit,
        app: &spec.app,
        version: &spec.version,
        build: &build,
        test: &test,
        cache: &cache,
    };
    let built = crate::build::source::build(job, progress)?;
    Ok(Pushed::Source {
        built: Box::new(built),
        test,
        _lock: lock,
    })
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
        let status = match crate::rollout::status(home, app, channel, Some(release)) {
            Ok(s) => s,
            Err(e) => {
                let e = proto::Chain(&e);
                return progress(&format!("-----> not following the rollout: {e}"));
            }
        };
        let wave = status.waves_detail.first().cloned().unwrap_or_default();
        // Devices the hub knows of that fall in later waves or outside the targets: the
        // first wave is empty, not late.
        let elsewhere = status.not_targeted
            + status
                .waves_detail
                .iter()
                .skip(1)
                .map(|w| w.total())
                .sum::<u32>();
        // Devices report within a second or two of hearing of a release; a fleet where
        // none on the channel has after a while has none to wait for.
        let nobody = || {
            began.elapsed() >= NOBODY_WITHIN
                && !crate::inventory::load_inventory(home)
                    .values()
                    .any(|d| d.app == app && d.channel == channel)
        };
        if wave.total() == 0 && elsewhere == 0 && nobody() {
            return progress(&format!(
                "-----> no device on {channel} has reported on {app} within {}: not following \
                 (hub rollout watch {app})",
                crate::build::source::seconds(NOBODY_WITHIN)
            ));
        }
        if wave.total() == 0 && elsewhere > 0 {
            return progress(&format!(
                "-----> first wave: none of the {elsewhere} device(s) on {channel} is in it \
                 (follow the later waves: hub rollout watch {app})"
            ));
        }
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

/// The `[build]` and `[test]` of `commit`'s `unifleet.toml` (`hub rebuild` repeats them).
pub fn build_of(
    repo: &git2::Repository,
    commit: &git2::Commit<'_>,
) -> Result<(semver::Version, Option<BuildSpec>, TestSpec)> {
    let tree = commit.tree().map_err(|source| DeployError::Commit {
        commit: commit.id().to_string(),
        source,
    })?;
    let text = read_pushed(repo, &tree, "unifleet.toml")?;
    let spec: DeployFile = toml::from_str(&String::from_utf8_lossy(&text))
        .map_err(|e| DeployError::Parse(Box::new(e)))?;
    Ok((spec.version, spec.build, spec.test.unwrap_or_default()))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An older hub's post-receive hook is replaced by this one's pre-receive hook; an
    /// operator's own pre-receive hook is left alone and said.
    #[test]
    fn the_hook_replaces_an_older_hubs_but_not_an_operators() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = dir.path().join("deploy.git/hooks");
        git2::Repository::init_bare(dir.path().join("deploy.git")).unwrap();
        std::fs::create_dir_all(&hooks).unwrap();
        let old = "#!/bin/sh\n# unifleet: publish what was pushed\nexec hub deploy-hook\n";
        std::fs::write(hooks.join("post-receive"), old).unwrap();
        install_hook(dir.path()).unwrap();
        assert!(!hooks.join("post-receive").exists());
        let ours = std::fs::read_to_string(hooks.join("pre-receive")).unwrap();
        assert!(
            ours.contains(HOOK_MARK) && ours.contains("deploy-hook"),
            "{ours}"
        );
        install_hook(dir.path()).unwrap(); // again: ours is rewritten

        let theirs = "#!/bin/sh\n# the operator's access control\nexit 0\n";
        std::fs::write(hooks.join("pre-receive"), theirs).unwrap();
        assert!(matches!(
            install_hook(dir.path()),
            Err(CreateError::Foreign { .. })
        ));
        assert_eq!(
            std::fs::read_to_string(hooks.join("pre-receive")).unwrap(),
            theirs
        );
    }
}
