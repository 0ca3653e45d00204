//! The hub's state: one bare git repository (git2). Releases are commits and tags, events
//! are appended to a log file in the same history, so `git clone` / `git log` work on it
//! and a mirror is one `git push` away.
//!
//! Tree layout:
//! ```text
//! root.bin                                   the newest trust root
//! roots/<version>.bin                         every root link, for devices catching up
//! revocations.bin                             the signed revocation list (timestamp key)
//! revoked/<name>.pub                          keys of revoked devices
//! held/<app>-<release>.held                   releases held for co-signing (`publish --hold`)
//! blobs/<hex>                                 chunks and signed manifests, by BLAKE3 digest
//! apps/<app>/<channel>/<platform>/<release>.manifest      signed manifest (release: 10 digits)
//! apps/<app>/<channel>/<platform>/<release>.announcement  signed announcement of it
//! apps/<app>/<channel>/<platform>/<release>.staging       staging evidence (report bytes)
//! provenance/<hex>                            build logs and SBOMs that manifests name, by digest
//! devices/<name>.pub                          enrolled device keys
//! events/<YYYY-MM-DD>.log                     one JSON event per line, one file per UTC day
//! events.log                                  the same, as stores before day files kept them
//! ```
//!
//! A release number is one per (app, channel) and may hold a manifest for each of several
//! platforms (a mixed-arch release, one commit); each platform's directory is a *track*
//! whose newest release is announced. Stores from before platforms had directories
//! (`apps/<app>/<channel>/<release>.<ext>`) are moved into them by
//! [`Store::upgrade_layout`].
//!
//! A commit rewrites only the day file its events fall in, so its cost is bounded by a
//! day's events, not by the whole history (one log file grew with every commit, and each
//! commit rewrote all of it).
//!
//! Every change is one commit built from HEAD's tree in memory and made the new HEAD
//! only when complete: a crash at any point leaves the previous commit as HEAD (plus
//! unreferenced objects). A release's manifest, signatures, chunks and announcement land
//! in one commit, so the store never holds a release without its signatures.

mod write;

use git2::{Oid, Repository, Signature};
use proto::announcement::Track;
use proto::manifest::Platform;
use proto::Digest;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a store operation failed at.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("creating git store {}", path.display())]
    Init {
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("opening git store {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    /// Reading the repository at HEAD.
    #[error(transparent)]
    Read(#[from] git2::Error),
    #[error("{0} vanished while listed")]
    Vanished(String),
    /// A manifest stored before platform directories that names no platform readably.
    #[error("reading the platform of {path}")]
    StoredPlatform {
        path: String,
        #[source]
        source: Box<proto::VerifyError>,
    },
    #[error("writing a blob to {}", path.display())]
    WriteBlob {
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("committing to the git store {}", path.display())]
    Commit {
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error(
        "committing {message:?} to the git store {}: HEAD stayed locked or kept moving for \
         {attempts} attempts; is another git command writing to it?",
        path.display()
    )]
    Contended {
        message: String,
        path: PathBuf,
        attempts: u32,
    },
    #[error("opening the writer lock {}", path.display())]
    OpenLock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("taking the writer lock {}", path.display())]
    TakeLock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running git gc")]
    GcSpawn(#[source] std::io::Error),
    #[error("git gc --auto on {}: {stderr}", path.display())]
    Gc { path: PathBuf, stderr: String },
}

/// Why a signed list the store keeps (the revocation list, the hold list) could not be
/// read.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the stored {what} does not verify against the hub's root")]
    Unverified {
        what: &'static str,
        #[source]
        source: Box<proto::VerifyError>,
    },
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The file in the git directory whose advisory lock serialises the hub's writers.
pub const WRITER_LOCK: &str = "unifleet-writer.lock";
/// Age past which a git ref lock file is taken to be left by a killed writer.
pub const STALE_REF_LOCK: Duration = Duration::from_secs(10);
/// How often a commit is retried when another git tool holds or moves HEAD (about 4 s).
const COMMIT_ATTEMPTS: u32 = 15;

/// One line of `events.log`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    pub at: u64,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    pub detail: String,
}

/// A track and its newest release number.
pub type Newest = (Track, u64);

/// One platform's manifest of a release, as listed by `hub releases`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReleaseInfo {
    #[serde(flatten)]
    pub track: Track,
    pub release: u64,
    pub manifest: Digest,
}

