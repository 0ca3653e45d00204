//! The owners of `hub serve`'s git store: two threads, each with its own libgit2 handle on
//! the one repository, taking typed commands over bounded channels, each with a oneshot
//! reply; callers hold cloneable handles ([`StoreWriter`], [`StoreReader`]).
//!
//! - The **writer** commits (device events, hold lists) and packs the store (`git gc
//!   --auto`). Both take the store's writer lock, so a gc that runs for seconds delays
//!   the commits queued behind it, and nothing else.
//! - The **reader** answers everything that only reads at HEAD: blobs for peers, the trust
//!   records, the enrolled keys, the newest releases. Git objects are immutable and HEAD
//!   moves by an atomic rename, so a second handle reads safely beside the writer (and
//!   beside `hub publish` in another process, as it always did); a pack that gc has just
//!   replaced is found again by libgit2, which rescans the packs on a miss. So a gc or a
//!   batch commit never holds up blob serving, where one `Mutex<Store>` held by the hourly
//!   gc stalled every blob request, status report and control command for its whole run.
//!
//! A command that panics fails that command alone ([`OwnerError::Panicked`]): the owner
//! catches the panic and takes the next command (a poisoned mutex failed every request
//! after one panic). The threads end when the last handle is dropped.

use crate::home::{Home, HomeError};
use crate::inventory::load_devices;
use crate::rollout::{HoldChange, ReleaseKey, RolloutError};
use crate::store::{release_path, Change, ListError, Store, StoreError};
use proto::announcement::Track;
use proto::keys::{KeyId, PublicKey};
use proto::revocation::Revocations;
use proto::rollout::{HaltPolicy, Holds};
use proto::root::TrustedRoot;
use proto::{Digest, SecretKey};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use tokio::sync::{mpsc, oneshot};

/// Commands waiting for the writer: a batch a second, a halt now and then, the hourly gc.
const WRITER_INBOX: usize = 16;
/// Commands waiting for the reader: blob reads of every peer being served (the network
/// bounds those per peer) and the loop's periodic look at the releases.
const READER_INBOX: usize = 64;

/// Why a command to a store owner got no result.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// The owner's thread is gone (the hub is shutting down).
    #[error("the store's {0} thread has stopped")]
    Stopped(&'static str),
    /// The command panicked; the owner carried on with the next one.
    #[error("the store's {0} thread panicked on this command")]
    Panicked(&'static str),
    /// The store refused: the command ran and failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A signed list in the store does not verify.
    #[error(transparent)]
    List(#[from] ListError),
    /// A hold could not be changed, or a release's rollout read.
    #[error(transparent)]
    Rollout(#[from] RolloutError),
}

/// Why the store's owners could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("starting the store's {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
}

/// Enrolled device keys: key id -> (device name, key).
pub type Devices = HashMap<KeyId, (String, PublicKey)>;
/// (track, release, signed announcement bytes).
pub type Announced = (Track, u64, Vec<u8>);

/// The store's releases as the announcer needs them.
#[derive(Debug, Clone)]
pub struct Releases {
    /// The git id of the `apps` tree they were read at: nothing changed while it is the same.
    pub apps: Option<git2::Oid>,
    /// The newest announcement of every track.
    pub announcements: Vec<Announced>,
    /// How many releases the store holds.
    pub count: u64,
    /// The halt policies of the newest releases.
    pub policies: Vec<(ReleaseKey, HaltPolicy)>,
    /// The chunks only the devices a release targets may fetch.
    pub targeted: proto::targeted::Targeted,
}

/// The signed lists the hub spreads besides announcements, verified against its root.
#[derive(Debug, Clone, Default)]
pub struct TrustRecords {
    pub revocations: Option<(Revocations, Vec<u8>)>,
    pub holds: Option<(Holds, Vec<u8>)>,
}

/// A signed record a peer may ask the hub for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    Revocations,
    Holds,
    /// The root link whose [`proto::blob::root_key`] this is.
    RootLink(Digest),
}

/// A hold list one version up (see [`crate::rollout::change_hold`]).
pub struct HoldRequest {
    pub root: TrustedRoot,
    pub key: SecretKey,
    pub release: ReleaseKey,
    pub change: HoldChange,
    pub reason: String,
}

impl std::fmt::Debug for HoldRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HoldRequest")
            .field("release", &self.release)
            .field("change", &self.change)
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

type Reply<T> = oneshot::Sender<Result<T, OwnerError>>;

enum Read {
    Blob(Digest, Reply<Option<Vec<u8>>>),
    Record(Record, Reply<Option<Vec<u8>>>),
    Releases {
        seen: Option<git2::Oid>,
        root: TrustedRoot,
        reply: Reply<Option<Releases>>,
    },
    TrustRecords(TrustedRoot, Reply<TrustRecords>),
    Devices(Reply<Devices>),
}

enum Write {
    Commit {
        message: String,
        change: Change,
        reply: Reply<()>,
    },
    ChangeHold(Box<HoldRequest>, Reply<Holds>),
    Gc(Reply<bool>),
    /// Test hook: holds the writer lock, as gc does, until `release` is sent to or dropped.
    #[cfg(test)]
    Hold {
        started: oneshot::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
    },
}

/// Handles on both owners.
#[derive(Clone, Debug)]
pub struct Owners {
    pub writer: StoreWriter,
    pub reader: StoreReader,
}

/// Starts both owners on `home`'s store (moved into platform directories first, as
/// [`Home::store`] does).
pub fn start(home: &Home) -> Result<Owners, StartError> {
    let writer = home.store()?;
    let reader = Store::open(&home.dir.join("store.git"))?;
    spawn(writer, reader)
}

/// Starts the two owner threads over two handles on one repository.
pub fn spawn(writer: Store, reader: Store) -> Result<Owners, StartError> {
    let (wtx, mut wrx) = mpsc::channel::<Write>(WRITER_INBOX);
    let (rtx, mut rrx) = mpsc::channel::<Read>(READER_INBOX);
    std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || {
            while let Some(cmd) = wrx.blocking_recv() {
                cmd.run(&writer);
            }
        })
        .map_err(|e| StartError::Thread("writer", e))?;
    std::thread::Builder::new()
        .name("store-reader".into())
        .spawn(move || {
            while let Some(cmd) = rrx.blocking_recv() {
                cmd.run(&reader);
            }
        })
        .map_err(|e| StartError::Thread("reader", e))?;
    Ok(Owners {
        writer: StoreWriter { tx: wtx },
        reader: StoreReader { tx: rtx },
    })
}

