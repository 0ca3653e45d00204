//! The pool's side of the hosted host: what its instances there cost (instance time and
//! connections: what a hosted provider bills), why it is not used when it is not, and
//! keeping the host clean — an instance that cannot be reached is given up, domains this
//! device left there (an agent killed, a stop that failed while the link was down) are
//! found by their metadata and stopped, and images of retired releases are deleted.

use super::{Image, Msg, OnDemandConfig, Pool, PoolContext};
use crate::autoscale::{Action, Event, InstanceId, Location};
use crate::hypervisor::ActivateError;
use proto::status::HostedUse;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// How often the hosted host is asked which of this pool's domains it runs.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(20);

/// The longest reason kept for a report (with room for the ellipsis).
const MAX_REASON: usize = proto::status::MAX_HOSTED_REASON - 3;

/// Why an instance on the hosted host was given up.
#[derive(Debug, thiserror::Error)]
pub(super) enum Loss {
    #[error("its instance cannot be reached: {0}")]
    Unreachable(std::io::Error),
    #[error("the hosted host no longer runs it")]
    Gone,
}

/// Instance time and connections on the hosted host since the agent started.
#[derive(Debug, Default)]
pub(super) struct Use {
    /// Ready instances there, since when.
    running: HashMap<InstanceId, Instant>,
    /// Time of instances there that have ended.
    ended: Duration,
    pub connections: u64,
    /// Why the hosted host is not used now.
    pub down: Option<String>,
    /// A sweep is under way (the host may be slow to answer: one at a time).
    pub sweeping: bool,
}

impl Use {
    pub fn ready(&mut self, id: InstanceId, now: Instant) {
        self.running.insert(id, now);
        self.down = None;
    }

    pub fn ended(&mut self, id: InstanceId, now: Instant) {
        if let Some(since) = self.running.remove(&id) {
            self.ended += now.saturating_duration_since(since);
        }
    }

    /// Instance time there so far, ended and running, in milliseconds.
    pub fn millis(&self, now: Instant) -> u64 {
        let running: Duration = self
            .running
            .values()
            .map(|&since| now.saturating_duration_since(since))
            .sum();
        (self.ended + running).as_millis() as u64
    }

    pub fn set_down(&mut self, reason: &dyn std::fmt::Display) {
        let mut reason = reason.to_string();
        if reason.len() > MAX_REASON {
            let cut = (0..=MAX_REASON)
                .rev()
                .find(|&i| reason.is_char_boundary(i))
                .unwrap_or(0);
            reason.truncate(cut);
            reason.push('…');
        }
        self.down = Some(reason);
    }
}

/// Whether instances of `image` may burst to the hosted host (one is configured, and
/// they can be reached and probed there); says why not when it matters.
pub(super) fn bursts(ctx: &PoolContext, cfg: &OnDemandConfig, image: &Image) -> bool {
    if ctx.remote.is_none() || cfg.max_remote == 0 {
        return false;
    }
    match OnDemandConfig::cannot_burst(&image.manifest) {
        None => true,
        Some(why) => {
            tracing::warn!(app = %cfg.app, release = image.manifest.release, "not bursting to the hosted host: {why}");
            false
        }
    }
}

impl Pool {
    /// What the hosted host served so far, for the report: `None` when this app does not
    /// burst (older hubs do not read the field: only reports that need it carry it).
    pub(super) fn hosted_use(&self) -> Option<HostedUse> {
        self.bursts.then(|| HostedUse {
            instance_ms: self.hosted.millis(Instant::now()),
            connections: self.hosted.connections,
            down: self.hosted.down.clone(),
        })
    }

    /// The start of the names of this pool's domains and images on the hosted host
    /// ([`crate::hypervisor::hosted::prefix`]: unique to fleet, device and app).
    pub(super) fn hosted_prefix(&self) -> String {
        crate::hypervisor::hosted::prefix(&self.ctx.fleet, &self.ctx.device, &self.cfg.app)
    }

    /// At start and after a roll-over: images of other releases than the current one are
    /// deleted from the hosted host, in the background (it may be down; instances of
    /// them that still drain have their kernels loaded already). Domains an earlier run
    /// left there go at the first sweep, which runs at once.
    pub(super) fn retire_remote(&self) {
        let Some(hv) = self.ctx.remote.clone() else {
            return;
        };
        let (app, keep) = (self.cfg.app.clone(), self.current());
        self.ctx
            .tasks
            .spawn(async move { retire(&hv, &app, &keep).await });
    }

