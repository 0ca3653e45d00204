//! The hub's home directory: `hub.toml`, keys, trust root, the git store and the deploy
//! repository.

use crate::store::{Store, StoreError};
use proto::root::TrustedRoot;
use proto::SecretKey;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    pub fleet: String,
    /// Embedded MQTT broker listen address (used unless `broker` is set).
    #[serde(default = "default_mqtt")]
    pub mqtt_listen: String,
    /// TLS on the embedded broker, client certificates from the fleet's broker CA
    /// required (`broker-ca.pem`). Absent: on whenever `mqtt_listen` is beyond loopback
    /// (plaintext is only ever served on loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_tls: Option<bool>,
    /// External broker `mqtt://host:port`, or `mqtts://host:port` with TLS (the hub
    /// shows a client certificate of its CA: `hub broker-config --mosquitto`), instead of
    /// the embedded one.
    #[serde(default)]
    pub broker: Option<String>,
    #[serde(default = "default_p2p")]
    pub p2p_listen: String,
    /// Prometheus metrics address; absent: off.
    #[serde(default)]
    pub metrics: Option<String>,
    /// How long an announcement stays fresh, seconds (default 7 days). A running hub
    /// re-signs each one when half of this has passed; a hub down for longer lets them
    /// lapse and devices refuse new stale pointers until it is back.
    #[serde(default = "default_freshness")]
    pub freshness_secs: u64,
    /// No longer used: manifests do not expire (freshness is the announcement's). Read so
    /// an older hub.toml still parses.
    #[serde(default, skip_serializing)]
    pub release_expiry_days: Option<u64>,
    /// Serve blobs to devices that are not enrolled (images are then as public as the
    /// hub's address). Revoked devices are refused either way. `hub init` writes false;
    /// a hub.toml from before that without the key reads true, as it always did.
    #[serde(default = "default_true")]
    pub serve_unenrolled: bool,
    /// Upload limit for blobs served to devices, bytes per second (0 = unlimited).
    #[serde(default)]
    pub upload_rate: u64,
    /// Send each chunk to about one device and point the others at peers that have it
    /// (devices that cannot use peers are always served). Off: serve every request.
    #[serde(default = "default_true")]
    pub redirect: bool,
    /// The largest image `hub publish` accepts, MiB (unikernels are small; a multi-GiB
    /// file is more likely the wrong file).
    #[serde(default = "default_max_image_mib")]
    pub max_image_mib: u64,
    /// Be a circuit relay for devices behind NAT: they reserve a slot, peers in other
    /// homes reach them through it and punch a direct connection (DCUtR). Circuits carry
    /// signalling only; chunks never cross the relay.
    #[serde(default = "default_true")]
    pub relay: bool,
    /// The dashboard and JSON API (`127.0.0.1:8080`); absent: off. Changes need the
    /// token in `keys/http.token`.
    #[serde(default)]
    pub http: Option<String>,
    /// Git remotes the store and the deploy repository are pushed to after every change
    /// (`hub mirror add`; `hub restore` builds a hub from one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<String>,
}

impl HubConfig {
    /// The defaults, listening where given.
    pub fn new(fleet: &str, mqtt_listen: &str, p2p_listen: &str) -> HubConfig {
        HubConfig {
            fleet: fleet.into(),
            mqtt_listen: mqtt_listen.into(),
            mqtt_tls: None,
            broker: None,
            p2p_listen: p2p_listen.into(),
            metrics: None,
            freshness_secs: default_freshness(),
            release_expiry_days: None,
            // New hubs serve enrolled devices only (`serve_unenrolled = true` opens them
            // up); a hub.toml without the key keeps the old default below.
            serve_unenrolled: false,
            upload_rate: 0,
            redirect: true,
            max_image_mib: default_max_image_mib(),
            relay: true,
            http: None,
            mirrors: vec![],
        }
    }
}

pub(crate) fn default_max_image_mib() -> u64 {
    1024
}

fn default_true() -> bool {
    true
}

fn default_mqtt() -> String {
    "127.0.0.1:1883".into()
}
fn default_p2p() -> String {
    "/ip4/127.0.0.1/tcp/4001".into()
}
pub(crate) fn default_freshness() -> u64 {
    7 * 24 * 3600
}

#[derive(Debug, Clone)]
pub struct Home {
    pub dir: PathBuf,
    pub config: HubConfig,
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a file in the hub's home could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("creating {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("replacing {}", path.display())]
    Replace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding {}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Why a key could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading key {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key {} is readable by others; chmod 600 it", path.display())]
    Exposed { path: PathBuf },
    #[error("reading key {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: proto::keys::KeyTextError,
    },
    // getrandom's error is not always a std error (its `std` feature): named, not chained.
    #[error("reading OS randomness: {0}")]
    Random(getrandom::Error),
}