pub struct Store {
    repo: Repository,
}

/// A blob written to the object database and not yet part of any commit (until one names
/// it, `git gc` may prune it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrittenBlob {
    id: Oid,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.repo.path().display())
    }
}

/// The platform a stored signed manifest names (the hub's own store: read, not verified).
fn stored_platform(bytes: &[u8]) -> Result<Platform, proto::VerifyError> {
    use proto::codec::Kind;
    let env = proto::envelope::Envelope::decode(bytes, Kind::Manifest)?;
    let m: proto::manifest::Manifest = proto::codec::decode(Kind::Manifest, &env.payload)?;
    Ok(m.platform)
}

/// The day file an event at `at` (Unix seconds) goes to: `events/YYYY-MM-DD.log` (UTC).
pub fn event_file(at: u64) -> String {
    let (y, m, d) = proto::status::civil_date((at / 86_400) as i64);
    format!("events/{y:04}-{m:02}-{d:02}.log")
}

/// Where root `version` is kept in the store.
pub fn root_path(version: u64) -> String {
    format!("roots/{version}.bin")
}

/// The store's root link of `version` (stores from before the chain kept only v1, as
/// `root.bin`).
pub fn root_link(store: &Store, version: u64) -> Result<Option<Vec<u8>>> {
    if let Some(bytes) = store.read(&root_path(version))? {
        return Ok(Some(bytes));
    }
    let first = store.read("root.bin")?;
    Ok(first.filter(|b| unverified_root(b).is_some_and(|r| r.version == version)))
}

fn unverified_root(bytes: &[u8]) -> Option<proto::root::Root> {
    use proto::codec::Kind;
    let env = proto::envelope::Envelope::decode(bytes, Kind::Root).ok()?;
    proto::codec::decode(Kind::Root, &env.payload).ok()
}

/// Where a file (`manifest`, `announcement`, `staging`) of release `release` on `track`
/// is kept.
pub fn release_path(track: &Track, release: u64, ext: &str) -> String {
    format!("{}/{release:010}.{ext}", track_dir(track))
}

fn track_dir(t: &Track) -> String {
    format!("apps/{}/{}/{}", t.app, t.channel, t.platform)
}

/// The release number of a `<release>.manifest` file name.
fn manifest_number(file: &str) -> Option<u64> {
    file.strip_suffix(".manifest")?.parse().ok()
}

/// A file of a [`Change`]: bytes still to write, or a blob already in the object database
/// ([`Store::write_blob`]: an image's chunks are written as they are read, so a publish
/// holds none of them in memory).
#[derive(Debug, Clone)]
enum Content {
    Bytes(Vec<u8>),
    Written(Oid),
    Removed,
}

/// A set of changes to commit together.
#[derive(Debug, Default, Clone)]
pub struct Change {
    files: Vec<(String, Content)>,
    events: Vec<Event>,
}

/// What one [`Store::transaction`] commits.
#[derive(Debug)]
pub struct Commit {
    pub message: String,
    pub change: Change,
    /// A lightweight tag on the new commit (kept if it already exists).
    pub tag: Option<String>,
}

impl Change {
    pub fn put(&mut self, path: impl Into<String>, bytes: Vec<u8>) {
        self.files.push((path.into(), Content::Bytes(bytes)));
    }
    /// A file whose bytes [`Store::write_blob`] wrote already.
    pub fn put_written(&mut self, path: impl Into<String>, blob: WrittenBlob) {
        self.files.push((path.into(), Content::Written(blob.id)));
    }
    /// Takes `path` out of the tree (a file; its directory goes when it is left empty).
    pub fn remove(&mut self, path: impl Into<String>) {
        self.files.push((path.into(), Content::Removed));
    }

    /// Adds every file and event of `other`.
    pub fn extend(&mut self, other: Change) {
        self.files.extend(other.files);
        self.events.extend(other.events);
    }
    pub fn event(&mut self, e: Event) {
        self.events.push(e);
    }
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.events.is_empty()
    }
}

impl Store {
    pub fn init(path: &Path) -> Result<Store> {
        let repo = Repository::init_bare(path).map_err(|source| StoreError::Init {
            path: path.to_path_buf(),
            source,
        })?;
        let store = Store { repo };
        store.sync_writes()?;
        Ok(store)
    }

