//! The installer: the I/O shell of [`crate::updater`] — fetch, verify, assemble,
//! install, activate, roll back, report; one release at a time.

use super::inbox::{Heard, Inbox};
use super::{crash_point, sleep_until, WATCH_EVERY};
use crate::time::human_duration;

use crate::config::Config;
use crate::fetch::{DownloadError, Fetcher};
use crate::hypervisor::{ActivateError, Hypervisor};
use crate::metrics::DeviceMetrics;
use crate::report::Reporter;
use crate::store::{AssembleError, Installed, Store, StoreError};
use crate::trust::Trust;
use crate::updater::{Action as UpdaterAction, Event as UpdaterEvent, Outcome};
use crate::watchdog::Watchdog;
use proto::announcement::verify_announcement;
use proto::manifest::{verify_manifest, Expectations, Platform, VerifiedManifest};
use proto::status::DeviceState;
use proto::VerifyError;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A release that does not fit the store budget (refused, not retried).
#[derive(Debug, thiserror::Error)]
#[error(
    "release {release} needs {needed_mib} MiB of store with what is kept, above \
     store_budget_mib = {budget_mib} in device.toml; raise it or free the disk"
)]
pub(super) struct OverBudget {
    pub(super) release: u64,
    pub(super) needed_mib: u64,
    pub(super) budget_mib: u64,
}

/// A release the store's file system has no room for: refused before anything of it is
/// fetched (then what no kept release needs is removed, and it is tried again with the
/// backoff). Worded as ENOSPC is, which is what the download would otherwise end in.
#[derive(Debug, thiserror::Error)]
#[error(
    "No space left in {} for release {release}: it still needs {} and {} is free; free \
     some of the disk",
    dir.display(),
    proto::status::human_bytes(*needed),
    proto::status::human_bytes(*free)
)]
pub(super) struct DiskFull {
    pub(super) release: u64,
    pub(super) needed: u64,
    pub(super) free: u64,
    pub(super) dir: std::path::PathBuf,
}

/// How often a held release is looked at again without news (a new hold list looks at
/// it at once).
const HELD_RECHECK: Duration = Duration::from_secs(60);
/// How long a release for tags this device was not assigned waits before it is looked at
/// again if no new revocation list (which assigns tags, and nudges at once) comes first.
const UNASSIGNED_RECHECK: Duration = Duration::from_secs(3600);

/// A release this device may not start yet.
#[derive(Debug, thiserror::Error)]
pub(super) enum NotYet {
    #[error("its rollout wave for this device opens at {}", human_unix(*at))]
    Wave { at: u64, until: std::time::Instant },
    #[error("the release is {} ({reason})", kind.label())]
    Held {
        kind: proto::rollout::HoldKind,
        reason: String,
        until: std::time::Instant,
    },
    /// A release for tags this device was not assigned: looked at again when a new
    /// revocation list (which assigns tags) arrives, or in a while.
    #[error(
        "the release targets {targets} and this device is {me} with tags [{tags}] assigned \
         (looked at again when the hub assigns tags)"
    )]
    NotAssigned {
        targets: String,
        me: String,
        tags: String,
        until: std::time::Instant,
    },
}

impl NotYet {
    fn until(&self) -> std::time::Instant {
        match self {
            NotYet::Wave { until, .. }
            | NotYet::Held { until, .. }
            | NotYet::NotAssigned { until, .. } => *until,
        }
    }
}

fn human_unix(at: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(at)).to_string()
}