/// Why the hub's home (its config, keys, trust root or store) could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error(
        "reading {} (create a hub there with `hub --dir {} init`)",
        path.display(),
        dir.display()
    )]
    ReadConfig {
        path: PathBuf,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {}", path.display())]
    ParseConfig {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("moving the releases of {} into platform directories", path.display())]
    UpgradeLayout {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error(
        "{} is missing: this hub home predates the timestamp role. Make a key \
         (`fwtool keygen`), rotate the root to list it as the timestamp key \
         (`fwtool root rotate --timestamp-key`), and `hub root publish` it",
        path.display()
    )]
    NoTimestampKey { path: PathBuf },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("reading {}", path.display())]
    ReadRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the hub's trust root {}", path.display())]
    Root {
        path: PathBuf,
        #[source]
        source: Box<proto::VerifyError>,
    },
    /// Nothing is signed under an expired root (devices would refuse it).
    #[error(transparent)]
    RootExpired(RootExpiry),
}

/// How far ahead `hub status` and `hub serve` warn of a root's expiry.
pub const WARN_AHEAD: u64 = 60 * 24 * 3600;

/// A trust root expired, or expiring within [`WARN_AHEAD`], as of `now`: its message
/// says when and the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub struct RootExpiry {
    pub version: u64,
    pub expires_at: u64,
    pub now: u64,
}

impl RootExpiry {
    /// `None` while the root has more than [`WARN_AHEAD`] left.
    pub fn of(root: &proto::root::Root, now: u64) -> Option<RootExpiry> {
        (root.expires_at.saturating_sub(now) < WARN_AHEAD).then_some(RootExpiry {
            version: root.version,
            expires_at: root.expires_at,
            now,
        })
    }
}

impl std::fmt::Display for RootExpiry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (when, ago) = (
            human_time(self.expires_at),
            proto::status::human_ago(self.expires_at, self.now),
        );
        let version = self.version;
        if self.expires_at <= self.now {
            write!(
                f,
                "the trust root (version {version}) expired on {when} ({ago}): devices refuse \
                 every update, and the hub announces nothing until it has the next root"
            )?;
        } else {
            write!(
                f,
                "the trust root (version {version}) expires on {when}, {ago}: devices then \
                 refuse every update"
            )?;
        }
        f.write_str(
            ". Make the next one with `fwtool root rotate` (signed by the root keys) and \
             `hub root publish` it",
        )
    }
}

/// A Unix time as an RFC 3339 date for people.
pub fn human_time(at: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(at))
        .to_string()
}

pub fn write_secret(path: &Path, key: &SecretKey) -> Result<(), WriteError> {
    write_secret_text(path, &key.to_text())
}

/// Creates `path` (it must not exist) readable by its owner only, with `text`.
pub fn write_secret_text(path: &Path, text: &str) -> Result<(), WriteError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| WriteError::Create {
            path: path.into(),
            source,
        })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|source| WriteError::Write {
            path: path.into(),
            source,
        })
}

/// Replaces a key file atomically (mode 0600 from the start).
pub fn replace_secret(path: &Path, key: &SecretKey) -> Result<(), WriteError> {
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    write_secret(&tmp, key)?;
    std::fs::rename(&tmp, path).map_err(|source| WriteError::Replace {
        path: path.into(),
        source,
    })
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| WriteError::Create {
            path: dir.into(),
            source,
        })?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|source| WriteError::Create {
        path: tmp.clone(),
        source,
    })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|source| WriteError::Write {
            path: tmp.clone(),
            source,
        })?;
    std::fs::rename(&tmp, path).map_err(|source| WriteError::Replace {
        path: path.into(),
        source,
    })?;
    // The rename itself reaches the disk only with its directory.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| WriteError::Write {
            path: dir.into(),
            source,
        })
}

/// Syncs every file and directory under `path` to disk: for what a tool wrote without
/// syncing (libgit2's `init`, `git clone`), before the home is used. For small trees: a
/// new home, a restored one.
pub fn sync_tree(path: &Path) -> Result<(), WriteError> {
    let sync = |p: &Path| {
        std::fs::File::open(p)
            .and_then(|f| f.sync_all())
            .map_err(|source| WriteError::Write {
                path: p.into(),
                source,
            })
    };
    let entries = std::fs::read_dir(path).map_err(|source| WriteError::Write {
        path: path.into(),
        source,
    })?;
    for entry in entries.flatten() {
        match entry.file_type() {
            Ok(t) if t.is_dir() => sync_tree(&entry.path())?,
            Ok(t) if t.is_file() => sync(&entry.path())?,
            _ => {}
        }
    }
    sync(path)
}

