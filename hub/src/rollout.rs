//! Rollouts on the hub: the halt monitor (pure: reports in, halt verdicts out), the
//! signed hold list in the store, and `hub rollout status`.
//!
//! Devices decide their own waves from the signed manifest (`proto::rollout`); what the
//! hub adds is the one thing only it can see: failures across the fleet. When a release's
//! halt policy is crossed, the hub signs a new hold list with its rollout key (a role that
//! can hold releases and nothing else), commits it and spreads it like the revocation
//! list, so devices that have not installed the release stop even with the hub gone.

use crate::home::{now, Home, HomeError, KeyError};
use crate::inventory::{DeviceEntry, Inventory};
use crate::store::{Change, Event, ListError, Store, StoreError};
use proto::rollout::{HaltPolicy, Hold, HoldKind, Holds, Rollout};
use proto::root::TrustedRoot;
use proto::status::DeviceState;
use proto::{PublicKey, SecretKey};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Where the signed hold list lives in the store.
pub const HOLDS_PATH: &str = "holds.bin";

/// Why a release's hold could not be changed, or its rollout read.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Holds(#[from] ListError),
    #[error(
        "{} is missing: this hub cannot pause or halt releases. Give it the root's rollout \
         key (`hub init --rollout-key`, or rotate the root with `fwtool root rotate \
         --rollout-key` and `hub root publish`)",
        path.display()
    )]
    NoRolloutKey { path: std::path::PathBuf },
    #[error("{app} has no release on {channel} (see `hub releases {app}`)")]
    NoRelease { app: String, channel: String },
    #[error("{app} has no release {release} on {channel} (see `hub releases {app}`)")]
    NoSuchRelease {
        app: String,
        channel: String,
        release: u64,
    },
    #[error(
        "release {} of {} on {} is not held (see `hub rollout status {}`)",
        .0.release, .0.app, .0.channel, .0.app
    )]
    NotHeld(ReleaseKey),
    #[error("release {} of {} is already {}", .0.release, .0.app, .1.label())]
    Already(ReleaseKey, HoldKind),
    #[error("signing the hold list")]
    Sign(#[source] proto::codec::CodecError),
    #[error("{0} vanished")]
    Vanished(String),
    #[error("reading {path}")]
    Manifest {
        path: String,
        #[source]
        source: Box<proto::VerifyError>,
    },
    #[error("{path} does not verify against the hub's root")]
    Unverified {
        path: String,
        #[source]
        source: Box<proto::VerifyError>,
    },
}

type Result<T, E = RolloutError> = std::result::Result<T, E>;

/// A release of an (app, channel), all platforms.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ReleaseKey {
    pub app: String,
    pub channel: String,
    pub release: u64,
}

impl ReleaseKey {
    pub fn of(track: &proto::announcement::Track, release: u64) -> ReleaseKey {
        ReleaseKey {
            app: track.app.clone(),
            channel: track.channel.clone(),
            release,
        }
    }
}

/// The monitor's verdict: hold this release, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Halt {
    pub release: ReleaseKey,
    pub attempts: u32,
    pub failures: u32,
    pub reason: String,
}

/// Counts each device's outcome of each watched release and says when a release's halt
/// policy is crossed: at least `min_attempts` devices tried it and `max_failure_percent`
/// or more of them failed (rolled back after their probe). A device counts once per
/// release, by its newest outcome. A release is halted once.
#[derive(Debug, Default)]
pub struct Monitor {
    policies: BTreeMap<ReleaseKey, HaltPolicy>,
    /// Per release: device → failed?
    outcomes: BTreeMap<ReleaseKey, BTreeMap<String, bool>>,
    held: BTreeSet<ReleaseKey>,
}

impl Monitor {
    /// Watches `release` with `policy` (from its signed manifest).
    pub fn watch(&mut self, release: ReleaseKey, policy: HaltPolicy) {
        self.policies.insert(release, policy);
    }

