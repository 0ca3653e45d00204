//! `git push` deploys: the hub's bare deploy repository runs the publish pipeline from a
//! post-receive hook, so `git push unifleet main` publishes (Heroku style).
//!
//! The pushed commit must contain `unifleet.toml`:
//! ```toml
//! app = "hello"
//! version = "1.2.0"
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
//! ```

use crate::home::Home;
use crate::publish::{publish, Image, PublishArgs, PublishError};
use proto::manifest::Platform;
use serde::Deserialize;
use std::io::BufRead;
use std::path::{Path, PathBuf};

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
    #[error("writing the post-receive hook {}", path.display())]
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
    #[error("unifleet.toml: give either `image` or `images`, not both or neither")]
    Images,
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

/// Creates `DIR/deploy.git` with a post-receive hook that calls this hub binary.
pub fn create(dir: &Path) -> Result<(), CreateError> {
    let path = dir.join("deploy.git");
    if let Err(source) = git2::Repository::init_bare(&path) {
        return Err(CreateError::Repository { path, source });
    }
    let exe = std::env::current_exe().map_err(CreateError::Exe)?;
    let home = std::fs::canonicalize(dir).map_err(|source| CreateError::Resolve {
        path: dir.into(),
        source,
    })?;
    let hook_path = path.join("hooks/post-receive");
    let hook = format!(
        "#!/bin/sh\n# unifleet: publish what was pushed\nexec '{}' deploy-hook --dir '{}'\n",
        exe.display(),
        home.display()
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(&hook_path, hook)
        .and_then(|()| std::fs::set_permissions(&hook_path, std::fs::Permissions::from_mode(0o755)))
        .map_err(|source| CreateError::Hook {
            path: hook_path.clone(),
            source,
        })
}

/// The post-receive hook: reads `old new ref` lines from stdin, publishes each pushed
/// commit. Output goes back to the pusher as `remote:` lines.
pub fn hook(home: &Home, input: impl BufRead, progress: &mut dyn FnMut(&str)) -> Result<()> {
    let path = home.dir.join("deploy.git");
    let repo = match git2::Repository::open_bare(&path) {
        Ok(repo) => repo,
        Err(source) => return Err(DeployError::Open { path, source }),
    };
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
        progress(&format!(
            "unifleet: deploying {refname} at {}",
            &new[..new.len().min(12)]
        ));
        deploy(home, &repo, new, progress)?;
    }
    Ok(())
}

/// Publishes the pushed commit `new`.
fn deploy(
    home: &Home,
    repo: &git2::Repository,
    new: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let tree = git2::Oid::from_str(new)
        .and_then(|id| repo.find_commit(id))
        .and_then(|commit| commit.tree())
        .map_err(|source| DeployError::Commit {
            commit: new.into(),
            source,
        })?;
    let read = |p: &str| read_pushed(repo, &tree, p);
    let spec: DeployFile = toml::from_str(&String::from_utf8_lossy(&read("unifleet.toml")?))
        .map_err(|e| DeployError::Parse(Box::new(e)))?;
    let images: Vec<(Option<Platform>, &String)> = match (&spec.image, spec.images.is_empty()) {
        (Some(path), true) => vec![(None, path)],
        (None, false) => spec
            .images
            .iter()
            .map(|(p, path)| (Some(*p), path))
            .collect(),
        _ => return Err(DeployError::Images),
    };
    // Each image to a file of its own while the pipeline runs, removed after.
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
    let args = spec.into_publish()?;
    let infos = publish(home, &files, &args, progress)?;
    crate::control::notify(home, progress);
    progress(&format!(
        "unifleet: released {} release {} on {} for {}",
        args.app,
        infos[0].release,
        args.channel,
        crate::publish::platforms(&infos)
    ));
    Ok(())
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
