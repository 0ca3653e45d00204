//! `hub restore`: a hub home built on a fresh machine from a mirror (`hub mirror add`) and
//! the operator's copy of the hub's `keys/` directory (issue 32).
//!
//! The store comes back whole (releases, their numbers, the event log, enrolled devices,
//! the root chain); the deploy repository from the mirror's `refs/deploy/`; the trust root
//! is the store's newest. What a mirror does not hold is the inventory (devices report
//! again once the hub is back) and the keys (never pushed anywhere).

use crate::home::{write_atomic, Home, HomeError, HubConfig, KeyError, WriteError};
use crate::mirror::{shown, DEPLOY_REFS};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the restored hub listens, and what it is built from.
#[derive(Debug)]
pub struct RestoreArgs<'a> {
    /// The mirror's git URL.
    pub from: &'a str,
    /// The copy of the old hub's `keys/` directory.
    pub keys: &'a Path,
    /// The old hub's `hub.toml` (its settings: who is served, dashboard, metrics …);
    /// absent: the defaults, listening on the two addresses below.
    pub config: Option<&'a Path>,
    pub mqtt_listen: &'a str,
    pub p2p_listen: &'a str,
    /// Push on to the mirror restored from (off by default: with the old hub still alive,
    /// two hubs would push there).
    pub keep_mirroring: bool,
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
    #[error(
        "the mirror {url} has branches {branches:?} and none is its HEAD: say which with \
         `git --git-dir URL symbolic-ref HEAD refs/heads/NAME` on the mirror"
    )]
    NoHead { url: String, branches: Vec<String> },
    #[error(
        "{} is not a key of the mirror's root (version {version}, role {role}): copy keys/ \
         from after the old hub's last `hub root publish`",
        path.display()
    )]
    KeyNotInRoot {
        path: PathBuf,
        role: &'static str,
        version: u64,
    },
    #[error("reading {}", path.display())]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a hub.toml", path.display())]
    ParseConfig {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("the mirror's root.bin does not decode")]
    BadRoot(#[source] proto::VerifyError),
    #[error("reading {}", path.display())]
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
    // A fresh file system's lost+found does not count.
    let used = std::fs::read_dir(dir)
        .map(|d| d.flatten().any(|e| e.file_name() != "lost+found"))
        .unwrap_or(false);
    if used {
        return Err(RestoreError::NotEmpty(dir.into()));
    }
    for file in NEEDED_KEYS {
        if !args.keys.join(file).is_file() {
            let dir = args.keys.into();
            return Err(RestoreError::MissingKey { dir, file });
        }
    }
    let existed = dir.exists();
    let made = build(dir, args);
    if made.is_err() {
        // Only what restore made: `dir` may be a mount point with its lost+found.
        for name in ["keys", "store.git", "deploy.git", "root.bin", "hub.toml"] {
            let path = dir.join(name);
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
        if !existed {
            let _ = std::fs::remove_dir(dir);
        }
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
            .args(["clone", "--bare", "--quiet", "--", args.from])
            .arg(&store),
        format!("git clone of the store from {}", shown(args.from)),
    )?;
    point_head(&store, args.from)?;
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
            .args(["fetch", "--quiet", "--", args.from])
            .arg(format!("+{DEPLOY_REFS}/*:refs/heads/*")),
        format!(
            "git fetch of the deploy repository from {}",
            shown(args.from)
        ),
    )?;
    copy_keys(args.keys, &dir.join("keys"))?;
    let root = crate::store::Store::open(&store)
        .ok()
        .and_then(|s| s.read("root.bin").ok().flatten())
        .ok_or_else(|| RestoreError::NoRoot {
            url: shown(args.from),
        })?;
    let env = proto::envelope::Envelope::decode(&root, proto::codec::Kind::Root)
        .map_err(RestoreError::BadRoot)?;
    let claimed: proto::root::Root = proto::codec::decode(proto::codec::Kind::Root, &env.payload)
        .map_err(|e| RestoreError::BadRoot(e.into()))?;
    write_atomic(&dir.join("root.bin"), &root)?;
    let mut config = match args.config {
        Some(path) => read_config(path)?,
        None => HubConfig::new(&claimed.fleet, args.mqtt_listen, args.p2p_listen),
    };
    config.mirrors = match args.keep_mirroring {
        true => vec![args.from.into()],
        false => vec![],
    };
    let text = toml::to_string_pretty(&config).map_err(RestoreError::Config)?;
    write_atomic(&dir.join("hub.toml"), text.as_bytes())?;
    let home = Home::open(dir)?;
    check_keys(&home, &claimed)?;
    crate::deploy::install_hook(dir).map_err(|e| RestoreError::Git {
        what: "installing the deploy hook".into(),
        said: proto::Chain(&e).to_string(),
    })?;
    // git clone and fetch do not sync what they write.
    crate::home::sync_tree(dir)?;
    Ok(home)
}

