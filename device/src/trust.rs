//! What a device trusts, and one owner for it: the root (moved forward link by link when
//! the fleet rotates it), the revocation list, and a clock that never reads earlier than
//! the newest time the device has securely seen.
//!
//! Files in the state directory, each written atomically: `root.bin` (the newest root
//! accepted), `roots/<version>.bin` (every link accepted, served to peers catching up),
//! `revocations.bin`, `clock-floor` (Unix seconds, text).

use crate::store::{write_atomic, StoreError};
use net::PeerId;
use proto::codec::Kind;
use proto::envelope::Envelope;
use proto::revocation::{verify_revocations, Revocations};
use proto::rollout::{verify_holds, Holds};
use proto::root::TrustedRoot;
use proto::targeted::Targeted;
use proto::Digest;
use proto::VerifyError;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// No board runs this build before it was written (as systemd's TIME_EPOCH): a board that
/// boots in 1970 without a real-time clock starts from here, not from 1970.
pub const BUILD_FLOOR: u64 = 1_796_083_200; // 2026-12-01T00:00:00Z
/// The floor is written to disk when it has moved this far (and the first time).
const PERSIST_EVERY: u64 = 3600;
/// Most root links fetched to catch up at once (one per rotation missed).
pub const MAX_LINKS: u64 = 64;

/// The time to check expiry with: the system clock, or the newest time securely seen if
/// the clock is behind it (no RTC, a dead battery, a clock set back).
pub fn trusted_now(system: u64, floor: u64) -> u64 {
    system.max(floor)
}

/// The system clock in Unix seconds (0 if it reads before 1970).
pub fn system_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A clock with a floor: [`Clock::now`] is [`trusted_now`]; [`Clock::saw`] raises the
/// floor to a time read from verified, signed metadata (an announcement's issue time).
#[derive(Debug)]
pub struct Clock {
    path: PathBuf,
    floor: AtomicU64,
    stored: AtomicU64,
    system: fn() -> u64,
}

impl Clock {
    pub fn open(dir: &Path, system: fn() -> u64) -> Clock {
        let path = dir.join("clock-floor");
        let stored = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        Clock {
            path,
            floor: AtomicU64::new(stored.max(BUILD_FLOOR)),
            stored: AtomicU64::new(stored),
            system,
        }
    }

    pub fn now(&self) -> u64 {
        trusted_now((self.system)(), self.floor.load(Ordering::Relaxed))
    }

    pub fn floor(&self) -> u64 {
        self.floor.load(Ordering::Relaxed)
    }

    /// `at` was read from metadata that verified: the clock never reads earlier again.
    pub fn saw(&self, at: u64) {
        let floor = self.floor.fetch_max(at, Ordering::Relaxed).max(at);
        let stored = self.stored.load(Ordering::Relaxed);
        if floor > stored && (stored == 0 || floor >= stored + PERSIST_EVERY) {
            match write_atomic(&self.path, floor.to_string().as_bytes()) {
                Ok(()) => self.stored.store(floor, Ordering::Relaxed),
                Err(e) => tracing::warn!("keeping the clock floor: {}", proto::Chain(&e)),
            }
        }
    }
}

/// The revocation list a device holds, with the peer ids of the devices it names
/// revoked, and the tags it assigns each member, by peer id.
#[derive(Debug, Default)]
pub struct Revoked {
    pub list: Option<Revocations>,
    pub bytes: Option<Vec<u8>>,
    peers: HashSet<PeerId>,
    tags: HashMap<PeerId, Vec<String>>,
}

impl Revoked {
    fn new(list: Revocations, bytes: Vec<u8>) -> Revoked {
        let peers = list
            .devices
            .iter()
            .filter_map(|d| net::peer_id_of(&d.key))
            .collect();
        let tags = list
            .members
            .iter()
            .flatten()
            .filter_map(|m| Some((net::peer_id_of(&m.key)?, m.tags.clone())))
            .collect();
        Revoked {
            list: Some(list),
            bytes: Some(bytes),
            peers,
            tags,
        }
    }

    pub fn version(&self) -> u64 {
        self.list.as_ref().map_or(0, |l| l.version)
    }

    /// Whether `peer` may fetch `digest` from this device: a chunk only of releases that
    /// target other devices (`targeted`) goes to none but them, by the tags assigned.
    pub fn may_fetch(&self, peer: &PeerId, digest: &Digest, targeted: &Targeted) -> bool {
        let tags = self.tags.get(peer).map_or(&[][..], Vec::as_slice);
        targeted.allows(digest, None, tags)
    }
}

