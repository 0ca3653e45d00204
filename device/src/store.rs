//! The device's state directory: one owner (the agent), crash-safe by construction.
//!
//! ```text
//! chunks/<hex>        verified chunks, content addressed (written temp + rename)
//! manifests/<hex>     signed manifest envelopes, by digest
//! slots/<app>-<n>.img assembled images (written, fsynced, renamed into place)
//! state.json          per app: current and pending release, the previous one, releases
//!                     that failed and are never retried (written temp+fsync+rename+fsync dir)
//! root.bin            the newest trust root accepted
//! ```
//!
//! A kill -9 at any instant leaves `state.json` old or new, never torn; a slot is named in
//! `state.json` only after it is complete and fsynced; chunks are re-verified when read.

use proto::codec::Kind;
use proto::envelope::Envelope;
use proto::manifest::{ImageVerifier, Manifest};
use proto::targeted::Targeted;
use proto::Digest;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One installed release of an app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub release: u64,
    pub version: String,
    pub manifest: Digest,
    pub slot: PathBuf,
    /// The accelerator measured for it (`domain_type = "auto"`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<crate::accel::Accel>,
}

/// What the device knows about one app.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppState {
    /// Running and proven healthy.
    pub current: Option<Installed>,
    /// Installed (slot complete) but not yet proven healthy; activated on start.
    pub pending: Option<Installed>,
    /// The release `current` replaced, kept for rollback.
    pub previous: Option<Installed>,
    /// Releases that failed their health probe: never retried.
    pub failed: BTreeSet<u64>,
    /// Highest release number ever accepted (rollback protection survives rollbacks).
    pub highest_seen: u64,
}

/// The named transitions of one app's state: the only ways the installer and the
/// supervisor change it (through [`Store::update_app`], which writes it crash-safely).
impl AppState {
    /// `new` is assembled and about to be activated; a restart finishes it.
    pub fn installed(&mut self, new: Installed) {
        self.highest_seen = self.highest_seen.max(new.release);
        self.pending = Some(new);
    }

    /// `new` proved healthy: it is current, and the release it replaced (if another) is
    /// kept for rollback. Returns that release.
    pub fn activated(&mut self, new: Installed) -> Option<Installed> {
        let old = self.current.take().filter(|o| o.release != new.release);
        self.previous = old.clone();
        self.current = Some(new);
        self.pending = None;
        old
    }

    /// `release` failed its probe: never tried again; what runs stays as it was.
    pub fn activation_failed(&mut self, release: u64) {
        self.failed.insert(release);
        self.pending = None;
    }

    /// The current release keeps dying: it is marked failed and the previous one (if
    /// any) becomes current. Returns (the failed release, the one now current).
    pub fn gave_up(&mut self) -> Option<(Installed, Option<Installed>)> {
        let failed = self.current.clone()?;
        self.failed.insert(failed.release);
        let back = self.previous.take();
        if let Some(prev) = &back {
            self.current = Some(prev.clone());
        }
        Some((failed, back))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub apps: BTreeMap<String, AppState>,
    /// Monotonic counter for status reports.
    pub report_seq: u64,
}

/// Why [`Store::assemble`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// Stored chunks' bytes are not what their digests say (they were removed).
    #[error(
        "{count} stored chunk(s) damaged, the first {} (removed; they will be fetched again)",
        first.short()
    )]
    DamagedChunks {
        first: Digest,
        count: u64,
        #[source]
        source: proto::VerifyError,
    },
    #[error("assembled image does not match the manifest")]
    Image(#[source] proto::VerifyError),
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why the state directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding {}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} is not a file in a directory", .0.display())]
    NotAFile(PathBuf),
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// `op` on `path` failed: the error to return.
fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

impl State {
    /// `state.json`'s bytes, as [`Store::load_state`] reads them.
    pub fn parse(bytes: &[u8]) -> Result<State, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// What [`Store::targeted`] last made; `None` once a manifest was written or removed
    /// through this store (the agent's one owner of its files), so it is made again.
    targeted: std::sync::Mutex<Option<Arc<Targeted>>>,
}