/// Why an install attempt (or its activation, a rollback, the resume at start) ended
/// without the release active: one variant per step. The installer's policy is one
/// `match` on it ([`Updater::attempt`]).
#[derive(Debug, thiserror::Error)]
pub(super) enum InstallError {
    /// Not this device's turn yet (a later wave), or the release is held.
    #[error(transparent)]
    NotYet(#[from] NotYet),
    /// The agent is shutting down: a download step was left unfinished on purpose.
    #[error("shutting down")]
    ShuttingDown,
    /// It does not fit `store_budget_mib` (refused, not retried).
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
    /// The store's file system has no room for it (tried again later).
    #[error(transparent)]
    DiskFull(#[from] DiskFull),
    #[error(
        "the announcement of release {release} lapsed before it was installed; waiting for \
         the hub to sign it afresh"
    )]
    Lapsed {
        release: u64,
        #[source]
        source: VerifyError,
    },
    #[error("fetching the manifest")]
    FetchManifest(#[source] DownloadError),
    /// The manifest did not verify.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("manifest does not match its announcement")]
    Mismatch,
    #[error("fetching chunks")]
    FetchChunks(#[source] DownloadError),
    /// Assembling the image from its chunks (damaged chunks are fetched again at once).
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    /// The state file, a stored manifest.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Assembling or writing the state on a blocking thread that did not finish.
    #[error("{0} did not finish")]
    Blocking(&'static str, #[source] tokio::task::JoinError),
    #[error("stored manifest {} missing", .0.short())]
    ManifestMissing(proto::Digest),
    #[error("stored manifest {} no longer verifies", digest.short())]
    ManifestUnverified {
        digest: proto::Digest,
        #[source]
        source: VerifyError,
    },
    /// libvirt or the address pool failed, not the release: it stays pending.
    #[error("activating release {release} (not counted against it)")]
    NotTheRelease {
        release: u64,
        #[source]
        source: ActivateError,
    },
    /// Booting or stopping a release other than the one being activated (the one rolled
    /// back to, the one resumed at start).
    #[error(transparent)]
    Hypervisor(#[from] ActivateError),
}

type Result<T, E = InstallError> = std::result::Result<T, E>;

pub(super) struct Updater {
    pub(super) cfg: Config,
    /// This device's place in every rollout (from its key).
    pub(super) seed: u16,
    /// This device's key: the revocation list gives it the tags the operator assigned.
    pub(super) key: proto::PublicKey,
    pub(super) platform: Platform,
    pub(super) trust: Arc<Trust>,
    pub(super) store: Arc<Store>,
    pub(super) fetcher: Fetcher,
    pub(super) hypervisor: Hypervisor,
    /// The hosted host on-demand pools burst to (`[hosted]`), if configured.
    pub(super) hosted: Option<Hypervisor>,
    pub(super) reporter: Arc<Reporter>,
    pub(super) metrics: Arc<DeviceMetrics>,
    /// Running on-demand pools, by app.
    pub(super) ondemand: tokio::sync::Mutex<HashMap<String, crate::ondemand::PoolHandle>>,
    pub(super) tasks: net::tasks::Tasks,
    /// The free bytes of the store's file system: [`Store::free_bytes`] (a test says
    /// the disk is full).
    pub(super) free_bytes: fn(&Store) -> Option<u64>,
}

impl Updater {
    /// The I/O shell of [`crate::updater::Updater`]: announcements and outcomes in,
    /// installs out, one at a time.
    pub(super) async fn run(self, inbox: Arc<Inbox>) {
        if let Err(e) = self.resume().await {
            tracing::error!("resuming after start: {}", proto::Chain(&e));
        }
        let mut machine = crate::updater::Updater::new();
        let mut dog = Watchdog::new(Duration::from_secs(self.cfg.probe_every_secs.max(1)));
        let mut watch = tokio::time::interval(WATCH_EVERY);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The newest announcement heard per app: what an install action refers to.
        let mut heard: HashMap<String, Heard> = HashMap::new();
        let mut todo = std::collections::VecDeque::new();
        'run: loop {
            while let Some(UpdaterAction::Install { app, release }) = todo.pop_front() {
                if self.tasks.is_cancelled() {
                    break 'run;
                }
                let outcome = match heard.get(&app).filter(|h| h.ann.release == release) {
                    Some(h) => self.attempt(h).await,
                    None => Outcome::Done,
                };
                let now = std::time::Instant::now();
                dog.forget(&app);
                todo.extend(machine.handle(UpdaterEvent::Finished {
                    app: app.clone(),
                    release,
                    outcome,
                    now,
                }));
                if let Some((release, at)) = machine.retry_of(&app) {
                    tracing::info!(%app, release, "trying the update again in {}", human_duration(at - now));
                }
            }
            let wake = machine.wake_at();
            tokio::select! {
                _ = self.tasks.cancelled() => break,
                (taken, nudged) = inbox.take() => {
                    if nudged {
                        todo.extend(machine.handle(UpdaterEvent::Nudged { now: std::time::Instant::now() }));
                    }
                    for h in taken {
                        let (app, release) = (h.ann.app.clone(), h.ann.release);
                        if heard.get(&app).is_none_or(|o| h.supersedes(o)) {
                            heard.insert(app.clone(), h);
                        }
                        todo.extend(machine.handle(UpdaterEvent::Announced {
                            app,
                            release,
                            now: std::time::Instant::now(),
                        }));
                    }
                }
                _ = sleep_until(wake) => {
                    todo.extend(machine.handle(UpdaterEvent::Tick { now: std::time::Instant::now() }));
                }
                _ = watch.tick() => self.watch(&mut dog).await,
            }
        }
    }

    /// One install attempt, its failure cleaned up and reported as it is: the release the
    /// device still runs, and why the update did not happen.
    pub(super) async fn attempt(&self, heard: &Heard) -> Outcome {
        let ann = &heard.ann;
        let e = match self.update(heard).await {
            Ok(()) => return Outcome::Done,
            Err(InstallError::NotYet(n)) => {
                tracing::info!(app = %ann.app, release = ann.release, "not installing yet: {n}");
                let state = match n {
                    NotYet::Wave { at, .. } => Some(DeviceState::Waiting {
                        release: ann.release,
                        until: at,
                    }),
                    NotYet::Held { kind, .. } => Some(DeviceState::Held {
                        release: ann.release,
                        kind,
                    }),
                    // Not this device's release (yet): the hub sees the device, as for
                    // one never meant for it.
                    NotYet::NotAssigned { .. } => match self.running_or_idle(&ann.app) {
                        Ok(state) => Some(state),
                        Err(e) => {
                            tracing::warn!(app = %ann.app, "reading the device's state: {}", proto::Chain(&e));
                            None
                        }
                    },
                };
                if let Some(state) = state {
                    self.report_running(&ann.app, state).await;
                }
                return Outcome::Deferred(n.until());
            }
            Err(InstallError::ShuttingDown) => {
                tracing::info!(app = %ann.app, release = ann.release, "shutting down: the download is left where it is (verified chunks are kept; it goes on at the next start)");
                return Outcome::Failed;
            }
            Err(e) => e,
        };
        if self.store_is_full(ann) {
            // What the failed release brought is the only space there is to free; the
            // retry fetches it again (or a smaller, newer release takes its place).
            self.collect_garbage();
        }
        let why = proto::Chain(&e).to_string();
        tracing::error!(app = %ann.app, release = ann.release, "update failed: {why}");
        let state = DeviceState::Failed {
            reason: format!(
                "update to release {} ({}) failed: {why}",
                ann.release, ann.version
            ),
        };
        self.report_running(&ann.app, state).await;
        match e {
            InstallError::Assemble(AssembleError::DamagedChunks { .. }) => Outcome::Repairable,
            // It will not fit however often it is tried; a newer release is judged afresh.
            InstallError::OverBudget(_) => Outcome::Done,
            _ => Outcome::Failed,
        }
    }

    /// Whether the store's file system has less room than the announced release still
    /// needs (one largest chunk when its manifest is not stored): the failure may well be
    /// that, and what no kept release needs is worth freeing.
    fn store_is_full(&self, ann: &proto::announcement::Announcement) -> bool {
        let Some(free) = (self.free_bytes)(&self.store) else {
            return false;
        };
        let needed = match self.stored_manifest(&ann.manifest) {
            Ok(m) => self.store.missing_bytes(&m) + m.image_size,
            Err(_) => proto::chunking::MAX_CHUNK as u64,
        };
        free < needed.max(1)
    }

    /// Reports `state` beside the release the device runs now (if any).
    pub(super) async fn report_running(&self, app: &str, state: DeviceState) {
        let running = self
            .store
            .load_state()
            .ok()
            .and_then(|s| s.apps.get(app).and_then(|a| a.current.clone()));
        match &running {
            Some(cur) => self.reporter.report_installed(app, cur, state).await,
            None => self.reporter.report(app, None, state, String::new()).await,
        }
    }

    /// What the device is for `app` while it is not installing: running a release, or
    /// never installed one.
    fn running_or_idle(&self, app: &str) -> Result<DeviceState> {
        let state = self.store.load_state()?;
        Ok(
            match state.apps.get(app).is_some_and(|a| a.current.is_some()) {
                true => DeviceState::Active,
                false => DeviceState::Idle,
            },
        )
    }

    /// Whether this device may start release `m` now: `Ok(true)` yes, `Ok(false)` never
    /// (another group's release, or no wave reaches this device's seed), `Err(NotYet)`
    /// later (its wave, or a hold on the release). Decided from the signed manifest and
    /// hold list alone, so it holds with the hub down.
    fn admit(&self, m: &proto::manifest::Manifest) -> Result<bool, NotYet> {
        use proto::rollout::Admission;
        let now = self.trust.clock.now();
        // The tags the operator assigned, never those device.toml declares.
        let revoked = self.trust.revoked();
        let me = proto::rollout::Me {
            name: &self.cfg.name,
            tags: revoked.list.as_ref().map_or(&[], |l| l.tags_of(&self.key)),
            seed: self.seed,
        };
        let in_secs =
            |at: u64| std::time::Instant::now() + Duration::from_secs(at.saturating_sub(now));
        match m.rollout.admission(&me, m.created_at, now) {
            // Tags are assigned by the hub, and may be after the release: asked again.
            Admission::NotTargeted if !m.rollout.tags.is_empty() => {
                return Err(NotYet::NotAssigned {
                    targets: m.rollout.target_names().join(", "),
                    me: self.cfg.name.clone(),
                    tags: me.tags.join(", "),
                    until: std::time::Instant::now() + UNASSIGNED_RECHECK,
                });
            }
            Admission::NotTargeted => {
                tracing::info!(app = %m.app, release = m.release, "not installing: the release targets {} and this device is {}", m.rollout.target_names().join(", "), self.cfg.name);
                return Ok(false);
            }
            Admission::NoWave => {
                tracing::info!(app = %m.app, release = m.release, seed = self.seed, "not installing: no wave of {} reaches this device", m.rollout.waves_text());
                return Ok(false);
            }
            Admission::At(at) => {
                // A hold says more than a wave to come (and lifts only by a new list).
                self.check_hold(m)?;
                return Err(NotYet::Wave {
                    at,
                    until: in_secs(at),
                });
            }
            Admission::Now => {}
        }
        self.check_hold(m)?;
        Ok(true)
    }

    /// Refuses to start a held release (looked at again in a minute, or at the next
    /// hold list).
    fn check_hold(&self, m: &proto::manifest::Manifest) -> Result<(), NotYet> {
        let holds = self.trust.holds();
        match holds
            .as_ref()
            .and_then(|h| h.0.of(&m.app, &m.channel, m.release))
        {
            Some(h) => Err(NotYet::Held {
                kind: h.kind,
                reason: h.reason.clone(),
                until: std::time::Instant::now() + HELD_RECHECK,
            }),
            None => Ok(()),
        }
    }

    /// Refuses a release that would take the store past `store_budget_mib`: its missing
    /// chunks and its slot on top of what is kept, after what no kept release needs went.
    fn check_budget(&self, m: &proto::manifest::Manifest) -> Result<(), OverBudget> {
        const MIB: u64 = 1024 * 1024;
        let budget = self.cfg.store_budget_mib.saturating_mul(MIB);
        if budget == 0 {
            return Ok(());
        }
        let needed = |s: &Store| s.usage() + s.missing_bytes(m) + m.image_size;
        if needed(&self.store) > budget {
            self.collect_garbage();
        }
        let needed = needed(&self.store);
        if needed > budget {
            return Err(OverBudget {
                release: m.release,
                needed_mib: needed.div_ceil(MIB),
                budget_mib: self.cfg.store_budget_mib,
            });
        }
        Ok(())
    }

    /// Refuses a release the store's file system has no room for (its missing chunks and
    /// its slot) before anything of it is fetched: a download that fills the disk fails
    /// half-way, and nothing else (the state, the status file) can be written meanwhile.
    fn check_room(&self, m: &proto::manifest::Manifest) -> Result<(), DiskFull> {
        let Some(free) = (self.free_bytes)(&self.store) else {
            return Ok(());
        };
        let needed = self.store.missing_bytes(m) + m.image_size;
        if free >= needed {
            return Ok(());
        }
        Err(DiskFull {
            release: m.release,
            needed,
            free,
            dir: self.store.dir().to_path_buf(),
        })
    }

    /// Served on demand: the pool owns its instances; the updater only boots a new release
    /// once, to prove it healthy before the pool serves it.
    pub(super) fn is_ondemand(&self, app: &str) -> bool {
        self.cfg.ondemand.iter().any(|o| o.app == app)
    }

    pub(super) fn domain_name(&self, app: &str, release: u64) -> String {
        format!("uf-{}-{app}-r{release}", self.cfg.name)
    }

    /// Runs a download step unless the agent shuts down first: a download may be dropped
    /// at any await (chunks are stored whole or not at all), an activation may not, so
    /// only these steps are cut short.
    async fn abandoned_at_shutdown<T>(
        &self,
        step: impl std::future::Future<Output = Result<T, DownloadError>>,
        failed: fn(DownloadError) -> InstallError,
    ) -> Result<T, InstallError> {
        tokio::select! {
            r = step => r.map_err(failed),
            _ = self.tasks.cancelled() => Err(InstallError::ShuttingDown),
        }
    }
}

impl Updater {
    async fn update(&self, heard: &Heard) -> Result<(), InstallError> {
        let ann = &heard.ann;
        let Some(installed) = self.still_wanted(heard)? else {
            return Ok(());
        };
        let expect = Expectations {
            app: Some(&ann.app),
            channel: &self.cfg.channel,
            platform: self.platform,
            installed_release: Some(installed),
        };
        // The manifest: fetched by digest, then verified like the announcement.
        let banned = crate::fetch::Banned::default();
        let manifest_bytes = self
            .abandoned_at_shutdown(
                self.fetcher.manifest(&ann.manifest, &banned),
                InstallError::FetchManifest,
            )
            .await?;
        let (root, now) = (self.trust.root(), self.trust.clock.now());
        let verified: VerifiedManifest = verify_manifest(&manifest_bytes, &root, &expect, now)?;
        if verified.digest() != ann.manifest || verified.manifest().release != ann.release {
            return Err(InstallError::Mismatch);
        }
        self.check_budget(verified.manifest())?;
        self.store
            .put_manifest(&verified.digest(), &manifest_bytes)?;
        // Peers may fetch it from here now (at 1,000 devices, a manifest from the hub for
        // each was about another copy of a 1 MiB image).
        self.fetcher.report_stored(Some(verified.digest()));
        let m = verified.manifest();
        if !self.admit(m)? {
            // Said once per release, so the hub sees the device (and that it is not
            // part of this rollout) even before it ever installed anything.
            let state = self.running_or_idle(&m.app)?;
            self.report_running(&m.app, state).await;
            return Ok(());
        }
        self.install(heard, &verified, &banned).await
    }

    /// Whether the announced release is still to be installed (checked again: time has
    /// passed — a retry, a backoff — and the root may have moved): the release installed
    /// (or the highest seen), or `None` to do nothing.
    fn still_wanted(&self, heard: &Heard) -> Result<Option<u64>> {
        let ann = &heard.ann;
        let state = self.store.load_state()?;
        let app_state = state.apps.get(&ann.app).cloned().unwrap_or_default();
        if app_state.failed.contains(&ann.release) {
            tracing::info!(app = %ann.app, release = ann.release, "release failed here before; not retrying");
            return Ok(None);
        }
        let installed = app_state
            .highest_seen
            .max(app_state.current.as_ref().map_or(0, |c| c.release));
        let expect = Expectations {
            app: Some(&ann.app),
            channel: &self.cfg.channel,
            platform: self.platform,
            installed_release: Some(installed),
        };
        let (root, now) = (self.trust.root(), self.trust.clock.now());
        let checked = verify_announcement(&heard.bytes, &root, now)
            .and_then(|a| expect.applies(&a).map(|()| a));
        match checked {
            Ok(_) => {}
            Err(source @ VerifyError::Expired { .. }) => {
                // Lapsed while it waited (a retry's pause, the hub down): tried again, with
                // the fresh bytes the router hands over once the hub signs them again.
                return Err(InstallError::Lapsed {
                    release: ann.release,
                    source,
                });
            }
            // Most often the release we already run, announced again; at worst a replay.
            Err(
                e @ VerifyError::Rollback {
                    offered, installed, ..
                },
            ) if offered == installed => {
                tracing::debug!("already installed: {e}");
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(app = %ann.app, "refusing announcement: {e}");
                return Ok(None);
            }
        }
        tracing::info!(app = %ann.app, release = ann.release, version = %ann.version, "new release announced");
        self.metrics
            .last_announcement_ms
            .store(heard.verified_ms, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(installed))
    }

    /// Fetches the release's chunks, assembles its slot, records it pending and activates.
    async fn install(
        &self,
        heard: &Heard,
        verified: &VerifiedManifest,
        banned: &crate::fetch::Banned,
    ) -> Result<(), InstallError> {
        let (ann, m) = (&heard.ann, verified.manifest());
        self.check_room(m)?;
        self.abandoned_at_shutdown(
            self.fetcher.chunks(m, &self.reporter, ann, banned),
            InstallError::FetchChunks,
        )
        .await?;
        self.metrics.last_fetched_ms.store(
            crate::metrics::unix_ms(),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.reporter
            .report(&ann.app, Some(ann), DeviceState::Installing, String::new())
            .await;
        let store = self.store.clone();
        let mc = m.clone();
        let slot = self
            .tasks
            .spawn_blocking(move || store.assemble(&mc))
            .await
            .map_err(|e| InstallError::Blocking("assembling the image", e))??;
        // Halted while it downloaded: not started (the chunks stay for a resume).
        self.check_hold(m)?;
        crash_point(&self.cfg, "assembled");
        let new = Installed {
            release: m.release,
            version: m.version.to_string(),
            manifest: verified.digest(),
            slot,
            accel: None,
        };
        let pending = new.clone();
        self.transition(&m.app, move |st| st.installed(pending))
            .await?;
        crash_point(&self.cfg, "installed");
        self.activate(m, new).await
    }
}