/// What [`Trust::offer_root`] made of a root heard from the broker or a peer.
#[derive(Debug, PartialEq, Eq)]
pub enum RootNews {
    /// The root this device holds, or an older one.
    Known,
    /// The next root: verified and adopted (its version).
    Adopted(u64),
    /// A root further ahead: fetch these versions first, then [`Trust::adopt_chain`].
    NeedLinks { from: u64, to: u64 },
}

/// Why a root or revocation list was not taken.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("a root {ahead} versions ahead (more than {MAX_LINKS} links to fetch)")]
    TooFarAhead { ahead: u64 },
    #[error("keeping the new {what} in {}", path.display())]
    Keep {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: StoreError,
    },
}

/// A verified hold list and the signed bytes it came in (what peers are given).
pub type SignedHolds = Arc<(Holds, Vec<u8>)>;

/// The device's trust state; the router is its only writer.
#[derive(Debug)]
pub struct Trust {
    dir: PathBuf,
    root: RwLock<Arc<TrustedRoot>>,
    revoked: RwLock<Arc<Revoked>>,
    /// The newest verified list of held releases and its bytes (relayed to peers).
    holds: RwLock<Option<SignedHolds>>,
    pub clock: Clock,
}

impl Trust {
    /// `root` is the anchor ([`crate::agent`] loads it from the state dir or the config);
    /// a stored revocation list that still verifies is taken up.
    pub fn new(dir: &Path, root: TrustedRoot, clock: Clock) -> Trust {
        let path = dir.join("revocations.bin");
        let revoked = std::fs::read(&path)
            .ok()
            .and_then(|b| match verify_revocations(&b, &root, 0) {
                Ok(list) => Some(Revoked::new(list, b)),
                Err(e) => {
                    tracing::warn!("ignoring {}: {e}", path.display());
                    None
                }
            })
            .unwrap_or_default();
        let path = dir.join("holds.bin");
        let holds = std::fs::read(&path)
            .ok()
            .and_then(|b| match verify_holds(&b, &root, 0) {
                Ok(list) => Some(Arc::new((list, b))),
                Err(e) => {
                    tracing::warn!("ignoring {}: {e}", path.display());
                    None
                }
            });
        let link = dir
            .join("roots")
            .join(format!("{}.bin", root.root().version));
        if !link.exists() {
            let _ = write_atomic(&link, root.bytes());
        }
        Trust {
            dir: dir.to_path_buf(),
            root: RwLock::new(Arc::new(root)),
            revoked: RwLock::new(Arc::new(revoked)),
            holds: RwLock::new(holds),
            clock,
        }
    }