    /// Makes every object and ref written to the store reach the disk before the write
    /// returns (libgit2 and git do not fsync by default: a power cut could leave a ref
    /// naming an object that was never written). `core.fsyncObjectFiles` is libgit2's
    /// switch (objects and refs); `core.fsync` the git client's (`git gc`'s packs and
    /// refs). Set once; a store from before is brought up to it when opened through
    /// [`crate::home::Home::store`].
    pub fn sync_writes(&self) -> Result<()> {
        let mut config = self.repo.config()?;
        if config.get_bool("core.fsyncObjectFiles").unwrap_or(false) {
            return Ok(());
        }
        config.set_str("core.fsync", "committed,index")?;
        config.set_bool("core.fsyncObjectFiles", true)?;
        Ok(())
    }

    pub fn open(path: &Path) -> Result<Store> {
        let repo = Repository::open_bare(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Store { repo })
    }

    fn head_tree(&self) -> Result<Option<git2::Tree<'_>>> {
        match self.repo.head() {
            Ok(h) => Ok(Some(h.peel_to_tree()?)),
            Err(e)
                if e.code() == git2::ErrorCode::UnbornBranch
                    || e.code() == git2::ErrorCode::NotFound =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Bytes of `path` at HEAD, if present.
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let Some(tree) = self.head_tree()? else {
            return Ok(None);
        };
        match tree.get_path(Path::new(path)) {
            Ok(e) => Ok(Some(self.repo.find_blob(e.id())?.content().to_vec())),
            Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn blob(&self, d: &Digest) -> Result<Option<Vec<u8>>> {
        self.read(&format!("blobs/{}", d.to_hex()))
    }

    pub fn has_blob(&self, d: &Digest) -> Result<bool> {
        let Some(tree) = self.head_tree()? else {
            return Ok(false);
        };
        Ok(tree
            .get_path(Path::new(&format!("blobs/{}", d.to_hex())))
            .is_ok())
    }

    /// Names directly under a directory at HEAD.
    pub fn list(&self, dir: &str) -> Result<Vec<String>> {
        let Some(tree) = self.head_tree()? else {
            return Ok(vec![]);
        };
        let sub = match tree.get_path(Path::new(dir)) {
            Ok(e) => self.repo.find_tree(e.id())?,
            Err(_) => return Ok(vec![]),
        };
        Ok(sub
            .iter()
            .filter_map(|e| e.name().ok().map(str::to_string))
            .collect())
    }

    /// Every track: (app, channel, platform) directories that hold releases.
    pub fn tracks(&self) -> Result<Vec<Track>> {
        let mut out = vec![];
        for app in self.list("apps")? {
            for channel in self.list(&format!("apps/{app}"))? {
                out.extend(self.tracks_of(&app, &channel)?);
            }
        }
        Ok(out)
    }

    /// The tracks of (app, channel): one directory listed.
    fn tracks_of(&self, app: &str, channel: &str) -> Result<Vec<Track>> {
        Ok(self
            .list(&format!("apps/{app}/{channel}"))?
            .iter()
            // A file here is a release from before platform directories (moved by
            // `upgrade_layout`), not a track.
            .filter_map(|p| p.parse::<Platform>().ok())
            .map(|p| Track::new(app, channel, p))
            .collect())
    }

    /// The release numbers on `track`, from file names alone (unordered).
    fn numbers(&self, track: &Track) -> Result<Vec<u64>> {
        Ok(self
            .list(&track_dir(track))?
            .iter()
            .filter_map(|f| manifest_number(f))
            .collect())
    }

    /// Every release of every track, ordered by app, channel, release, platform.
    pub fn releases(&self) -> Result<Vec<ReleaseInfo>> {
        let mut out = vec![];
        for track in self.tracks()? {
            for release in self.numbers(&track)? {
                out.push(self.listed(&track, release)?);
            }
        }
        fn key(r: &ReleaseInfo) -> (&str, &str, u64, Platform) {
            (&r.track.app, &r.track.channel, r.release, r.track.platform)
        }
        out.sort_by(|a, b| key(a).cmp(&key(b)));
        Ok(out)
    }

    /// The newest release number of every track, from file names alone (nothing is read
    /// or hashed), and how many manifests there are in all.
    pub fn newest_releases(&self) -> Result<(Vec<Newest>, u64)> {
        let (mut out, mut count) = (vec![], 0);
        for track in self.tracks()? {
            let numbers = self.numbers(&track)?;
            count += numbers.len() as u64;
            if let Some(newest) = numbers.into_iter().max() {
                out.push((track, newest));
            }
        }
        Ok((out, count))
    }

    /// The git id of the tree (or blob) at `path` in HEAD: equal ids, equal contents, so a
    /// caller can tell in one lookup whether anything under `path` changed.
    pub fn tree_id(&self, path: &str) -> Result<Option<Oid>> {
        let Some(tree) = self.head_tree()? else {
            return Ok(None);
        };
        match tree.get_path(Path::new(path)) {
            Ok(e) => Ok(Some(e.id())),
            Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The newest release of `track`: one directory listed, one manifest hashed.
    pub fn latest(&self, track: &Track) -> Result<Option<ReleaseInfo>> {
        match self.numbers(track)?.into_iter().max() {
            Some(release) => self.listed(track, release).map(Some),
            None => Ok(None),
        }
    }

    /// The newest release number of (app, channel) on any platform: the next release, on
    /// whichever platforms, is numbered above it.
    pub fn newest_number(&self, app: &str, channel: &str) -> Result<Option<u64>> {
        Ok(self.release_numbers(app, channel)?.last().copied())
    }

    /// The release numbers of (app, channel) on any platform, ascending, from file names
    /// alone (nothing read or hashed).
    pub fn release_numbers(&self, app: &str, channel: &str) -> Result<Vec<u64>> {
        let mut all = vec![];
        for track in self.tracks_of(app, channel)? {
            all.extend(self.numbers(&track)?);
        }
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }

    /// Every platform's manifest of release `release` of (app, channel).
    pub fn release(&self, app: &str, channel: &str, release: u64) -> Result<Vec<ReleaseInfo>> {
        let mut out = vec![];
        for track in self.tracks_of(app, channel)? {
            out.extend(self.info(&track, release)?);
        }
        Ok(out)
    }

    /// Releases sitting directly in a channel directory (the layout before platform
    /// directories): (app, channel, release number).
    fn unplaced_releases(&self) -> Result<Vec<(String, String, u64)>> {
        let mut out = vec![];
        for app in self.list("apps")? {
            for channel in self.list(&format!("apps/{app}"))? {
                for file in self.list(&format!("apps/{app}/{channel}"))? {
                    if let Some(release) = manifest_number(&file) {
                        out.push((app.clone(), channel.clone(), release));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Release `release` of `track`, if stored (its manifest read and hashed).
    fn info(&self, track: &Track, release: u64) -> Result<Option<ReleaseInfo>> {
        let path = release_path(track, release, "manifest");
        Ok(self.read(&path)?.map(|bytes| ReleaseInfo {
            track: track.clone(),
            release,
            manifest: Digest::of(&bytes),
        }))
    }

    /// [`Store::info`] of a release just listed: it must be there.
    fn listed(&self, track: &Track, release: u64) -> Result<ReleaseInfo> {
        self.info(track, release)?
            .ok_or_else(|| StoreError::Vanished(release_path(track, release, "manifest")))
    }

    /// Moves releases stored before platform directories (`apps/<app>/<channel>/
    /// <release>.<ext>`) into their platform's directory, which each manifest names, in
    /// one commit; returns how many files moved (0: nothing to do, nothing committed).
    pub fn upgrade_layout(&self) -> Result<usize> {
        if self.unplaced_releases()?.is_empty() {
            return Ok(0);
        }
        self.transaction(|store| {
            let mut change = Change::default();
            let mut moved = 0;
            for (app, channel, release) in store.unplaced_releases()? {
                let old = |ext: &str| format!("apps/{app}/{channel}/{release:010}.{ext}");
                let manifest = store
                    .read(&old("manifest"))?
                    .ok_or_else(|| StoreError::Vanished(old("manifest")))?;
                let platform =
                    stored_platform(&manifest).map_err(|source| StoreError::StoredPlatform {
                        path: old("manifest"),
                        source: Box::new(source),
                    })?;
                let track = Track::new(&app, &channel, platform);
                for ext in ["manifest", "announcement", "staging"] {
                    if let Some(bytes) = store.read(&old(ext))? {
                        change.put(release_path(&track, release, ext), bytes);
                        change.remove(old(ext));
                        moved += 1;
                    }
                }
            }
            let commit = Commit {
                message: "store: releases moved into platform directories".into(),
                change,
                tag: None,
            };
            Ok((commit, moved))
        })
    }

    /// Every event, oldest first (the legacy `events.log`, then the day files in order).
    pub fn events(&self) -> Result<Vec<Event>> {
        let mut text = self.read("events.log")?.unwrap_or_default();
        let mut days = self.list("events")?;
        days.sort();
        for day in days {
            text.extend(self.read(&format!("events/{day}"))?.unwrap_or_default());
        }
        Ok(String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    /// Issue 32: libgit2 does not fsync by default; a store syncs what it writes, and a
    /// store from before is brought up to it.
    #[test]
    fn a_store_syncs_objects_and_refs_to_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("new.git")).unwrap();
        let on = |s: &Store| s.repo.config().unwrap().get_bool("core.fsyncObjectFiles");
        assert!(on(&store).unwrap());
        let old = dir.path().join("old.git");
        Repository::init_bare(&old).unwrap();
        let store = Store::open(&old).unwrap();
        assert!(on(&store).is_err(), "unset before");
        store.sync_writes().unwrap();
        assert!(on(&store).unwrap());
        let git = Repository::open_bare(&old).unwrap().config().unwrap();
        assert_eq!(git.get_string("core.fsync").unwrap(), "committed,index");
    }

    use super::*;

    /// Each failed operation is its own variant, naming what it failed on, its source kept.
    #[test]
    fn a_store_that_is_not_there_is_an_open_error_naming_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.git");
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(&err, StoreError::Open { path: p, .. } if *p == path));
        assert_eq!(
            err.to_string(),
            format!("opening git store {}", path.display())
        );
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn commits_build_on_each_other_and_tag() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("s.git")).unwrap();
        let mut c = Change::default();
        c.put("blobs/aa", b"one".to_vec());
        c.event(Event {
            at: 1,
            kind: "publish".into(),
            app: Some("x".into()),
            channel: None,
            release: Some(1),
            device: None,
            detail: "d".into(),
        });
        store.commit("first", &c, Some("x/v1.0.0")).unwrap();
        let mut c = Change::default();
        let track = Track::new("x", "stable", Platform::QemuX86_64);
        c.put(release_path(&track, 1, "manifest"), b"m".to_vec());
        store.commit("second", &c, None).unwrap();
        assert_eq!(store.read("blobs/aa").unwrap().unwrap(), b"one");
        assert_eq!(store.releases().unwrap().len(), 1);
        assert_eq!(store.events().unwrap().len(), 1);
        assert!(store.repo.find_reference("refs/tags/x/v1.0.0").is_ok());
    }

    fn sealed_manifest(app: &str, platform: Platform, release: u64) -> Vec<u8> {
        use proto::manifest::{BootSpec, ChunkRef, HealthProbe, Manifest, Staging};
        let m = Manifest {
            fleet: "home".into(),
            app: app.into(),
            version: semver::Version::new(1, 0, release),
            release,
            channel: "stable".into(),
            platform,
            image_digest: Digest::of(b"image"),
            image_size: 5,
            chunks: vec![ChunkRef {
                digest: Digest::of(b"image"),
                size: 5,
            }],
            boot: BootSpec {
                memory_mib: 32,
                vcpus: 1,
                cmdline: String::new(),
                probe: HealthProbe::TcpConnect { port: 80 },
                probe_timeout_ms: 1000,
                network: false,
            },
            staging: Staging::Skipped,
            created_at: 1,
            previous: None,
            rollout: Default::default(),
            provenance: None,
        };
        m.seal().unwrap().encode().unwrap()
    }

    /// A store written before platform directories keeps every release, moved into the
    /// directory of the platform its manifest names, in one commit; then nothing is left
    /// to move and nothing more is committed.
    #[test]
    fn a_store_from_before_platform_directories_is_moved_into_them_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("s.git")).unwrap();
        let mut c = Change::default();
        for (app, platform, release) in [
            ("hello", Platform::QemuX86_64, 1),
            ("hello", Platform::QemuX86_64, 2),
            ("arm", Platform::XenArm32, 1),
        ] {
            let old = format!("apps/{app}/stable/{release:010}");
            c.put(
                format!("{old}.manifest"),
                sealed_manifest(app, platform, release),
            );
            c.put(format!("{old}.announcement"), b"a".to_vec());
        }
        c.put("apps/hello/stable/0000000002.staging", b"report".to_vec());
        store.commit("old layout", &c, None).unwrap();
        assert!(
            store.releases().unwrap().is_empty(),
            "old files are not tracks"
        );
        let head = store.repo.head().unwrap().target();

        assert_eq!(store.upgrade_layout().unwrap(), 7);
        let hello = Track::new("hello", "stable", Platform::QemuX86_64);
        let arm = Track::new("arm", "stable", Platform::XenArm32);
        let releases: Vec<(Track, u64)> = store
            .releases()
            .unwrap()
            .into_iter()
            .map(|r| (r.track, r.release))
            .collect();
        assert_eq!(
            releases,
            vec![(arm.clone(), 1), (hello.clone(), 1), (hello.clone(), 2)]
        );
        let staging = store.read(&release_path(&hello, 2, "staging")).unwrap();
        assert_eq!(staging.as_deref(), Some(&b"report"[..]));
        assert!(store
            .read("apps/hello/stable/0000000001.manifest")
            .unwrap()
            .is_none());
        assert_eq!(
            store.list("apps/hello/stable").unwrap(),
            vec!["qemu-x86_64"]
        );
        assert_eq!(store.newest_number("hello", "stable").unwrap(), Some(2));
        assert_ne!(store.repo.head().unwrap().target(), head);

        let moved = store.repo.head().unwrap().target();
        assert_eq!(store.upgrade_layout().unwrap(), 0);
        assert_eq!(
            store.repo.head().unwrap().target(),
            moved,
            "no empty commit"
        );
    }

    /// One release number, a manifest per platform: each platform is a track with its own
    /// newest release, and the channel's newest number is the highest of them.
    #[test]
    fn each_platform_of_a_channel_is_a_track_with_its_own_newest_release() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("s.git")).unwrap();
        let x86 = Track::new("hello", "stable", Platform::QemuX86_64);
        let arm = Track::new("hello", "stable", Platform::QemuAarch64);
        let mut c = Change::default();
        for (track, release) in [(&x86, 1), (&arm, 1), (&arm, 2)] {
            c.put(
                release_path(track, release, "manifest"),
                sealed_manifest("hello", track.platform, release),
            );
        }
        store.commit("releases", &c, None).unwrap();
        let (mut newest, count) = store.newest_releases().unwrap();
        newest.sort();
        assert_eq!(count, 3);
        assert_eq!(newest, vec![(x86.clone(), 1), (arm.clone(), 2)]);
        assert_eq!(store.newest_number("hello", "stable").unwrap(), Some(2));
        assert_eq!(store.latest(&x86).unwrap().unwrap().release, 1);
        let one: Vec<Platform> = store
            .release("hello", "stable", 1)
            .unwrap()
            .into_iter()
            .map(|r| r.track.platform)
            .collect();
        assert_eq!(one.len(), 2);
        assert!(one.contains(&Platform::QemuX86_64) && one.contains(&Platform::QemuAarch64));
    }

    fn event(n: u64) -> Event {
        Event {
            at: n,
            kind: "report".into(),
            app: None,
            channel: None,
            release: None,
            device: Some(format!("d{n}")),
            detail: String::new(),
        }
    }

    #[test]
    fn gc_packs_the_loose_objects_of_many_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("s.git")).unwrap();
        // git estimates loose objects from one of 256 fan-out directories: with ~2,400
        // objects and a threshold of 100 it is certain to act.
        store
            .repo
            .config()
            .unwrap()
            .set_i32("gc.auto", 100)
            .unwrap();
        for k in 0..600 {
            let mut c = Change::default();
            c.event(event(k));
            store.commit("event", &c, None).unwrap();
        }
        let loose = |store: &Store| {
            std::fs::read_dir(store.repo.path().join("objects"))
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().len() == 2)
                .map(|e| std::fs::read_dir(e.path()).unwrap().count())
                .sum::<usize>()
        };
        assert!(loose(&store) > 2000);
        assert!(store.gc().unwrap());
        assert!(loose(&store) < 10, "{} loose objects left", loose(&store));
        assert_eq!(store.events().unwrap().len(), 600);
    }

    #[test]
    fn events_go_to_the_file_of_their_utc_day() {
        assert_eq!(event_file(0), "events/1970-01-01.log");
        assert_eq!(event_file(951_782_400), "events/2000-02-29.log");
        assert_eq!(event_file(1_796_083_199), "events/2026-11-30.log");
        assert_eq!(event_file(1_796_083_200), "events/2026-12-01.log");
        assert_eq!(event_file(4_102_444_800), "events/2100-01-01.log");
    }

    /// One `events.log` was rewritten whole by every commit: after a year of events each
    /// commit copied all of them. Now a commit touches only its day's file, so an old,
    /// large history does not make a commit larger.
    #[test]
    fn a_commit_rewrites_only_its_days_events() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("s.git")).unwrap();
        let mut old = Change::default();
        for k in 0..20_000u64 {
            old.event(Event {
                at: k * 1000,
                ..event(k)
            }); // ~231 days of history
        }
        old.event(Event { at: 1, ..event(0) });
        store.commit("history", &old, None).unwrap();
        let history: u64 = store
            .list("events")
            .unwrap()
            .iter()
            .map(|d| store.read(&format!("events/{d}")).unwrap().unwrap().len() as u64)
            .sum();
        let mut today = Change::default();
        today.event(Event {
            at: 30_000_000,
            ..event(1)
        });
        store.commit("today", &today, None).unwrap();
        let written = store.read(&event_file(30_000_000)).unwrap().unwrap().len() as u64;
        assert!(
            written * 100 < history,
            "{written} bytes rewritten of {history}"
        );
        let all = store.events().unwrap();
        assert_eq!(all.len(), 20_002);
        assert_eq!(
            all.last().unwrap().at,
            30_000_000,
            "day files are read in order"
        );
    }

    #[test]
    fn a_store_with_a_single_events_log_still_lists_it_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("s.git")).unwrap();
        let mut c = Change::default();
        c.put(
            "events.log",
            format!("{}\n", serde_json::to_string(&event(1)).unwrap()).into_bytes(),
        );
        store.commit("legacy", &c, None).unwrap();
        let mut c = Change::default();
        c.event(Event { at: 5, ..event(2) });
        store.commit("new", &c, None).unwrap();
        let all = store.events().unwrap();
        assert_eq!(all.iter().map(|e| e.at).collect::<Vec<_>>(), [1, 5]);
    }

    #[test]
    fn concurrent_writers_each_land_every_commit() {
        // Two handles on one store, as `hub serve` and `hub publish` are two processes:
        // the writer lock is per open file, so this is the same contention.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.git");
        Store::init(&path).unwrap();
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let store = Store::open(&path).unwrap();
                    for k in 0..40 {
                        let mut c = Change::default();
                        c.put(format!("blobs/{w}-{k}"), vec![w as u8; 64]);
                        c.event(event(w * 100 + k));
                        store.commit(&format!("w{w} {k}"), &c, None).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.events().unwrap().len(),
            80,
            "every event is in the log"
        );
        assert_eq!(
            store.list("blobs").unwrap().len(),
            80,
            "every file is in HEAD"
        );
        let mut walk = store.repo.revwalk().unwrap();
        walk.push_head().unwrap();
        assert_eq!(walk.count(), 80, "one commit per change, none lost");
    }

    #[test]
    fn a_ref_lock_left_by_a_killed_writer_is_removed_and_a_live_one_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("s.git")).unwrap();
        let mut c = Change::default();
        c.event(event(1));
        store.commit("first", &c, None).unwrap();
        let lock = store.repo.path().join("refs/heads/master.lock");

        // Fresh: another git command may be mid-update; the commit waits, then says so.
        std::fs::write(&lock, b"").unwrap();
        let err = format!("{:#}", store.commit("second", &c, None).unwrap_err());
        assert!(err.contains("stayed locked"), "{err}");
        assert!(lock.exists(), "a fresh lock is never removed");

        // Old: a writer was killed holding it; the next commit removes it and lands.
        let old = std::time::SystemTime::now() - STALE_REF_LOCK - Duration::from_secs(1);
        std::fs::File::options()
            .write(true)
            .open(&lock)
            .unwrap()
            .set_modified(old)
            .unwrap();
        store.commit("second", &c, None).unwrap();
        assert!(!lock.exists());
        assert_eq!(store.events().unwrap().len(), 2);
    }
}