pub fn new_key() -> Result<SecretKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(KeyError::Random)?;
    Ok(SecretKey::from_seed(seed))
}

impl Home {
    pub fn open(dir: &Path) -> Result<Home, HomeError> {
        let path = dir.join("hub.toml");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(source) => {
                let dir = dir.into();
                return Err(HomeError::ReadConfig { path, dir, source });
            }
        };
        let config: HubConfig = match toml::from_str(&text) {
            Ok(config) => config,
            Err(e) => {
                let source = Box::new(e);
                return Err(HomeError::ParseConfig { path, source });
            }
        };
        Ok(Home {
            dir: dir.to_path_buf(),
            config,
        })
    }

    /// The git store, its layout brought up to date first (a store from before platform
    /// directories has its releases moved into them, once, in one commit).
    pub fn store(&self) -> Result<Store, HomeError> {
        let path = self.dir.join("store.git");
        let store = Store::open(&path)?;
        store.sync_writes()?;
        let moved = store
            .upgrade_layout()
            .map_err(|source| HomeError::UpgradeLayout { path, source })?;
        if moved > 0 {
            tracing::info!("moved {moved} release file(s) into platform directories");
        }
        Ok(store)
    }

    pub fn release_key(&self) -> Result<SecretKey, KeyError> {
        read_secret(&self.dir.join("keys/release.key"))
    }

    /// The hub's online timestamp key: it signs announcements and the revocation list.
    pub fn timestamp_key(&self) -> Result<SecretKey, HomeError> {
        let path = self.dir.join("keys/timestamp.key");
        if !path.exists() {
            return Err(HomeError::NoTimestampKey { path });
        }
        Ok(read_secret(&path)?)
    }

    /// The hub's online rollout key: it signs the list of held releases, nothing else.
    /// `None`: this hub cannot hold releases (its root names a rollout key kept elsewhere,
    /// or the key was not given to `hub init`).
    pub fn rollout_key(&self) -> Result<Option<SecretKey>, KeyError> {
        let path = self.dir.join("keys/rollout.key");
        if !path.exists() {
            return Ok(None);
        }
        read_secret(&path).map(Some)
    }

    /// The hub's libp2p identity seed (a key of its own, so its peer id is stable).
    pub fn p2p_seed(&self) -> Result<[u8; 32], KeyError> {
        Ok(read_secret(&self.dir.join("keys/p2p.key"))?.seed())
    }

    pub fn root_bytes(&self) -> Result<Vec<u8>, HomeError> {
        let path = self.dir.join("root.bin");
        std::fs::read(&path).map_err(|source| HomeError::ReadRoot { path, source })
    }

    /// The hub's root even if it has expired (anchored at its last valid second): the
    /// root a rotation must follow, however late it comes.
    pub fn anchor_root(&self) -> Result<TrustedRoot, HomeError> {
        let bytes = self.root_bytes()?;
        let anchored = proto::envelope::Envelope::decode(&bytes, proto::codec::Kind::Root)
            .and_then(|env| {
                let claimed: proto::root::Root =
                    proto::codec::decode(proto::codec::Kind::Root, &env.payload)?;
                TrustedRoot::bootstrap(&bytes, now().min(claimed.expires_at.saturating_sub(1)))
            });
        anchored.map_err(|source| self.bad_root(source))
    }

    /// The hub's root, refused once it has expired (what signing needs).
    pub fn trusted_root(&self) -> Result<TrustedRoot, HomeError> {
        let root = self.anchor_root()?;
        let now = now();
        if let Some(expired) = RootExpiry::of(root.root(), now).filter(|e| e.expires_at <= now) {
            return Err(HomeError::RootExpired(expired));
        }
        TrustedRoot::bootstrap(&self.root_bytes()?, now).map_err(|source| self.bad_root(source))
    }

    fn bad_root(&self, source: proto::VerifyError) -> HomeError {
        let path = self.dir.join("root.bin");
        let source = Box::new(source);
        HomeError::Root { path, source }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("hub.sock")
    }

    pub fn inventory_path(&self) -> PathBuf {
        self.dir.join("inventory.json")
    }
}

pub fn read_secret(path: &Path) -> Result<SecretKey, KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let unreadable = |source| KeyError::Read {
        path: path.into(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(KeyError::Exposed { path: path.into() });
    }
    let text = std::fs::read_to_string(path).map_err(unreadable)?;
    SecretKey::from_text(&text).map_err(|source| KeyError::Parse {
        path: path.into(),
        source,
    })
}