/// Whether the asker still waits for the reply.
fn asked<T>(reply: &oneshot::Sender<T>) -> bool {
    !reply.is_closed()
}

/// Runs `f` and sends its result, a panic caught as [`OwnerError::Panicked`].
fn answer<T, E: Into<OwnerError>>(
    who: &'static str,
    reply: Reply<T>,
    f: impl FnOnce() -> Result<T, E>,
) {
    let out = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(OwnerError::Panicked(who)),
    };
    let _ = reply.send(out);
}

impl Read {
    fn run(self, store: &Store) {
        match self {
            // A read nobody waits for any more (the asker was cancelled) is skipped.
            Read::Blob(d, reply) if asked(&reply) => answer("reader", reply, || store.blob(&d)),
            Read::Record(r, reply) if asked(&reply) => {
                answer("reader", reply, || read_record(store, r))
            }
            Read::Releases { seen, root, reply } if asked(&reply) => {
                answer("reader", reply, || read_releases(store, seen, &root))
            }
            Read::TrustRecords(root, reply) if asked(&reply) => answer("reader", reply, || {
                Ok::<_, ListError>(TrustRecords {
                    revocations: crate::trust::revocations(store, &root)?,
                    holds: crate::rollout::holds(store, &root)?,
                })
            }),
            Read::Devices(reply) if asked(&reply) => {
                answer("reader", reply, || load_devices(store))
            }
            _ => {}
        }
    }
}

impl Write {
    /// Writes run even when their asker is gone: what was accepted is kept.
    fn run(self, store: &Store) {
        match self {
            Write::Commit {
                message,
                change,
                reply,
            } => answer("writer", reply, || store.commit(&message, &change, None)),
            Write::ChangeHold(h, reply) => answer("writer", reply, || {
                crate::rollout::change_hold(store, &h.root, &h.key, &h.release, h.change, &h.reason)
            }),
            Write::Gc(reply) => answer("writer", reply, || store.gc()),
            #[cfg(test)]
            Write::Hold { started, release } => {
                let _lock = store.writer_lock().expect("test: the writer lock");
                let _ = started.send(());
                let _ = release.recv();
            }
        }
    }
}

