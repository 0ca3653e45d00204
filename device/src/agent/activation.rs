//! Activation: a verified, assembled release booted, probed and made current, or the old
//! one restored; and, at start, what the state says should run brought back up.

use super::installer::{InstallError, Updater};
use crate::hypervisor::{ActivateError, Driver, Launch};
use crate::store::{AppState, Installed};
use proto::status::DeviceState;
use std::sync::atomic::Ordering;

type Result<T, E = InstallError> = std::result::Result<T, E>;

impl Updater {
    /// After a start: bring up what the state says should run; finish an interrupted install.
    pub(super) async fn resume(&self) -> Result<()> {
        let state = self.store.load_state()?;
        self.store.prune_slots(&state);
        for (app, st) in &state.apps {
            if let Some(pending) = &st.pending {
                tracing::info!(%app, release = pending.release, "resuming interrupted install");
                let m = self.stored_manifest(&pending.manifest)?;
                self.activate(&m, pending.clone()).await?;
            } else if let Some(cur) = &st.current {
                let m = self.stored_manifest(&cur.manifest)?;
                let launch = self.launch(&m, cur);
                let running = self.hypervisor.is_running(&launch.name).await;
                if self.is_ondemand(app) {
                    // The pool starts instances when connections arrive.
                    if running {
                        self.hypervisor.stop(&launch.name).await?;
                    }
                } else if !running {
                    tracing::info!(%app, release = cur.release, "starting installed release");
                    crate::probe::boot(&self.hypervisor, &launch).await?;
                }
                // Serving (an on-demand proxy listening) before reporting Active.
                self.start_ondemand(&m, cur).await;
                let guest = self.guest_address(&m, &launch.name).await;
                self.reporter.report_active(app, cur, guest).await;
            }
        }
        Ok(())
    }

    pub(super) fn stored_manifest(
        &self,
        digest: &proto::Digest,
    ) -> Result<proto::manifest::Manifest> {
        let bytes = self
            .store
            .get_blob(digest)
            .ok_or(InstallError::ManifestMissing(*digest))?;
        proto::envelope::Envelope::decode(&bytes, proto::codec::Kind::Manifest)
            .and_then(|env| self.trust.open_stored_manifest(&env))
            .map_err(|source| InstallError::ManifestUnverified {
                digest: *digest,
                source,
            })
    }

    /// How `inst`, a release of `m`, boots on this device.
    pub(super) fn launch(&self, m: &proto::manifest::Manifest, inst: &Installed) -> Launch {
        let name = self.domain_name(&m.app, m.release);
        Launch {
            console_log: self.store.dir().join(format!("{name}.console.log")),
            name,
            of: crate::hypervisor::ReleaseOf::of(m),
            platform: m.platform,
            image: inst.slot.clone(),
            boot: m.boot.clone(),
            nic: m.boot.network.then(|| self.cfg.nic().ok()).flatten(),
            domain_type: inst.accel.as_ref().map(|a| a.domain_type.clone()),
        }
    }

    /// Removes chunks and manifests that no kept release (current, pending, previous of
    /// any app) needs. Only between installs: a download in progress is not yet kept.
    pub(super) fn collect_garbage(&self) {
        let Ok(state) = self.store.load_state() else {
            return;
        };
        let mut keep = std::collections::BTreeSet::new();
        for st in state.apps.values() {
            for i in [&st.current, &st.pending, &st.previous]
                .into_iter()
                .flatten()
            {
                keep.insert(i.manifest);
                match self.stored_manifest(&i.manifest) {
                    Ok(m) => keep.extend(m.chunks.iter().map(|c| c.digest)),
                    // Without its chunk list nothing can be told unneeded.
                    Err(e) => {
                        let why = proto::Chain(&e);
                        tracing::warn!(release = i.release, "not collecting chunks: {why}");
                        return;
                    }
                }
            }
        }
        let (files, bytes) = self.store.remove_unneeded(&keep);
        if files > 0 {
            tracing::info!(
                files,
                bytes,
                "removed chunks and manifests no kept release needs"
            );
        }
    }

    /// Starts the on-demand proxy and pool for this release's app if it is configured, or
    /// rolls a running pool over to this release.
    pub(super) async fn start_ondemand(&self, m: &proto::manifest::Manifest, inst: &Installed) {
        let Some(od) = self.cfg.ondemand.iter().find(|o| o.app == m.app).cloned() else {
            return;
        };
        let image = crate::ondemand::Image {
            manifest: m.clone(),
            slot: inst.slot.clone(),
            domain_type: inst.accel.as_ref().map(|a| a.domain_type.clone()),
        };
        let mut pools = self.ondemand.lock().await;
        if let Some(pool) = pools.get(&m.app) {
            pool.roll_over(image).await;
            return;
        }
        let app = od.app.clone();
        let ctx = crate::ondemand::PoolContext {
            device: self.cfg.name.clone(),
            fleet: self.cfg.fleet.clone(),
            state_dir: self.cfg.state_dir.clone(),
            nic: self.cfg.nic().ok(),
            local: self.hypervisor.clone(),
            remote: self.hosted.clone(),
            remote_nic: self.cfg.hosted.as_ref().and_then(|h| h.nic().ok()),
            metrics: self.metrics.clone(),
            reporter: self.reporter.clone(),
            tasks: self.tasks.clone(),
        };
        match crate::ondemand::start(ctx, od, image).await {
            Ok(handle) => {
                pools.insert(app, handle);
            }
            Err(e) => tracing::error!("on-demand: {}", proto::Chain(&e)),
        }
    }

