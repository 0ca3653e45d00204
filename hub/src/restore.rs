//! `hub restore`: a hub home built on a fresh machine from a mirror (`hub mirror add`) and
//! the operator's copy of the hub's `keys/` directory (issue 32).
//!
//! The store comes back whole (releases, their numbers, the event log, enrolled devices,
//! the root chain); the deploy repository from the mirror's `refs/deploy/`; the trust root
//! is the store's newest. What a mirror does not hold is the inventory (devices report
//! again once the hub is back) and the keys (never pushed anywhere).

use crate::home::{Home, HomeError, HubConfig, KeyError, WriteError};
use crate::mirror::DEPLOY_REFS;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the restored hub listens, and what it is built from.
#[derive(Debug)]
pub struct RestoreArgs<'a> {
    /// The mirror's git URL.
    pub from: &'a str,
    /// The copy of the old hub's `keys/` directory.
    pub keys: &'a Path,
    pub mqtt_listen: &'a str,
    pub p2p_listen: &'a str,
}

/// Why a hub could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{} is not empty: restore builds a new hub home; pick an empty or new directory", .0.display())]
    NotEmpty(PathBuf),
    #[error("running {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {said}")]
    Git { what: String, said: String },
    #[error("the mirror {url} holds no store (no root.bin at its HEAD): is it a unifleet mirror?")]
    NoRoot { url: String },
    #[error("the mirror's root.bin does not decode")]
    BadRoot(#[source] proto::VerifyError),
    #[error("reading the keys directory {}", path.display())]
    Keys {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} has no {file}: give --keys the old hub's keys/ directory (the hub's libp2p identity \
         and timestamp key are in it)",
        dir.display()
    )]
    MissingKey { dir: PathBuf, file: &'static str },
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("writing hub.toml")]
    Config(#[source] toml::ser::Error),
}

/// The keys a hub cannot serve without (the others are copied when present).
const NEEDED_KEYS: [&str; 2] = ["p2p.key", "timestamp.key"];

/// Builds the hub home `dir` from the mirror and the keys; returns the restored home.
/// `dir` must not exist or be empty; on failure what was made is removed.
pub fn restore(dir: &Path, args: &RestoreArgs<'_>) -> Result<Home, RestoreError> {
    if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(RestoreError::NotEmpty(dir.into()));
    }
    for file in NEEDED_KEYS {
        if !args.keys.join(file).is_file() {
            let dir = args.keys.into();
            return Err(RestoreError::MissingKey { dir, file });
        }
    }
    let made = build(dir, args);
    if made.is_err() {
        let _ = std::fs::remove_dir_all(dir);
    }
    made
}

fn build(dir: &Path, args: &RestoreArgs<'_>) -> Result<Home, RestoreError> {
    let create = |path: &Path| {
        std::fs::create_dir_all(path).map_err(|source| WriteError::Create {
            path: path.into(),
            source,
        })
    };
    create(&dir.join("keys"))?;
    let store = dir.join("store.git");
    git(
        Command::new("git")
            .args(["clone", "--bare", "--quiet", args.from])
            .arg(&store),
        format!("git clone of the store from {}", args.from),
    )?;
    let deploy = dir.join("deploy.git");
    git(
        Command::new("git")
            .args(["init", "--bare", "--quiet"])
            .arg(&deploy),
        "git init of the deploy repository".into(),
    )?;
    git(
        Command::new("git")
            .arg("--git-dir")
            .arg(&deploy)
            .args(["fetch", "--quiet", args.from])
            .arg(format!("+{DEPLOY_REFS}/*:refs/heads/*")),
        format!("git fetch of the deploy repository from {}", args.from),
    )?;
    copy_keys(args.keys, &dir.join("keys"))?;
    let root = crate::store::Store::open(&store)
        .ok()
        .and_then(|s| s.read("root.bin").ok().flatten())
        .ok_or_else(|| RestoreError::NoRoot {
            url: args.from.into(),
        })?;
    let env = proto::envelope::Envelope::decode(&root, proto::codec::Kind::Root)
        .map_err(RestoreError::BadRoot)?;
    let claimed: proto::root::Root = proto::codec::decode(proto::codec::Kind::Root, &env.payload)
        .map_err(|e| RestoreError::BadRoot(e.into()))?;
    write(&dir.join("root.bin"), &root)?;
    let mut config = HubConfig::new(&claimed.fleet, args.mqtt_listen, args.p2p_listen);
    // The restored hub goes on mirroring where it came from.
    config.mirrors = vec![args.from.into()];
    let text = toml::to_string_pretty(&config).map_err(RestoreError::Config)?;
    write(&dir.join("hub.toml"), text.as_bytes())?;
    let home = Home::open(dir)?;
    // What `hub serve` needs, checked now rather than at its start.
    home.p2p_seed()?;
    home.timestamp_key()?;
    home.anchor_root()?;
    crate::deploy::install_hook(dir).map_err(|e| RestoreError::Git {
        what: "installing the deploy hook".into(),
        said: proto::Chain(&e).to_string(),
    })?;
    // git clone and fetch do not sync what they write.
    crate::home::sync_tree(dir)?;
    Ok(home)
}

fn git(cmd: &mut Command, what: String) -> Result<(), RestoreError> {
    cmd.env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null());
    let out = match cmd.output() {
        Ok(out) => out,
        Err(source) => return Err(RestoreError::Spawn { what, source }),
    };
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    let said = said.trim().lines().collect::<Vec<_>>().join("; ");
    Err(RestoreError::Git { what, said })
}

/// Every regular file of `from` into `to`, readable by the owner only.
fn copy_keys(from: &Path, to: &Path) -> Result<(), RestoreError> {
    let keys_error = |source| RestoreError::Keys {
        path: from.into(),
        source,
    };
    for entry in std::fs::read_dir(from).map_err(keys_error)? {
        let entry = entry.map_err(keys_error)?;
        if !entry.file_type().map_err(keys_error)?.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).map_err(keys_error)?;
        crate::home::write_secret_text(&to.join(entry.file_name()), &text)?;
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    std::fs::write(path, bytes).map_err(|source| WriteError::Write {
        path: path.into(),
        source,
    })
}