/// Writes `bytes` to `path` via a temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(StoreError::NotAFile(path.into()));
    };
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let mut f = File::create(&tmp).map_err(io("creating", &tmp))?;
    f.write_all(bytes).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io("renaming into", path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        for sub in ["chunks", "manifests", "slots"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(io("creating", &path))?;
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            targeted: Default::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn chunk_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("chunks").join(d.to_hex())
    }

    fn manifest_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("manifests").join(d.to_hex())
    }

    pub fn has_chunk(&self, d: &Digest) -> bool {
        self.chunk_path(d).exists()
    }

    /// Stores a chunk the caller has verified. Temp + rename: never a partial chunk, and
    /// no temporary file left behind when the write fails (a full disk stays full
    /// otherwise).
    pub fn put_chunk(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        let path = self.chunk_path(d);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = fs::write(&tmp, bytes)
            .map_err(io("writing", &tmp))
            .and_then(|()| fs::rename(&tmp, &path).map_err(io("renaming", &path)));
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }

    /// Bytes free for the store on its file system (`None` if it cannot be asked).
    pub fn free_bytes(&self) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(&self.dir).ok()?;
        // Both are the C `unsigned long`: u64 here, u32 on 32-bit ARM.
        #[allow(clippy::useless_conversion)]
        let (blocks, size) = (
            u64::from(st.blocks_available()),
            u64::from(st.fragment_size()),
        );
        Some(blocks.saturating_mul(size))
    }

    /// Bytes the store holds in chunks, manifests and image slots.
    pub fn usage(&self) -> u64 {
        ["chunks", "manifests", "slots"]
            .iter()
            .filter_map(|sub| fs::read_dir(self.dir.join(sub)).ok())
            .flat_map(|entries| entries.flatten())
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    /// Bytes of `m`'s distinct chunks not stored here yet.
    pub fn missing_bytes(&self, m: &Manifest) -> u64 {
        let mut seen = BTreeSet::new();
        m.chunks
            .iter()
            .filter(|c| seen.insert(c.digest) && !self.has_chunk(&c.digest))
            .map(|c| c.size)
            .sum()
    }

    /// Checks each stored chunk of `chunks` against its digest and size and removes those
    /// that do not match; returns how many were removed.
    fn remove_damaged(&self, chunks: &[proto::manifest::ChunkRef]) -> u64 {
        let mut removed = 0;
        for c in chunks {
            let path = self.chunk_path(&c.digest);
            let Ok(bytes) = fs::read(&path) else { continue };
            if bytes.len() as u64 != c.size || Digest::of(&bytes) != c.digest {
                tracing::warn!(path = %path.display(), "stored chunk is damaged; removing it");
                let _ = fs::remove_file(&path);
                removed += 1;
            }
        }
        removed
    }

    /// Removes every chunk and manifest not in `keep` (and temporary files a killed
    /// process left): what no kept release needs. Returns how many files and bytes went.
    pub fn remove_unneeded(&self, keep: &BTreeSet<Digest>) -> (u64, u64) {
        let (mut files, mut bytes) = (0, 0);
        for sub in ["chunks", "manifests"] {
            let Ok(entries) = fs::read_dir(self.dir.join(sub)) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let needed = name
                    .to_str()
                    .and_then(|n| n.parse::<Digest>().ok())
                    .is_some_and(|d| keep.contains(&d));
                if needed {
                    continue;
                }
                let len = e.metadata().map_or(0, |m| m.len());
                if fs::remove_file(e.path()).is_ok() {
                    files += 1;
                    bytes += len;
                }
            }
        }
        self.manifests_changed();
        (files, bytes)
    }

    /// A blob (chunk or manifest) by digest, re-verified: a damaged file is deleted and
    /// reported missing, so it is fetched again.
    pub fn get_blob(&self, d: &Digest) -> Option<Vec<u8>> {
        for path in [self.chunk_path(d), self.manifest_path(d)] {
            if let Ok(bytes) = fs::read(&path) {
                if Digest::of(&bytes) == *d {
                    return Some(bytes);
                }
                tracing::warn!(path = %path.display(), "stored blob is damaged; removing it");
                let _ = fs::remove_file(&path);
                self.manifests_changed();
            }
        }
        None
    }

    pub fn put_manifest(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        let written = write_atomic(&self.manifest_path(d), bytes);
        self.manifests_changed();
        written
    }

    fn manifests_changed(&self) {
        *self.targeted.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The chunks this device may serve only to the devices their releases target, from
    /// the manifests it holds (verified when they were fetched; read again only after
    /// one was written or removed, not per chunk served).
    pub fn targeted(&self) -> Arc<Targeted> {
        let mut cached = self.targeted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(targeted) = cached.as_ref() {
            return targeted.clone();
        }
        let dir = self.dir.join("manifests");
        let names: Vec<_> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        let manifests: Vec<Manifest> = names
            .iter()
            .filter_map(|n| fs::read(dir.join(n)).ok())
            .filter_map(|bytes| {
                let env = Envelope::decode(&bytes, Kind::Manifest).ok()?;
                proto::codec::decode(Kind::Manifest, &env.payload).ok()
            })
            .collect();
        let targeted = Arc::new(Targeted::of(&manifests));
        // One unreadable (being written, or going): read them all again next time rather
        // than keep a set that lacks it.
        if manifests.len() == names.len() {
            *cached = Some(targeted.clone());
        }
        targeted
    }

    /// Assembles the image from stored chunks into its slot, verifying every chunk and the
    /// whole image on the way, fsyncs, and renames it into place. On any failure the
    /// partial slot is removed; a stored chunk whose bytes are wrong is removed too
    /// ([`AssembleError::DamagedChunks`]), so fetching again repairs the release.
    pub fn assemble(&self, m: &Manifest) -> Result<PathBuf, AssembleError> {
        let slot = self
            .dir
            .join("slots")
            .join(format!("{}-{}.img", m.app, m.release));
        let tmp = slot.with_extension("img.partial");
        let assembled = self.assemble_into(m, &tmp, &slot);
        if assembled.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        assembled.map(|()| slot)
    }

    fn assemble_into(&self, m: &Manifest, tmp: &Path, slot: &Path) -> Result<(), AssembleError> {
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| AssembleError::Io { op, path, source }
        };
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)
            .map_err(io("creating", tmp))?;
        let mut verifier = ImageVerifier::new(m);
        for (i, c) in m.chunks.iter().enumerate() {
            let path = self.chunk_path(&c.digest);
            let mut data = Vec::with_capacity(c.size as usize);
            File::open(&path)
                .and_then(|f| f.take(c.size + 1).read_to_end(&mut data))
                .map_err(io("reading chunk", &path))?;
            if let Err(source) = verifier.push(&data) {
                // One damaged file rarely comes alone (a bad sector, a torn copy): find
                // them all now, so one fetch repairs the release.
                let damaged = self.remove_damaged(&m.chunks[i..]);
                return Err(AssembleError::DamagedChunks {
                    first: c.digest,
                    count: damaged.max(1),
                    source,
                });
            }
            out.write_all(&data).map_err(io("writing", tmp))?;
        }
        verifier.finish().map_err(AssembleError::Image)?;
        out.sync_all().map_err(io("syncing", tmp))?;
        drop(out);
        fs::rename(tmp, slot).map_err(io("renaming into place", slot))?;
        let slots = self.dir.join("slots");
        File::open(&slots)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing", &slots))?;
        Ok(())
    }

    pub fn load_state(&self) -> Result<State> {
        let path = self.dir.join("state.json");
        match fs::read(&path) {
            Ok(bytes) => State::parse(&bytes).map_err(|source| StoreError::Parse { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(source) => Err(StoreError::Io {
                op: "reading",
                path,
                source,
            }),
        }
    }

    /// Loads the state, applies `change` to `app`'s and writes it back (write-temp, fsync,
    /// rename); returns what `change` returned and the new state. Blocking: call it off
    /// the async runtime.
    pub fn update_app<T>(
        &self,
        app: &str,
        change: impl FnOnce(&mut AppState) -> T,
    ) -> Result<(T, State)> {
        let mut state = self.load_state()?;
        let out = change(state.apps.entry(app.to_string()).or_default());
        self.save_state(&state)?;
        Ok((out, state))
    }

    pub fn save_state(&self, state: &State) -> Result<()> {
        let path = self.dir.join("state.json");
        match serde_json::to_vec_pretty(state) {
            Ok(bytes) => write_atomic(&path, &bytes),
            Err(source) => Err(StoreError::Encode { path, source }),
        }
    }

    /// Removes slots no longer named by the state (old releases, partial files).
    pub fn prune_slots(&self, state: &State) {
        let keep: BTreeSet<PathBuf> = state
            .apps
            .values()
            .flat_map(|a| [a.current.as_ref(), a.pending.as_ref(), a.previous.as_ref()])
            .flatten()
            .map(|i| i.slot.clone())
            .collect();
        if let Ok(entries) = fs::read_dir(self.dir.join("slots")) {
            for e in entries.flatten() {
                if !keep.contains(&e.path()) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(release: u64) -> Installed {
        Installed {
            release,
            version: format!("1.0.{release}"),
            manifest: Digest::of(&release.to_le_bytes()),
            slot: format!("/slots/{release}").into(),
            accel: None,
        }
    }

    #[test]
    fn an_apps_state_moves_only_by_its_named_transitions() {
        let mut a = AppState::default();
        a.installed(inst(1));
        assert_eq!((a.pending.clone(), a.highest_seen), (Some(inst(1)), 1));
        assert_eq!(a.activated(inst(1)), None, "nothing ran before");
        a.installed(inst(2));
        assert_eq!(a.activated(inst(2)), Some(inst(1)));
        assert_eq!(
            (a.current.clone(), a.previous.clone()),
            (Some(inst(2)), Some(inst(1)))
        );
        a.installed(inst(3));
        a.activation_failed(3);
        assert_eq!(
            (a.current.clone(), a.pending.clone()),
            (Some(inst(2)), None)
        );
        assert!(a.failed.contains(&3) && a.highest_seen == 3);
        assert_eq!(a.gave_up(), Some((inst(2), Some(inst(1)))));
        assert_eq!(
            (a.current.clone(), a.previous.clone()),
            (Some(inst(1)), None)
        );
        assert_eq!(
            a.gave_up(),
            Some((inst(1), None)),
            "nothing earlier: it stays"
        );
        assert_eq!(a.current, Some(inst(1)));
        assert!(a.failed.contains(&1) && a.failed.contains(&2));
    }

    #[test]
    fn a_transition_is_written_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (old, state) = store.update_app("hello", |a| a.activated(inst(4))).unwrap();
        assert_eq!(old, None);
        assert_eq!(store.load_state().unwrap(), state);
        assert_eq!(state.apps["hello"].current, Some(inst(4)));
    }
}