/// A root link, the revocation list or the hold list, as a peer asked for it.
fn read_record(store: &Store, record: Record) -> Result<Option<Vec<u8>>, StoreError> {
    let digest = match record {
        Record::Revocations => return store.read("revocations.bin"),
        Record::Holds => return store.read(crate::rollout::HOLDS_PATH),
        Record::RootLink(d) => d,
    };
    // The chain's versions from the file names (one listing), then the one link whose
    // key was asked for.
    let versions = store
        .list("roots")?
        .into_iter()
        .filter_map(|f| f.strip_suffix(".bin")?.parse::<u64>().ok());
    let asked = versions
        .chain([1])
        .find(|v| proto::blob::root_key(*v) == digest);
    match asked {
        Some(v) => crate::trust::root_link(store, v),
        None => Ok(None),
    }
}

/// The newest release of every track, unless the `apps` tree is still `seen`.
fn read_releases(
    store: &Store,
    seen: Option<git2::Oid>,
    root: &TrustedRoot,
) -> Result<Option<Releases>, RolloutError> {
    let apps = store.tree_id("apps")?;
    if apps.is_some() && apps == seen {
        return Ok(None);
    }
    let (newest, count) = store.newest_releases()?;
    let targeted = crate::targeted::read(store, root)?;
    let mut announcements = vec![];
    let mut policies = vec![];
    for (track, release) in newest {
        if let Some(bytes) = store.read(&release_path(&track, release, "announcement"))? {
            announcements.push((track.clone(), release, bytes));
        }
        let (app, channel) = (&track.app, &track.channel);
        if let Some((r, _)) = crate::rollout::stored_rollout(store, root, app, channel, release)? {
            if let Some(p) = r.halt {
                policies.push((ReleaseKey::of(&track, release), p));
            }
        }
    }
    Ok(Some(Releases {
        apps,
        announcements,
        count,
        policies,
        targeted,
    }))
}

/// Sends a command and awaits its reply. Cancel-safe: dropped, the command may still run
/// (a write) or be skipped (a read), and nothing else is lost.
async fn ask<C, T>(
    tx: &mpsc::Sender<C>,
    who: &'static str,
    make: impl FnOnce(Reply<T>) -> C,
) -> Result<T, OwnerError> {
    let (reply, rx) = oneshot::channel();
    tx.send(make(reply))
        .await
        .map_err(|_| OwnerError::Stopped(who))?;
    rx.await.map_err(|_| OwnerError::Stopped(who))?
}

/// The writer's handle: commits and gc, in the order sent.
#[derive(Clone, Debug)]
pub struct StoreWriter {
    tx: mpsc::Sender<Write>,
}

impl StoreWriter {
    /// Commits `change` on top of HEAD.
    pub async fn commit(&self, message: &str, change: Change) -> Result<(), OwnerError> {
        let message = message.to_string();
        ask(&self.tx, "writer", |reply| Write::Commit {
            message,
            change,
            reply,
        })
        .await
    }

    /// Holds or resumes a release (one commit, with an event).
    pub async fn change_hold(&self, request: HoldRequest) -> Result<Holds, OwnerError> {
        ask(&self.tx, "writer", |reply| {
            Write::ChangeHold(Box::new(request), reply)
        })
        .await
    }

    /// `git gc --auto` (see [`Store::gc`]); whether it ran.
    pub async fn gc(&self) -> Result<bool, OwnerError> {
        ask(&self.tx, "writer", Write::Gc).await
    }

    /// Test hook: the writer holds the writer lock (busy, as in a long gc) until the
    /// returned sender is used or dropped; resolves once it holds it.
    #[cfg(test)]
    pub async fn hold(&self) -> std::sync::mpsc::Sender<()> {
        let (started, started_rx) = oneshot::channel();
        let (release_tx, release) = std::sync::mpsc::channel();
        self.tx
            .send(Write::Hold { started, release })
            .await
            .expect("test: the writer runs");
        started_rx.await.expect("test: the writer holds");
        release_tx
    }
}

/// The reader's handle: reads at HEAD, never behind a commit or a gc.
#[derive(Clone, Debug)]
pub struct StoreReader {
    tx: mpsc::Sender<Read>,
}

impl StoreReader {
    /// A chunk or signed manifest by digest.
    pub async fn blob(&self, digest: Digest) -> Result<Option<Vec<u8>>, OwnerError> {
        ask(&self.tx, "reader", |reply| Read::Blob(digest, reply)).await
    }