    pub fn is_watched(&self, release: &ReleaseKey) -> bool {
        self.policies.contains_key(release)
    }

    /// Forgets every release but `current` (the newest of their tracks): one superseded
    /// is installed by nobody any more, and a hub running for years would otherwise keep
    /// every release's outcomes.
    pub fn keep_only(&mut self, current: &BTreeSet<ReleaseKey>) {
        self.policies.retain(|k, _| current.contains(k));
        self.outcomes.retain(|k, _| current.contains(k));
        self.held.retain(|k| current.contains(k));
    }

    /// `release` is held already (by the operator or an earlier verdict).
    pub fn held(&mut self, release: ReleaseKey) {
        self.held.insert(release);
    }

    /// One device's report of `app` on `channel`: its state and the release it runs.
    pub fn report(
        &mut self,
        device: &str,
        app: &str,
        channel: &str,
        state: &DeviceState,
        release: Option<u64>,
    ) -> Option<Halt> {
        let (release, failed) = match (state, release) {
            (DeviceState::Active, Some(r)) => (r, false),
            (DeviceState::RolledBack { failed_release, .. }, _) => (*failed_release, true),
            _ => return None,
        };
        let key = ReleaseKey {
            app: app.into(),
            channel: channel.into(),
            release,
        };
        let policy = *self.policies.get(&key)?;
        let outcomes = self.outcomes.entry(key.clone()).or_default();
        outcomes.insert(device.into(), failed);
        if self.held.contains(&key) {
            return None;
        }
        let attempts = outcomes.len() as u32;
        let failures = outcomes.values().filter(|f| **f).count() as u32;
        let crossed = attempts >= policy.min_attempts
            && u64::from(failures) * 100
                >= u64::from(policy.max_failure_percent) * u64::from(attempts);
        if !crossed {
            return None;
        }
        self.held.insert(key.clone());
        Some(Halt {
            reason: format!(
                "{failures} of {attempts} attempts failed (halt at {}% of at least {})",
                policy.max_failure_percent, policy.min_attempts
            ),
            release: key,
            attempts,
            failures,
        })
    }

    /// Counts what the inventory says (a restarted hub, a release watched late); returns
    /// the verdicts that makes.
    pub fn seed(&mut self, inventory: &Inventory) -> Vec<Halt> {
        inventory
            .values()
            .filter_map(|e| self.report(&e.device, &e.app, &e.channel, &entry_state(e), e.release))
            .collect()
    }
}

/// The state an inventory entry records, as far as the monitor needs it.
fn entry_state(e: &DeviceEntry) -> DeviceState {
    match (e.state.as_str(), e.failed_release) {
        ("rolled-back", Some(failed_release)) => DeviceState::RolledBack {
            failed_release,
            reason: String::new(),
        },
        ("active", _) => DeviceState::Active,
        _ => DeviceState::Idle,
    }
}

/// The stored hold list, verified against `root` (`None`: nothing was ever held).
pub fn holds(store: &Store, root: &TrustedRoot) -> Result<Option<(Holds, Vec<u8>)>, ListError> {
    let Some(bytes) = store.read(HOLDS_PATH)? else {
        return Ok(None);
    };
    let list =
        proto::rollout::verify_holds(&bytes, root, 0).map_err(|source| ListError::Unverified {
            what: "hold list",
            source: Box::new(source),
        })?;
    Ok(Some((list, bytes)))
}

/// What to do to a release's hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldChange {
    Hold(HoldKind),
    Resume,
}

