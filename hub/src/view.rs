//! What the dashboard and its JSON API show, read from the hub's home: the inventory
//! (written by `hub serve` every second), the store's releases, rollouts and events, and
//! the devices' last signed reports. Synchronous (git2): callers run it on a blocking
//! thread. Rendering is `pages`; serving is `dashboard`.

use crate::home::{now, Home, HomeError};
use crate::inventory::{load_devices, load_inventory, DeviceEntry};
use crate::rollout::{stored_manifest, RolloutError, RolloutStatus};
use crate::store::{Event, StoreError};
use proto::keys::{KeyId, PublicKey};
use proto::status::StatusReport;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Why a page's view of the fleet could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    #[error(transparent)]
    List(#[from] crate::store::ListError),
}

type Result<T, E = ViewError> = std::result::Result<T, E>;

/// Most releases listed (newest first).
const MAX_RELEASES: usize = 50;
/// Most events shown on a device's page (newest first).
const MAX_DEVICE_EVENTS: usize = 50;

/// A device list filter (`?tag=beta&state=active`): empty fields match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, Serialize)]
pub struct Filter {
    #[serde(default)]
    pub tag: String,
    #[serde(default)]
    pub state: String,
}

impl Filter {
    pub fn matches(&self, e: &DeviceEntry) -> bool {
        (self.tag.is_empty() || e.tags.contains(&self.tag))
            && (self.state.is_empty() || e.state == self.state)
    }
}

/// One release (all platforms), with the evidence it was staged and who runs it.
#[derive(Clone, Debug, Serialize)]
pub struct ReleaseRow {
    pub app: String,
    pub channel: String,
    pub release: u64,
    pub version: String,
    pub platforms: Vec<String>,
    /// `passed (report 1a2b…)` or `skipped`.
    pub staging: String,
    pub waves: String,
    pub created_at: u64,
    /// Devices reporting it active.
    pub running: Vec<String>,
    /// For a release built from a push: its commit, and the digests of its build log and
    /// SBOM (served at `/provenance/DIGEST`).
    pub commit: Option<String>,
    pub log: Option<proto::Digest>,
    pub sbom: Option<proto::Digest>,
}

/// Everything the fleet pages show, as of `now`.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    pub now: u64,
    pub fleet: String,
    pub devices: Vec<DeviceEntry>,
    pub releases: Vec<ReleaseRow>,
    pub rollouts: Vec<RolloutStatus>,
    /// What the operator must act on, shown as a banner on every page.
    pub warnings: Vec<String>,
}

/// The inventory's entries with the tags the operator assigned (the ones releases
/// target) in place of those each device declares: what the dashboard shows and filters by.
fn with_assigned_tags(src: &crate::rollout::Sources) -> Vec<DeviceEntry> {
    src.inventory
        .values()
        .cloned()
        .map(|mut e| {
            e.tags = src.assigned(&e.device).to_vec();
            e
        })
        .collect()
}

impl Snapshot {
    /// Reads the home as it is now.
    pub fn read(home: &Home) -> Result<Snapshot> {
        Snapshot::of(&crate::rollout::Sources::read(home)?, &home.config.fleet)
    }