/// A mirror's HEAD may name a branch the hub never pushed (a hosting service's `main`
/// where the store's branch is `master`): then HEAD is pointed at the one branch there is.
fn point_head(store: &Path, url: &str) -> Result<(), RestoreError> {
    let repo = git2::Repository::open_bare(store).map_err(|e| RestoreError::Git {
        what: "opening the cloned store".into(),
        said: e.to_string(),
    })?;
    if repo.head().is_ok() {
        return Ok(());
    }
    let branches: Vec<String> = repo
        .references_glob("refs/heads/*")
        .map(|refs| {
            refs.flatten()
                .filter_map(|r| r.name().ok().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    match branches.as_slice() {
        [only] => repo.set_head(only).map_err(|e| RestoreError::Git {
            what: format!("pointing the store's HEAD at {only}"),
            said: e.to_string(),
        }),
        _ => Err(RestoreError::NoHead {
            url: shown(url),
            branches,
        }),
    }
}

/// The keys the hub signs with must be the root's: a copy from before a root rotation
/// would restore a hub whose every signature devices refuse.
fn check_keys(home: &Home, root: &proto::root::Root) -> Result<(), RestoreError> {
    let not_in = |file: &str, role: &'static str| RestoreError::KeyNotInRoot {
        path: home.dir.join("keys").join(file),
        role,
        version: root.version,
    };
    home.p2p_seed()?;
    let timestamp = home.timestamp_key()?;
    if root.timestamp.key(&timestamp.id()).is_none() {
        return Err(not_in("timestamp.key", "timestamp"));
    }
    if let Ok(k) = home.release_key() {
        if root.release.key(&k.id()).is_none() {
            return Err(not_in("release.key", "release"));
        }
    }
    if let Ok(Some(k)) = home.rollout_key() {
        if root.rollout.key(&k.id()).is_none() {
            return Err(not_in("rollout.key", "rollout"));
        }
    }
    Ok(())
}

fn read_config(path: &Path) -> Result<HubConfig, RestoreError> {
    let text = std::fs::read_to_string(path).map_err(|source| RestoreError::ReadConfig {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| RestoreError::ParseConfig {
        path: path.into(),
        source: Box::new(e),
    })
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

/// Every file of `from` (symlinks followed) into `to`, readable by the owner only.
fn copy_keys(from: &Path, to: &Path) -> Result<(), RestoreError> {
    let keys_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RestoreError::Keys { path, source }
    };
    for entry in std::fs::read_dir(from).map_err(keys_error(from))? {
        let path = entry.map_err(keys_error(from))?.path();
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(keys_error(&path))?;
        let name = path.file_name().unwrap_or_default();
        crate::home::write_secret_text(&to.join(name), &text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed restore removes what it made and nothing else (a mount point's
    /// lost+found stays), and names what failed.
    #[test]
    fn a_failed_restore_leaves_the_directory_as_it_was() {
        let tmp = tempfile::tempdir().unwrap();
        let keys = tmp.path().join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        for k in NEEDED_KEYS {
            std::fs::write(keys.join(k), "not a key").unwrap();
        }
        let home = tmp.path().join("mnt");
        std::fs::create_dir_all(home.join("lost+found")).unwrap();
        let from = tmp.path().join("no-such-mirror.git");
        let args = RestoreArgs {
            from: from.to_str().unwrap(),
            keys: &keys,
            config: None,
            mqtt_listen: "127.0.0.1:1883",
            p2p_listen: "/ip4/127.0.0.1/tcp/4001",
            keep_mirroring: false,
        };
        let err = restore(&home, &args).unwrap_err();
        assert!(
            err.to_string().starts_with("git clone of the store from"),
            "{err}"
        );
        let left: Vec<_> = std::fs::read_dir(&home)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["lost+found"]);
        std::fs::write(home.join("hub.toml"), "").unwrap();
        assert!(matches!(
            restore(&home, &args),
            Err(RestoreError::NotEmpty(_))
        ));
    }
}