/// Holds or resumes `release`: the hold list one version up, signed with the rollout
/// key, committed with an event. Holds of releases no longer the newest of their (app,
/// channel) are dropped on the way (nobody installs them any more), so the list stays
/// small.
pub fn change_hold(
    store: &Store,
    root: &TrustedRoot,
    key: &SecretKey,
    release: &ReleaseKey,
    change: HoldChange,
    reason: &str,
) -> Result<Holds> {
    let mut list = holds(store, root)?
        .map(|(l, _)| l)
        .unwrap_or_else(|| Holds {
            fleet: root.fleet().into(),
            ..Holds::default()
        });
    let existing = list
        .of(&release.app, &release.channel, release.release)
        .map(|h| h.kind);
    let kind = match (change, existing) {
        (HoldChange::Resume, None) => return Err(RolloutError::NotHeld(release.clone())),
        (HoldChange::Hold(k), Some(e)) if k == e => {
            return Err(RolloutError::Already(release.clone(), k))
        }
        (HoldChange::Hold(k), _) => Some(k),
        (HoldChange::Resume, Some(_)) => None,
    };
    list.held.retain(|h| {
        (&h.app, &h.channel, h.release) != (&release.app, &release.channel, release.release)
    });
    let newest = store.newest_number(&release.app, &release.channel)?;
    list.held.retain(|h| {
        h.app != release.app || h.channel != release.channel || Some(h.release) >= newest
    });
    if let Some(kind) = kind {
        list.held.push(Hold {
            app: release.app.clone(),
            channel: release.channel.clone(),
            release: release.release,
            kind,
            reason: reason
                .chars()
                .take(proto::rollout::MAX_REASON_LEN)
                .collect(),
            at: now(),
        });
    }
    list.version += 1;
    list.issued_at = now();
    commit_holds(store, key, &list, release, kind, reason)?;
    Ok(list)
}

/// The hold list signed with the rollout key and committed with its event.
fn commit_holds(
    store: &Store,
    key: &SecretKey,
    list: &Holds,
    release: &ReleaseKey,
    kind: Option<HoldKind>,
    reason: &str,
) -> Result<()> {
    let signed = list.seal().and_then(|mut env| {
        env.sign(key)?;
        env.encode()
    });
    let mut commit = Change::default();
    commit.put(HOLDS_PATH, signed.map_err(RolloutError::Sign)?);
    let verb = kind.map_or("resumed", HoldKind::label);
    commit.event(Event {
        at: now(),
        kind: format!("rollout-{verb}"),
        app: Some(release.app.clone()),
        channel: Some(release.channel.clone()),
        release: Some(release.release),
        device: None,
        detail: format!("{reason} (hold list version {})", list.version),
    });
    store.commit(
        &format!(
            "rollout: {} release {} {verb}",
            release.app, release.release
        ),
        &commit,
        None,
    )?;
    Ok(())
}

/// `hub rollout pause|resume|halt`: the same change, from the operator.
pub fn operator_change(
    home: &Home,
    app: &str,
    channel: &str,
    release: Option<u64>,
    change: HoldChange,
    reason: &str,
) -> Result<(ReleaseKey, Holds)> {
    let key = home
        .rollout_key()?
        .ok_or_else(|| RolloutError::NoRolloutKey {
            path: home.dir.join("keys/rollout.key"),
        })?;
    // Under an expired root too: a hold list is checked against the rollout role.
    let root = home.anchor_root()?;
    let store = home.store()?;
    let release = match release {
        Some(r) => r,
        None => newest(&store, app, channel)?,
    };
    if store.release(app, channel, release)?.is_empty() {
        return Err(no_such_release(app, channel, release));
    }
    let rk = ReleaseKey {
        app: app.into(),
        channel: channel.into(),
        release,
    };
    let reason = if reason.is_empty() {
        "by the operator"
    } else {
        reason
    };
    let list = change_hold(&store, &root, &key, &rk, change, reason)?;
    Ok((rk, list))
}

/// The newest release of `app` on `channel`.
fn newest(store: &Store, app: &str, channel: &str) -> Result<u64> {
    store
        .newest_number(app, channel)?
        .ok_or_else(|| RolloutError::NoRelease {
            app: app.into(),
            channel: channel.into(),
        })
}