    pub async fn record(&self, record: Record) -> Result<Option<Vec<u8>>, OwnerError> {
        ask(&self.tx, "reader", |reply| Read::Record(record, reply)).await
    }

    /// The newest releases, or `None` if the `apps` tree is still `seen`.
    pub async fn releases(
        &self,
        seen: Option<git2::Oid>,
        root: TrustedRoot,
    ) -> Result<Option<Releases>, OwnerError> {
        ask(&self.tx, "reader", |reply| Read::Releases {
            seen,
            root,
            reply,
        })
        .await
    }

    /// The revocation and hold lists, verified against `root`.
    pub async fn trust_records(&self, root: TrustedRoot) -> Result<TrustRecords, OwnerError> {
        ask(&self.tx, "reader", |reply| Read::TrustRecords(root, reply)).await
    }

    pub async fn devices(&self) -> Result<Devices, OwnerError> {
        ask(&self.tx, "reader", Read::Devices).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn store_with_blob(bytes: &[u8]) -> (tempfile::TempDir, StoreWriter, StoreReader, Digest) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.git");
        let store = Store::init(&path).unwrap();
        let digest = Digest::of(bytes);
        let mut c = Change::default();
        c.put(format!("blobs/{}", digest.to_hex()), bytes.to_vec());
        store.commit("a blob", &c, None).unwrap();
        let owners = spawn(store, Store::open(&path).unwrap()).unwrap();
        (dir, owners.writer, owners.reader, digest)
    }

    /// The hourly gc held the one store mutex for its whole run, and every blob request
    /// waited behind it. With the writer busy holding the writer lock (as gc does), blobs
    /// are answered, a commit sent meanwhile waits, and lands once the writer is free.
    #[tokio::test]
    async fn blobs_are_served_while_the_writer_is_busy_with_a_gc() {
        let (_dir, writer, reader, digest) = store_with_blob(b"chunk bytes");
        let release = writer.hold().await;
        let w = writer.clone();
        let later = Digest::of(b"later");
        let commit = tokio::spawn(async move {
            let mut c = Change::default();
            c.put(format!("blobs/{}", later.to_hex()), b"later".to_vec());
            w.commit("behind the gc", c).await
        });
        for _ in 0..20 {
            let got = tokio::time::timeout(Duration::from_secs(30), reader.blob(digest))
                .await
                .expect("a blob read waited behind the busy writer")
                .unwrap();
            assert_eq!(got.as_deref(), Some(&b"chunk bytes"[..]));
        }
        assert_eq!(reader.blob(later).await.unwrap(), None);
        // The writer is still held (only this test lets it go), so the commit waits.
        assert!(!commit.is_finished());
        release.send(()).unwrap();
        commit.await.unwrap().unwrap();
        assert_eq!(
            reader.blob(later).await.unwrap().as_deref(),
            Some(&b"later"[..])
        );
    }

    #[tokio::test]
    async fn a_missing_blob_is_none_and_the_owners_stop_with_their_handles() {
        let (_dir, writer, reader, _) = store_with_blob(b"x");
        assert_eq!(reader.blob(Digest::of(b"nothing")).await.unwrap(), None);
        assert!(!writer
            .gc()
            .await
            .is_err_and(|e| matches!(e, OwnerError::Stopped(_))));
        drop(writer);
        drop(reader);
    }

    #[tokio::test]
    async fn records_are_read_by_what_a_peer_asks() {
        let (_dir, writer, reader, _) = store_with_blob(b"x");
        let mut c = Change::default();
        c.put("revocations.bin", b"revoked".to_vec());
        c.put(crate::store::root_path(2), b"root two".to_vec());
        writer.commit("records", c).await.unwrap();
        assert_eq!(
            reader.record(Record::Revocations).await.unwrap().as_deref(),
            Some(&b"revoked"[..])
        );
        assert_eq!(reader.record(Record::Holds).await.unwrap(), None);
        let link = Record::RootLink(proto::blob::root_key(2));
        assert_eq!(
            reader.record(link).await.unwrap().as_deref(),
            Some(&b"root two"[..])
        );
        let absent = Record::RootLink(proto::blob::root_key(7));
        assert_eq!(reader.record(absent).await.unwrap(), None);
    }
}