    /// Made from `src`: one read of the store, root, inventory and keys for every release
    /// and rollout.
    pub fn of(src: &crate::rollout::Sources, fleet: &str) -> Result<Snapshot> {
        let (store, root) = (&src.store, &src.root);
        let devices = with_assigned_tags(src);
        let mut infos = store.releases()?;
        infos.sort_by_key(|i| std::cmp::Reverse(i.release));
        let mut rows: BTreeMap<(String, String, u64), ReleaseRow> = BTreeMap::new();
        for info in infos.iter().take(MAX_RELEASES) {
            let key = (
                info.track.app.clone(),
                info.track.channel.clone(),
                info.release,
            );
            if let Some(row) = rows.get_mut(&key) {
                row.platforms.push(info.track.platform.to_string());
                continue;
            }
            let m = stored_manifest(store, root, info)?;
            let running = devices
                .iter()
                .filter(|d| {
                    d.app == m.app
                        && d.channel == m.channel
                        && d.release == Some(m.release)
                        && d.state == "active"
                })
                .map(|d| d.device.clone())
                .collect();
            rows.insert(
                key,
                ReleaseRow {
                    app: m.app.clone(),
                    channel: m.channel.clone(),
                    release: m.release,
                    version: m.version.to_string(),
                    platforms: vec![info.track.platform.to_string()],
                    staging: match &m.staging {
                        proto::manifest::Staging::Passed { report } => {
                            format!("passed (report {})", report.short())
                        }
                        proto::manifest::Staging::Skipped => "skipped".into(),
                    },
                    waves: m.rollout.waves_text(),
                    created_at: m.created_at,
                    running,
                    commit: m.provenance.as_ref().map(|p| p.commit.clone()),
                    log: m.provenance.as_ref().map(|p| p.log),
                    sbom: m.provenance.as_ref().and_then(|p| p.sbom),
                },
            );
        }
        let mut releases: Vec<ReleaseRow> = rows.into_values().collect();
        releases
            .sort_by(|a, b| (&a.app, &a.channel, b.release).cmp(&(&b.app, &b.channel, a.release)));
        let tracks: BTreeSet<(String, String)> = infos
            .iter()
            .filter(|i| i.track.channel != crate::publish::STAGING_CHANNEL)
            .map(|i| (i.track.app.clone(), i.track.channel.clone()))
            .collect();
        let rollouts = tracks
            .iter()
            .map(|(app, channel)| crate::rollout::status_in(src, app, channel, None))
            .collect::<Result<_, RolloutError>>()?;
        let now = now();
        Ok(Snapshot {
            now,
            fleet: fleet.to_string(),
            devices,
            releases,
            rollouts,
            warnings: crate::trust::root_warning(root.root(), now)
                .into_iter()
                .collect(),
        })
    }
}

/// One device's page: its entries (one per app), its events from the git log, its last
/// signed reports.
#[derive(Clone, Debug, Serialize)]
pub struct DevicePage {
    pub now: u64,
    pub name: String,
    pub entries: Vec<DeviceEntry>,
    pub events: Vec<Event>,
    /// Per app, the last report the hub verified and kept.
    pub reports: Vec<StatusReport>,
    /// As [`Snapshot::warnings`].
    pub warnings: Vec<String>,
}

impl DevicePage {
    /// `None`: no device of that name is enrolled or reported.
    pub fn read(home: &Home, name: &str) -> Result<Option<DevicePage>> {
        let store = home.store()?;
        let enrolled = load_devices(&store)?;
        let members = crate::trust::revocations(&store, &home.anchor_root()?)?
            .map(|(l, _)| l)
            .unwrap_or_default();
        let assigned = enrolled
            .values()
            .find(|(n, _)| n == name)
            .map_or(&[][..], |(_, k)| members.tags_of(k));
        // Shown as on the fleet page: the tags the operator assigned.
        let entries: Vec<DeviceEntry> = load_inventory(home)
            .into_values()
            .filter(|e| e.device == name)
            .map(|mut e| {
                e.tags = assigned.to_vec();
                e
            })
            .collect();
        if entries.is_empty() && !enrolled.values().any(|(n, _)| n == name) {
            return Ok(None);
        }
        let mut events: Vec<Event> = store
            .events()?
            .into_iter()
            .filter(|e| e.device.as_deref() == Some(name))
            .collect();
        events.reverse();
        events.truncate(MAX_DEVICE_EVENTS);
        let reports = entries
            .iter()
            .filter_map(|e| last_report(home, &enrolled, name, &e.app))
            .collect();
        let now = now();
        let warnings = crate::trust::root_warning(home.anchor_root()?.root(), now);
        Ok(Some(DevicePage {
            now,
            warnings: warnings.into_iter().collect(),
            name: name.into(),
            entries,
            events,
            reports,
        }))
    }
}

/// The signed report `hub serve` kept for (device, app), verified again against the
/// enrolled keys.
fn last_report(
    home: &Home,
    keys: &HashMap<KeyId, (String, PublicKey)>,
    device: &str,
    app: &str,
) -> Option<StatusReport> {
    let bytes = std::fs::read(crate::staging::report_path(home, device, app)).ok()?;
    proto::status::verify_status(&bytes, |id| keys.get(id).map(|(_, k)| *k))
        .ok()
        .map(|(_, r)| r)
}