fn no_such_release(app: &str, channel: &str, release: u64) -> RolloutError {
    RolloutError::NoSuchRelease {
        app: app.into(),
        channel: channel.into(),
        release,
    }
}

/// The rollout of a release from a manifest in the store (any platform's: they share
/// it), and when it was signed.
pub fn stored_rollout(
    store: &Store,
    root: &TrustedRoot,
    app: &str,
    channel: &str,
    release: u64,
) -> Result<Option<(Rollout, u64)>> {
    let Some(info) = store.release(app, channel, release)?.into_iter().next() else {
        return Ok(None);
    };
    let m = stored_manifest(store, root, &info)?;
    Ok(Some((m.rollout, m.created_at)))
}

/// A stored manifest, opened with the root of its day (see `TrustedRoot::open_stored`).
pub fn stored_manifest(
    store: &Store,
    root: &TrustedRoot,
    info: &crate::store::ReleaseInfo,
) -> Result<proto::manifest::Manifest> {
    let path = crate::store::release_path(&info.track, info.release, "manifest");
    let Some(bytes) = store.read(&path)? else {
        return Err(RolloutError::Vanished(path));
    };
    let env = match proto::envelope::Envelope::decode(&bytes, proto::codec::Kind::Manifest) {
        Ok(env) => env,
        Err(e) => {
            let source = Box::new(e);
            return Err(RolloutError::Manifest { path, source });
        }
    };
    root.open_stored(&env, |v| crate::store::root_link(store, v).ok().flatten())
        .map_err(|e| RolloutError::Unverified {
            path,
            source: Box::new(e),
        })
}

/// Counts of one wave's devices by where they are with the release.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WaveCounts {
    /// The share of seeds this wave reaches (basis points) and when it opens (Unix s).
    pub basis_points: u16,
    pub opens_at: u64,
    pub pending: u32,
    pub downloading: u32,
    pub active: u32,
    pub failed: u32,
    pub rolled_back: u32,
}

impl WaveCounts {
    /// Every device of the wave, wherever it stands.
    pub fn total(&self) -> u32 {
        self.pending + self.downloading + self.active + self.failed + self.rolled_back
    }
}

/// `hub rollout status`: one release's rollout.
#[derive(Clone, Debug, Serialize)]
pub struct RolloutStatus {
    pub release: ReleaseKey,
    pub waves: String,
    pub created_at: u64,
    /// The share of seeds admitted now (basis points).
    pub admitted: u16,
    pub targets: Vec<String>,
    pub halt_policy: Option<HaltPolicy>,
    pub hold: Option<Hold>,
    pub waves_detail: Vec<WaveCounts>,
    /// Devices of the channel the release does not target.
    pub not_targeted: u32,
}

/// Where `e` stands with `release`.
fn bucket(e: &DeviceEntry, release: u64) -> fn(&mut WaveCounts) -> &mut u32 {
    match e.state.as_str() {
        "rolled-back" if e.failed_release == Some(release) => |w| &mut w.rolled_back,
        "active" if e.release == Some(release) => |w| &mut w.active,
        "downloading" | "installing" if e.release == Some(release) => |w| &mut w.downloading,
        "failed" => |w| &mut w.failed,
        _ => |w| &mut w.pending,
    }
}

/// What rollout statuses are made from, read once for any number of releases (the
/// dashboard shows every app's each second).
#[derive(Debug)]
pub struct Sources {
    pub store: Store,
    pub root: TrustedRoot,
    pub inventory: std::sync::Arc<Inventory>,
    /// Enrolled keys by device name (their seeds place devices in waves).
    keys: BTreeMap<String, PublicKey>,
    holds: Option<Holds>,
    /// The revocation list: the tags the operator assigned each device.
    members: proto::revocation::Revocations,
}

impl Sources {
    pub fn read(home: &Home) -> Result<Sources> {
        let inventory = crate::inventory::load_inventory(home);
        Sources::with(home, home.store()?, std::sync::Arc::new(inventory))
    }