    /// The held releases as last heard (`None`: nothing heard yet).
    pub fn holds(&self) -> Option<SignedHolds> {
        self.holds.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A hold list heard from the broker or a peer: taken if it verifies and is newer
    /// than the one held (kept on disk: a halt holds across restarts with the hub down).
    /// Returns whether it was taken.
    pub fn offer_holds(&self, bytes: &[u8]) -> Result<bool, TrustError> {
        let known = self.holds().map_or(0, |h| h.0.version);
        let list = match verify_holds(bytes, &self.root(), known) {
            Ok(list) => list,
            Err(VerifyError::Stale { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        self.keep("hold list", &self.dir.join("holds.bin"), bytes)?;
        *self.holds.write().unwrap_or_else(|p| p.into_inner()) =
            Some(Arc::new((list, bytes.to_vec())));
        Ok(true)
    }

    pub fn root(&self) -> Arc<TrustedRoot> {
        self.root.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn revoked(&self) -> Arc<Revoked> {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn is_revoked(&self, peer: &PeerId) -> bool {
        self.revoked().peers.contains(peer)
    }

    /// A manifest this device stored itself, opened with the root link of its day
    /// ([`TrustedRoot::open_stored`]).
    pub fn open_stored_manifest(
        &self,
        env: &Envelope,
    ) -> Result<proto::manifest::Manifest, VerifyError> {
        self.root().open_stored(env, |v| self.link(v))
    }

    /// A root link this device holds (to serve a peer catching up).
    pub fn link(&self, version: u64) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join("roots").join(format!("{version}.bin"))).ok()
    }

    /// A root heard from the broker or a peer. Nothing but its version is read before
    /// it verifies as the next link, or through the links it needs.
    pub fn offer_root(&self, bytes: &[u8]) -> Result<RootNews, TrustError> {
        let current = self.root();
        let env = Envelope::decode(bytes, Kind::Root)?;
        let claimed: proto::root::Root =
            proto::codec::decode(Kind::Root, &env.payload).map_err(VerifyError::from)?;
        let have = current.root().version;
        if claimed.version <= have {
            return Ok(RootNews::Known);
        }
        if claimed.version == have + 1 {
            return self.adopt_chain(&[bytes.to_vec()]).map(RootNews::Adopted);
        }
        let ahead = claimed.version - have;
        if ahead > MAX_LINKS {
            return Err(TrustError::TooFarAhead { ahead });
        }
        Ok(RootNews::NeedLinks {
            from: have + 1,
            to: claimed.version - 1,
        })
    }

    /// Applies root links in order (each verified against the one before, with
    /// [`TrustedRoot::update_chain`]), keeps every link and the newest root, then swaps it
    /// in. Returns the new version. From then on, what only the old keys signed is refused.
    pub fn adopt_chain(&self, chain: &[Vec<u8>]) -> Result<u64, TrustError> {
        let current = self.root();
        let next = current.update_chain(chain.iter().map(Vec::as_slice), self.clock.now())?;
        for link in chain {
            let env = Envelope::decode(link, Kind::Root)?;
            let r: proto::root::Root =
                proto::codec::decode(Kind::Root, &env.payload).map_err(VerifyError::from)?;
            let path = self.dir.join("roots").join(format!("{}.bin", r.version));
            self.keep("root link", &path, link)?;
        }
        self.keep("trust root", &self.dir.join("root.bin"), next.bytes())?;
        let version = next.root().version;
        *self.root.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        Ok(version)
    }

    /// A revocation list heard from the broker or a peer: taken if it verifies and is
    /// newer than the one held. Returns whether it was taken.
    pub fn offer_revocations(&self, bytes: &[u8]) -> Result<bool, TrustError> {
        let known = self.revoked().version();
        let list = match verify_revocations(bytes, &self.root(), known) {
            Ok(list) => list,
            Err(VerifyError::Stale { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        self.keep("revocation list", &self.dir.join("revocations.bin"), bytes)?;
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(Revoked::new(list, bytes.to_vec()));
        Ok(true)
    }

    fn keep(&self, what: &'static str, path: &Path, bytes: &[u8]) -> Result<(), TrustError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .map_err(|source| StoreError::Io {
                op: "creating",
                path: dir.to_path_buf(),
                source,
            })
            .and_then(|()| write_atomic(path, bytes))
            .map_err(|source| TrustError::Keep {
                what,
                path: path.to_path_buf(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn boot_in_1970() -> u64 {
        3 // seconds after the epoch: a board without a real-time clock
    }

    fn announcement_at(issued_at: u64, lifetime: u64, key: &proto::SecretKey) -> Vec<u8> {
        let ann = proto::announcement::Announcement {
            fleet: "home".into(),
            app: "hello".into(),
            channel: "stable".into(),
            platform: proto::manifest::Platform::QemuX86_64,
            release: 1,
            version: semver::Version::new(1, 0, 0),
            manifest: proto::Digest::of(b"m"),
            issued_at,
            expires_at: issued_at + lifetime,
        };
        let mut env = ann.seal().unwrap();
        env.sign(key).unwrap();
        env.encode().unwrap()
    }

    fn root() -> (TrustedRoot, proto::SecretKey) {
        let root = TrustedRoot::bootstrap(&next_root(1, 2), BUILD_FLOOR).unwrap();
        (root, proto::SecretKey::from_seed([3; 32]))
    }

    #[test]
    fn a_board_booted_in_1970_neither_accepts_expired_metadata_nor_refuses_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (root, ts) = root();
        // Last run, with the network's time: an announcement issued a year after the
        // build verified, and the device kept that time as its floor.
        let seen = BUILD_FLOOR + 365 * DAY;
        Clock::open(dir.path(), || BUILD_FLOOR + 365 * DAY).saw(seen);
        // Rebooted without a clock: time reads 1970, the floor says otherwise.
        let clock = Clock::open(dir.path(), boot_in_1970);
        assert_eq!(clock.now(), seen);
        // An announcement that lapsed before that time is refused (it would verify at
        // 1970) ...
        let stale = announcement_at(seen - 30 * DAY, 7 * DAY, &ts);
        assert!(proto::announcement::verify_announcement(&stale, &root, boot_in_1970()).is_ok());
        assert!(matches!(
            proto::announcement::verify_announcement(&stale, &root, clock.now()),
            Err(VerifyError::Expired { .. })
        ));
        // ... and a fresh one is accepted, raising the floor further.
        let fresh = announcement_at(seen + DAY, 7 * DAY, &ts);
        let ann = proto::announcement::verify_announcement(&fresh, &root, clock.now()).unwrap();
        clock.saw(ann.issued_at);
        assert_eq!(clock.now(), seen + DAY);
    }

    /// Root `version` signed by root key 1, release key `release_seed`, timestamp key 3,
    /// rollout key 9 (version 1 with release key 2 is [`root`]).
    fn next_root(version: u64, release_seed: u8) -> Vec<u8> {
        let k = |n| proto::SecretKey::from_seed([n; 32]);
        let role = |n| proto::root::Role {
            keys: vec![k(n).public()],
            threshold: 1,
        };
        let root = proto::root::Root {
            fleet: "home".into(),
            version,
            expires_at: BUILD_FLOOR + 10 * 365 * DAY,
            root: role(1),
            release: role(release_seed),
            timestamp: role(3),
            rollout: role(9),
        };
        let mut env = root.seal().unwrap();
        env.sign(&k(1)).unwrap();
        env.encode().unwrap()
    }

    #[test]
    fn a_root_two_versions_ahead_fetches_the_link_between_and_keeps_every_link() {
        let dir = tempfile::tempdir().unwrap();
        let (v1, _) = root();
        let trust = Trust::new(dir.path(), v1, Clock::open(dir.path(), system_now));
        let (v2, v3) = (next_root(2, 4), next_root(3, 5));
        assert_eq!(
            trust.offer_root(&v3).unwrap(),
            RootNews::NeedLinks { from: 2, to: 2 }
        );
        assert_eq!(trust.root().root().version, 1, "nothing taken on its word");
        assert_eq!(trust.adopt_chain(&[v2.clone(), v3.clone()]).unwrap(), 3);
        assert_eq!(trust.root().bytes(), v3.as_slice());
        assert_eq!(trust.link(2).unwrap(), v2);
        assert_eq!(std::fs::read(dir.path().join("root.bin")).unwrap(), v3);
        assert_eq!(trust.offer_root(&v2).unwrap(), RootNews::Known);
        // A restart starts from the stored newest root.
        let stored = std::fs::read(dir.path().join("root.bin")).unwrap();
        assert_eq!(
            TrustedRoot::bootstrap(&stored, BUILD_FLOOR)
                .unwrap()
                .root()
                .version,
            3
        );
        // A chain with a link missing is refused whole.
        let other = tempfile::tempdir().unwrap();
        let trust = Trust::new(
            other.path(),
            root().0,
            Clock::open(other.path(), system_now),
        );
        assert!(trust.adopt_chain(&[next_root(3, 5)]).is_err());
        assert_eq!(trust.root().root().version, 1);
    }

    #[test]
    fn a_new_board_without_a_clock_starts_from_the_build_floor() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::open(dir.path(), boot_in_1970);
        assert_eq!(clock.now(), BUILD_FLOOR);
        // A clock ahead of the floor is used as it is.
        let clock = Clock::open(dir.path(), || BUILD_FLOOR + 5);
        assert_eq!(clock.now(), BUILD_FLOOR + 5);
        assert_eq!(trusted_now(10, 20), 20);
        assert_eq!(trusted_now(30, 20), 30);
    }

    #[test]
    fn the_floor_is_kept_on_disk_but_not_rewritten_for_every_second() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::open(dir.path(), boot_in_1970);
        let t = BUILD_FLOOR + 100;
        clock.saw(t);
        let on_disk = || -> u64 {
            std::fs::read_to_string(dir.path().join("clock-floor"))
                .unwrap()
                .parse()
                .unwrap()
        };
        assert_eq!(on_disk(), t);
        clock.saw(t + 60);
        assert_eq!(on_disk(), t, "a minute later is not worth a write");
        assert_eq!(clock.now(), t + 60);
        clock.saw(t + PERSIST_EVERY);
        assert_eq!(on_disk(), t + PERSIST_EVERY);
        // An older time never lowers it.
        clock.saw(t);
        assert_eq!(clock.now(), t + PERSIST_EVERY);
    }
}
