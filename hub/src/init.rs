//! `hub --dir DIR init`: a new hub home.

use crate::home::{new_key, now, write_secret, HubConfig, KeyError, WriteError};
use crate::store::{Change, Event, Store, StoreError};
use proto::root::{Role, Root, TrustedRoot};
use std::path::{Path, PathBuf};

/// Why `hub init` made no hub home (or only part of one).
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{} is already a hub home", .0.display())]
    Exists(PathBuf),
    #[error(transparent)]
    Fleet(#[from] proto::names::BadName),
    #[error(
        "--root needs --timestamp-key (and --release-key, unless releases are co-signed; \
         --rollout-key to pause and halt rollouts)"
    )]
    Flags,
    #[error("reading {}", path.display())]
    ReadRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trust root {}", path.display())]
    Root {
        path: PathBuf,
        #[source]
        source: Box<proto::VerifyError>,
    },
    #[error("{} is not {what}", path.display())]
    NotRootKey { path: PathBuf, what: &'static str },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("copying {} to {}", from.display(), to.display())]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signing the quick-start root")]
    Sign(#[source] proto::codec::CodecError),
    #[error("encoding hub.toml")]
    Config(#[source] toml::ser::Error),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Deploy(#[from] crate::deploy::CreateError),
    #[error(transparent)]
    Pki(#[from] crate::broker::pki::PkiError),
}

type Result<T, E = InitError> = std::result::Result<T, E>;

/// How long a quick-start root lasts. Its root key is on the hub, so `hub root renew`
/// makes the next one in a command; `hub status` warns from 60 days before.
pub const QUICK_START_ROOT_DAYS: u64 = proto::root::DEFAULT_ROOT_DAYS;

#[derive(Debug)]
pub struct InitArgs<'a> {
    pub fleet: &'a str,
    /// A root made offline with `fwtool root init`; absent: quick-start 1-of-1 root.
    pub root: Option<&'a Path>,
    /// The release key matching `root`'s release role.
    pub release_key: Option<&'a Path>,
    /// The timestamp key matching `root`'s timestamp role.
    pub timestamp_key: Option<&'a Path>,
    /// The rollout key matching `root`'s rollout role (absent: the hub cannot pause or
    /// halt releases).
    pub rollout_key: Option<&'a Path>,
    pub mqtt_listen: &'a str,
    /// TLS on the embedded broker on loopback too.
    pub mqtt_tls: bool,
    pub p2p_listen: &'a str,
}

/// Creates the hub home; returns a warning to show when the quick-start root was made.
pub fn init(dir: &Path, args: &InitArgs<'_>) -> Result<Option<String>> {
    if dir.join("hub.toml").exists() {
        return Err(InitError::Exists(dir.into()));
    }
    proto::names::check("fleet", args.fleet)?;
    std::fs::create_dir_all(dir.join("keys")).map_err(|source| WriteError::Create {
        path: dir.into(),
        source,
    })?;
    let (root_bytes, fleet, warning) = match (args.root, args.timestamp_key) {
        (Some(root), Some(timestamp)) => {
            let (bytes, fleet) = offline_root(dir, args, root, timestamp)?;
            (bytes, fleet, None)
        }
        (None, None) if args.release_key.is_none() && args.rollout_key.is_none() => {
            let (bytes, fleet, warning) = quick_start_root(dir, args)?;
            (bytes, fleet, Some(warning))
        }
        _ => return Err(InitError::Flags),
    };
    write_secret(&dir.join("keys/p2p.key"), &new_key()?)?;
    write(&dir.join("root.bin"), &root_bytes)?;
    let mut config = HubConfig::new(&fleet, args.mqtt_listen, args.p2p_listen);
    config.mqtt_tls = args.mqtt_tls.then_some(true);
    let store = Store::init(&dir.join("store.git"))?;
    let mut change = Change::default();
    change.put("root.bin", root_bytes.clone());
    change.put(crate::trust::root_path(1), root_bytes);
    change.event(Event {
        at: now(),
        kind: "init".into(),
        app: None,
        channel: None,
        release: None,
        device: None,
        detail: format!("hub for fleet {fleet} created"),
    });
    store.commit("hub init", &change, None)?;
    crate::deploy::create(dir)?;
    let text = toml::to_string_pretty(&config).map_err(InitError::Config)?;
    write(&dir.join("hub.toml"), text.as_bytes())?;
    // The broker CA's key and broker-ca.pem, for devices to pin.
    crate::broker::pki::BrokerCa::open(&crate::home::Home {
        dir: dir.to_path_buf(),
        config,
    })?;
    // Power-cut safe from the start: what libgit2 wrote without syncing (the
    // repositories' HEAD and config) and the files above reach the disk.
    crate::home::sync_tree(dir)?;
    Ok(warning)
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    std::fs::write(path, bytes).map_err(|source| WriteError::Write {
        path: path.into(),
        source,
    })
}

/// Copies a key given to `hub init` into the home's `keys/`.
fn copy_key(from: &Path, dir: &Path, file: &str) -> Result<()> {
    let to = dir.join("keys").join(file);
    match std::fs::copy(from, &to) {
        Ok(_) => Ok(()),
        Err(source) => Err(InitError::Copy {
            from: from.into(),
            to,
            source,
        }),
    }
}

/// `path`'s key, which `role` of the root must list (`what` it is to the hub).
fn check_key(path: &Path, role: &Role, what: &'static str) -> Result<()> {
    let key = crate::home::read_secret(path)?;
    if role.key(&key.id()).is_none() {
        return Err(InitError::NotRootKey {
            path: path.into(),
            what,
        });
    }
    Ok(())
}

/// A root made offline (`fwtool root init`): checked, and the hub's keys checked against
/// its roles and copied in. Returns its bytes and fleet.
fn offline_root(
    dir: &Path,
    args: &InitArgs<'_>,
    root: &Path,
    timestamp: &Path,
) -> Result<(Vec<u8>, String)> {
    let bytes = std::fs::read(root).map_err(|source| InitError::ReadRoot {
        path: root.into(),
        source,
    })?;
    let trusted = TrustedRoot::bootstrap(&bytes, now()).map_err(|e| InitError::Root {
        path: root.into(),
        source: Box::new(e),
    })?;
    let roles = trusted.root();
    check_key(
        timestamp,
        &roles.timestamp,
        "the root's timestamp key (the hub signs freshness with it)",
    )?;
    copy_key(timestamp, dir, "timestamp.key")?;
    if let Some(key) = args.rollout_key {
        check_key(
            key,
            &roles.rollout,
            "the root's rollout key (the hub holds failing releases with it)",
        )?;
        copy_key(key, dir, "rollout.key")?;
    }
    // A release key is optional: with a release threshold above 1 (or the release
    // keys all offline) releases are held and co-signed (`hub publish --hold`).
    if let Some(key) = args.release_key {
        check_key(key, &roles.release, "one of the root's release keys")?;
        copy_key(key, dir, "release.key")?;
    }
    Ok((bytes, trusted.fleet().to_string()))
}

/// The quick-start root: a 1-of-1 root whose keys are all made here and kept on the hub.
/// Returns its bytes, fleet and the warning to show.
fn quick_start_root(dir: &Path, args: &InitArgs<'_>) -> Result<(Vec<u8>, String, String)> {
    let root_key = new_key()?;
    let release = new_key()?;
    let timestamp = new_key()?;
    let rollout = new_key()?;
    write_secret(&dir.join("keys/root.key"), &root_key)?;
    write_secret(&dir.join("keys/rollout.key"), &rollout)?;
    write_secret(&dir.join("keys/release.key"), &release)?;
    write_secret(&dir.join("keys/timestamp.key"), &timestamp)?;
    let root = Root {
        fleet: args.fleet.into(),
        version: 1,
        expires_at: now() + QUICK_START_ROOT_DAYS * 24 * 3600,
        root: Role {
            keys: vec![root_key.public()],
            threshold: 1,
        },
        release: Role {
            keys: vec![release.public()],
            threshold: 1,
        },
        timestamp: Role {
            keys: vec![timestamp.public()],
            threshold: 1,
        },
        rollout: Role {
            keys: vec![rollout.public()],
            threshold: 1,
        },
    };
    let signed = root.seal().and_then(|mut env| {
        env.sign(&root_key)?;
        env.encode()
    });
    let signed = signed.map_err(InitError::Sign)?;
    let warning = format!(
        "quick start: generated a 1-of-1 trust root whose root key is stored on the hub \
         ({}). For production, create the root offline with `fwtool root init` (k-of-n \
         root keys kept off this machine) and pass --root and --release-key.",
        dir.join("keys/root.key").display()
    );
    Ok((signed, args.fleet.to_string(), warning))
}