    /// From a store already open and an inventory at hand (the dashboard keeps its store
    /// open and takes the inventory `hub serve` publishes).
    pub fn with(
        home: &Home,
        store: Store,
        inventory: std::sync::Arc<Inventory>,
    ) -> Result<Sources> {
        let root = home.anchor_root()?;
        let keys = crate::inventory::load_devices(&store)?
            .into_values()
            .collect();
        let holds = holds(&store, &root)?.map(|(l, _)| l);
        let members = crate::trust::revocations(&store, &root)?
            .map(|(l, _)| l)
            .unwrap_or_default();
        Ok(Sources {
            inventory,
            store,
            root,
            keys,
            holds,
            members,
        })
    }
}

impl Sources {
    /// The tags the operator assigned the enrolled device `name`.
    pub fn assigned(&self, name: &str) -> &[String] {
        self.keys.get(name).map_or(&[], |k| self.members.tags_of(k))
    }
}

/// [`status_in`] from the home as it is now.
pub fn status(
    home: &Home,
    app: &str,
    channel: &str,
    release: Option<u64>,
) -> Result<RolloutStatus> {
    status_in(&Sources::read(home)?, app, channel, release)
}

/// The rollout of `release` (default: the newest) of `app` on `channel`, with its
/// devices counted per wave from the inventory and their enrolled keys' seeds.
pub fn status_in(
    src: &Sources,
    app: &str,
    channel: &str,
    release: Option<u64>,
) -> Result<RolloutStatus> {
    let Sources {
        store, root, holds, ..
    } = src;
    let release = match release {
        Some(r) => r,
        None => newest(store, app, channel)?,
    };
    let (rollout, created_at) = stored_rollout(store, root, app, channel, release)?
        .ok_or_else(|| no_such_release(app, channel, release))?;
    // Devices of a platform the release has no image for are not part of it.
    let platforms: Vec<proto::manifest::Platform> = store
        .release(app, channel, release)?
        .into_iter()
        .map(|i| i.track.platform)
        .collect();
    let hold = holds
        .as_ref()
        .and_then(|l| l.of(app, channel, release).cloned());
    let waves = if rollout.waves.is_empty() {
        vec![proto::rollout::Wave {
            basis_points: proto::rollout::SEED_SPACE,
            after_secs: 0,
        }]
    } else {
        rollout.waves.clone()
    };
    let mut detail: Vec<WaveCounts> = waves
        .iter()
        .map(|w| WaveCounts {
            basis_points: w.basis_points,
            opens_at: created_at.saturating_add(w.after_secs),
            ..WaveCounts::default()
        })
        .collect();
    let not_targeted = count_waves(
        src,
        &rollout,
        &platforms,
        (app, channel, release),
        &mut detail,
    );
    let targets = rollout.target_names();
    Ok(RolloutStatus {
        release: ReleaseKey {
            app: app.into(),
            channel: channel.into(),
            release,
        },
        waves: rollout.waves_text(),
        created_at,
        admitted: rollout.admitted_at(created_at, now()),
        targets,
        halt_policy: rollout.halt,
        hold,
        waves_detail: detail,
        not_targeted,
    })
}

