//! The supervisor: the I/O shell of [`crate::watchdog`] — a release that was healthy and
//! died, or stopped answering its probe, is restarted, then given up on.

use super::installer::{InstallError, Updater};
use crate::time::human_duration;

use crate::store::Installed;
use crate::watchdog::{Verdict as Watched, Watchdog};
use proto::status::DeviceState;

impl Updater {
    /// Between installs: a domain that was healthy and is found stopped — or, probed over
    /// its network interface, stops answering — is restarted, and after
    /// [`crate::watchdog::RESTARTS`] restarts within the watchdog's window the app goes
    /// back to its previous release.
    pub(super) async fn watch(&self, dog: &mut Watchdog) {
        let Ok(state) = self.store.load_state() else {
            return;
        };
        let now = std::time::Instant::now();
        for (app, st) in &state.apps {
            let Some(cur) = st.current.as_ref() else {
                continue;
            };
            // On-demand apps: the pool owns instances. A release given up on: left alone.
            if self.is_ondemand(app) || st.failed.contains(&cur.release) {
                continue;
            }
            let name = self.domain_name(app, cur.release);
            let (verdict, how) = if self.hypervisor.is_stopped(&name).await {
                (dog.died(app, cur.release, now), "found stopped".to_string())
            } else if dog.probe_due(app, cur.release, now) {
                let Some(why) = self.unanswered(cur).await else {
                    dog.answered(app, cur.release);
                    continue;
                };
                let Some(verdict) = dog.unanswered(app, cur.release, now) else {
                    tracing::warn!(%app, release = cur.release, "health probe unanswered: {why}");
                    continue;
                };
                // Running but serving nothing: stopped, so it boots afresh.
                let _ = self.hypervisor.stop(&name).await;
                let how = format!(
                    "not answering its health probe {} times in a row ({why})",
                    crate::watchdog::MISSES
                );
                (verdict, how)
            } else {
                continue;
            };
            self.revive(app, cur, verdict, &how).await;
        }
    }

    /// What a running release's probe saw when it went unanswered (see
    /// [`crate::probe::rechecks`]); `None` when it answered or cannot be rechecked.
    async fn unanswered(&self, cur: &Installed) -> Option<String> {
        let m = self.stored_manifest(&cur.manifest).ok()?;
        let launch = self.launch(&m, cur);
        if !crate::probe::rechecks(&launch) {
            return None;
        }
        crate::probe::alive(&self.hypervisor, &launch).await.err()
    }

    /// The watchdog's verdict on the current release of `app`, dead because `how`.
    async fn revive(&self, app: &str, cur: &Installed, verdict: Watched, how: &str) {
        let m = match self.stored_manifest(&cur.manifest) {
            Ok(m) => m,
            Err(e) => {
                let why = proto::Chain(&e);
                tracing::error!(%app, release = cur.release, "domain {how}; cannot restart it: {why}");
                return;
            }
        };
        match verdict {
            Watched::Restart { n } => {
                tracing::warn!(%app, release = cur.release, "domain {how}; restarting it ({n} of {} within {})", crate::watchdog::RESTARTS, human_duration(crate::watchdog::WINDOW));
                let launch = self.launch(&m, cur);
                match crate::probe::boot(&self.hypervisor, &launch).await {
                    Ok(_) => {
                        tracing::info!(%app, release = cur.release, "restarted; healthy again")
                    }
                    Err(e) => {
                        tracing::error!(%app, release = cur.release, "restarting: {e}");
                        // Stopped, so the next look counts it as dead again.
                        let _ = self.hypervisor.stop(&launch.name).await;
                    }
                }
            }
            Watched::GiveUp { deaths } => {
                let reason = format!(
                    "release {} stopped {deaths} times within {} after it was healthy (last: {how})",
                    cur.release,
                    human_duration(crate::watchdog::WINDOW)
                );
                if let Err(e) = self.give_up(app, &reason).await {
                    tracing::error!(%app, "{reason}; going back: {}", proto::Chain(&e));
                }
            }
        }
    }

    /// The current release of `app` keeps dying: it is marked failed (never installed
    /// again) and the previous release, if there is one, is started and reported.
    async fn give_up(&self, app: &str, reason: &str) -> Result<(), InstallError> {
        let (gave_up, _) = self.transition(app, |st| st.gave_up()).await?;
        let Some((failed, back)) = gave_up else {
            return Ok(());
        };
        self.metrics
            .rollbacks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let reported = DeviceState::RolledBack {
            failed_release: failed.release,
            reason: reason.to_string(),
        };
        let Some(prev) = back else {
            tracing::error!(%app, "{reason}; no earlier release to go back to, leaving it stopped");
            self.reporter
                .report_installed(
                    app,
                    &failed,
                    DeviceState::Failed {
                        reason: format!("{reason}; no earlier release to go back to"),
                    },
                )
                .await;
            return Ok(());
        };
        tracing::error!(%app, release = prev.release, "{reason}; going back to release {}", prev.release);
        let m = self.stored_manifest(&prev.manifest)?;
        crate::probe::boot(&self.hypervisor, &self.launch(&m, &prev)).await?;
        self.reporter.report_installed(app, &prev, reported).await;
        Ok(())
    }
}