    /// A named transition of `app`'s state ([`AppState`]'s methods), written and synced on
    /// a blocking thread of the tree.
    pub(super) async fn transition<T: Send + 'static>(
        &self,
        app: &str,
        change: impl FnOnce(&mut AppState) -> T + Send + 'static,
    ) -> Result<(T, crate::store::State)> {
        let (store, app) = (self.store.clone(), app.to_string());
        let written = self
            .tasks
            .spawn_blocking(move || store.update_app(&app, change))
            .await
            .map_err(|e| InstallError::Blocking("writing the state", e))?;
        Ok(written?)
    }

    /// Boots `new`, probes it, and either retires the old release or restores it.
    pub(super) async fn activate(
        &self,
        m: &proto::manifest::Manifest,
        mut new: Installed,
    ) -> Result<()> {
        if self.cfg.domain_type == "auto" && self.hypervisor.driver() == Driver::Qemu {
            new.accel = crate::accel::measure(&self.hypervisor, &self.launch(m, &new)).await;
            if let Some(accel) = &new.accel {
                tracing::info!(app = %m.app, release = m.release, "accelerator {}: {}", accel.domain_type, accel.why);
            }
        }
        let launch = self.launch(m, &new);
        match crate::probe::boot(&self.hypervisor, &launch).await {
            Ok(_) => self.promote(m, new, &launch).await,
            Err(e) if !e.blames_the_release() => {
                // libvirt or the address pool failed, not the release: what may have
                // started is stopped, the release stays pending, and the attempt is
                // retried with the installer's backoff.
                let _ = self.hypervisor.stop(&launch.name).await;
                Err(InstallError::NotTheRelease {
                    release: m.release,
                    source: e,
                })
            }
            Err(e) => self.roll_back(m, new, &launch, e).await,
        }
    }

    /// `new` booted healthy: the old release retires and `new` becomes current.
    async fn promote(
        &self,
        m: &proto::manifest::Manifest,
        new: Installed,
        launch: &Launch,
    ) -> Result<()> {
        // The old domain stops before the state says `new` is current: a crash in
        // between leaves `new` pending, activated again at the next start.
        let state = self.store.load_state()?;
        let running = state.apps.get(&m.app).and_then(|a| a.current.as_ref());
        if let Some(old) = running.filter(|o| o.release != new.release) {
            let name = self.domain_name(&m.app, old.release);
            if let Err(e) = self.hypervisor.stop(&name).await {
                tracing::warn!("retiring old domain: {e}");
            }
        }
        let current = new.clone();
        let (_, state) = self
            .transition(&m.app, move |st| st.activated(current))
            .await?;
        if self.is_ondemand(&m.app) {
            tracing::info!(app = %m.app, release = m.release, "healthy; the on-demand pool serves it from now on");
            if let Err(e) = self.hypervisor.stop(&launch.name).await {
                tracing::warn!("stopping the health-check instance: {e}");
            }
        }
        self.store.prune_slots(&state);
        self.collect_garbage();
        self.metrics.activations.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .last_active_ms
            .store(crate::metrics::unix_ms(), Ordering::Relaxed);
        tracing::info!(app = %m.app, release = m.release, version = %m.version, "active and healthy");
        self.start_ondemand(m, &new).await;
        let guest = self.guest_address(m, &launch.name).await;
        self.reporter.report_active(&m.app, &new, guest).await;
        Ok(())
    }

    /// The address of `m`'s running instance `name`, for the report: only a release
    /// with a network card that runs as one instance (not on demand) has one to give.
    async fn guest_address(
        &self,
        m: &proto::manifest::Manifest,
        name: &str,
    ) -> Option<std::net::IpAddr> {
        if !m.boot.network || self.is_ondemand(&m.app) {
            return None;
        }
        self.hypervisor.address(name).await.ok().flatten()
    }

    /// `new` did not come up healthy: it is stopped and marked failed, the release that
    /// was current runs again, and the hub hears why with the console's tail.
    async fn roll_back(
        &self,
        m: &proto::manifest::Manifest,
        new: Installed,
        launch: &Launch,
        e: ActivateError,
    ) -> Result<()> {
        let tail = e.console_tail().to_string();
        self.metrics.rollbacks.fetch_add(1, Ordering::Relaxed);
        tracing::error!(app = %m.app, release = m.release, "activation failed, rolling back: {e}");
        let _ = self.hypervisor.stop(&launch.name).await;
        let release = new.release;
        let (old, _) = self
            .transition(&m.app, move |st| {
                st.activation_failed(release);
                st.current.clone()
            })
            .await?;
        if let Some(old) = &old {
            let om = self.stored_manifest(&old.manifest)?;
            let ol = self.launch(&om, old);
            if !self.hypervisor.is_running(&ol.name).await {
                crate::probe::boot(&self.hypervisor, &ol).await?;
            }
        }
        let reported = DeviceState::RolledBack {
            failed_release: new.release,
            reason: e.to_string(),
        };
        match &old {
            Some(old) => {
                self.reporter
                    .report_installed_with_tail(&m.app, old, reported, tail)
                    .await
            }
            None => self.reporter.report(&m.app, None, reported, tail).await,
        }
        Ok(())
    }
}