/// Counts the release's devices into the wave their seed falls in, by state; returns how
/// many devices of the channel it does not target.
fn count_waves(
    src: &Sources,
    rollout: &Rollout,
    platforms: &[proto::manifest::Platform],
    (app, channel, release): (&str, &str, u64),
    detail: &mut [WaveCounts],
) -> u32 {
    let Sources {
        inventory,
        keys,
        members,
        ..
    } = src;
    let mut not_targeted = 0;
    for e in inventory.values() {
        if e.app != app
            || e.channel != channel
            || e.platform.is_some_and(|p| !platforms.contains(&p))
        {
            continue;
        }
        let Some(key) = keys.get(&e.device) else {
            continue;
        };
        let me = proto::rollout::Me {
            name: &e.device,
            tags: members.tags_of(key),
            seed: proto::rollout::seed(key),
        };
        if !rollout.targets(&me) {
            not_targeted += 1;
            continue;
        }
        if let Some(w) = detail.iter_mut().find(|w| me.seed < w.basis_points) {
            *bucket(e, release)(w) += 1;
        }
    }
    not_targeted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(release: u64) -> ReleaseKey {
        ReleaseKey {
            app: "hello".into(),
            channel: "stable".into(),
            release,
        }
    }

    fn rolled_back(release: u64) -> DeviceState {
        DeviceState::RolledBack {
            failed_release: release,
            reason: "probe".into(),
        }
    }

    #[test]
    fn a_release_is_halted_once_the_sample_fails_past_the_share() {
        let mut m = Monitor::default();
        m.watch(
            key(2),
            HaltPolicy {
                min_attempts: 3,
                max_failure_percent: 50,
            },
        );
        // Below the sample: no verdict however bad.
        assert_eq!(
            m.report("d1", "hello", "stable", &rolled_back(2), Some(1)),
            None
        );
        assert_eq!(
            m.report("d2", "hello", "stable", &rolled_back(2), Some(1)),
            None
        );
        // The same device again counts once.
        assert_eq!(
            m.report("d2", "hello", "stable", &rolled_back(2), Some(1)),
            None
        );
        let halt = m
            .report("d3", "hello", "stable", &DeviceState::Active, Some(2))
            .expect("2 of 3 failed, at least 50%");
        assert_eq!((halt.attempts, halt.failures), (3, 2));
        assert_eq!(halt.release, key(2));
        // Halted once.
        assert_eq!(
            m.report("d4", "hello", "stable", &rolled_back(2), Some(1)),
            None
        );
    }

    #[test]
    fn successes_keep_a_release_going_and_unwatched_releases_are_ignored() {
        let mut m = Monitor::default();
        m.watch(
            key(2),
            HaltPolicy {
                min_attempts: 2,
                max_failure_percent: 50,
            },
        );
        for d in ["d1", "d2", "d3"] {
            assert_eq!(
                m.report(d, "hello", "stable", &DeviceState::Active, Some(2)),
                None
            );
        }
        assert_eq!(
            m.report("d4", "hello", "stable", &rolled_back(2), Some(1)),
            None
        );
        // Release 3 has no policy: never halted by the hub.
        for d in ["d1", "d2", "d3"] {
            assert_eq!(
                m.report(d, "hello", "stable", &rolled_back(3), Some(2)),
                None
            );
        }
        // Another channel's release 2 is another release.
        assert_eq!(
            m.report("d1", "hello", "beta", &rolled_back(2), Some(1)),
            None
        );
    }

    #[test]
    fn superseded_releases_are_forgotten() {
        let mut m = Monitor::default();
        let policy = HaltPolicy {
            min_attempts: 2,
            max_failure_percent: 50,
        };
        m.watch(key(2), policy);
        assert_eq!(
            m.report("d1", "hello", "stable", &rolled_back(2), Some(1)),
            None
        );
        m.watch(key(3), policy);
        m.keep_only(&[key(3)].into_iter().collect());
        assert!(!m.is_watched(&key(2)) && m.is_watched(&key(3)));
        assert_eq!(m.outcomes.len(), 0);
        // Release 2's second failure no longer adds up to a halt.
        assert_eq!(
            m.report("d2", "hello", "stable", &rolled_back(2), Some(1)),
            None
        );
    }

    #[test]
    fn an_operator_hold_means_no_verdict() {
        let mut m = Monitor::default();
        m.watch(
            key(2),
            HaltPolicy {
                min_attempts: 1,
                max_failure_percent: 1,
            },
        );
        m.held(key(2));
        assert_eq!(
            m.report("d1", "hello", "stable", &rolled_back(2), Some(1)),
            None
        );
    }
}