    /// A launch of the current release: what the hosted host keeps.
    fn current(&self) -> crate::hypervisor::Launch {
        self.launch(format!("{}keep", self.hosted_prefix()), Location::Remote)
    }

    /// Asks the hosted host which of this pool's domains run (answered by [`Msg::Swept`]).
    pub(super) fn sweep(&mut self) {
        let Some(hv) = self.ctx.remote.clone() else {
            return;
        };
        if self.hosted.sweeping {
            return;
        }
        self.hosted.sweeping = true;
        let (prefix, tx) = (self.hosted_prefix(), self.tx.clone());
        self.ctx.tasks.spawn(async move {
            let _ = tx.send(Msg::Swept(hv.named(&prefix).await)).await;
        });
    }

    /// What the hosted host runs of this pool: domains not in the table are stopped (a
    /// stop that failed while it was unreachable); ready instances it no longer runs are
    /// given up.
    pub(super) fn swept(
        &mut self,
        found: Result<Vec<String>, ActivateError>,
        now: Instant,
    ) -> Vec<Action> {
        self.hosted.sweeping = false;
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(app = %self.cfg.app, "asking the hosted host: {e}");
                return vec![];
            }
        };
        for name in &found {
            let known = self
                .insts
                .values()
                .any(|i| i.at == Location::Remote && &i.name == name);
            if !known {
                tracing::info!(app = %self.cfg.app, instance = %name, "stopping a domain of this device the hosted host still runs");
                self.stop_domain(Location::Remote, name.clone());
            }
        }
        let gone: Vec<InstanceId> = self
            .insts
            .iter()
            .filter(|(_, i)| i.at == Location::Remote && i.endpoint.is_some())
            .filter(|(_, i)| !found.contains(&i.name))
            .map(|(id, _)| *id)
            .collect();
        gone.into_iter()
            .flat_map(|id| self.lose(id, Loss::Gone, now, 0))
            .collect()
    }

    /// A connection could not reach instance `id`: one on the hosted host is given up
    /// (the host, or the link to it, is down); a local one only loses that connection.
    pub(super) fn unreachable(
        &mut self,
        id: InstanceId,
        error: std::io::Error,
        now: Instant,
    ) -> Vec<Action> {
        match self.insts.get(&id).map(|i| i.at) {
            // The connection that says so asks again: not one of the lost.
            Some(Location::Remote) => self.lose(id, Loss::Unreachable(error), now, 1),
            Some(Location::Local) => self.scaler.handle(Event::Disconnected { now, id }),
            None => vec![],
        }
    }

    /// Gives up instance `id` on the hosted host: its connections are closed and
    /// counted (but the `asking` ones that found it unreachable and ask again), the
    /// scaler leaves the host alone for a while, the domain is stopped (or, while the
    /// host cannot be reached, by a later sweep).
    fn lose(&mut self, id: InstanceId, reason: Loss, now: Instant, asking: u32) -> Vec<Action> {
        let Some(i) = self.insts.remove(&id) else {
            return vec![];
        };
        let open = self.scaler.connections_of(id).saturating_sub(asking);
        tracing::warn!(app = %self.cfg.app, instance = %i.name, connections = open, "hosted instance lost: {reason}");
        i.cut.cancel();
        self.ctx
            .metrics
            .ondemand_lost
            .fetch_add(u64::from(open), Relaxed);
        self.hosted.ended(id, now);
        self.hosted.set_down(&reason);
        self.stop_domain(Location::Remote, i.name);
        let reason = reason.to_string();
        self.scaler
            .handle(Event::RemoteUnavailable { now, id, reason })
    }
}

/// Deletes the hosted host's images of `app` but `keep`'s.
async fn retire(hv: &crate::hypervisor::Hypervisor, app: &str, keep: &crate::hypervisor::Launch) {
    match hv.retire(app, Some(keep)).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(%app, images = n, "retired images deleted from the hosted host"),
        Err(e) => tracing::info!(%app, "retiring images on the hosted host: {e}"),
    }
}
