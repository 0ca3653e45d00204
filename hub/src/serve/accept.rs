//! Whether the hub takes a device's signed status report into its inventory, and what
//! the inventory then says (pure: the loop passes in what it knows and the time).

use crate::inventory::{DeviceEntry, Inventory};
use crate::store::Event;
use crate::store_owner::Devices;
use proto::keys::PublicKey;
use proto::status::{verify_status, DeviceState, StatusReport};
use proto::VerifyError;

/// The decision on one report.
#[derive(Debug)]
pub enum Judgement {
    /// A report newer than the last one of its device and app: record it.
    Accept(Box<StatusReport>),
    /// As new as, or older than, the one recorded (a duplicate or a replay): valid, so
    /// relayed, but nothing changes.
    Seen,
    /// Not taken.
    Dropped(Dropped),
}

/// Why a report was not taken.
#[derive(Debug, thiserror::Error)]
pub enum Dropped {
    #[error("dropping status report")]
    Unverified(#[source] VerifyError),
    /// Verified by a key that is no longer enrolled (not counted: nothing to warn about).
    #[error("dropping status report of a key no longer enrolled")]
    NotEnrolled,
    #[error("dropping status report of a revoked device ({device})")]
    Revoked { device: String },
    #[error("dropping status report signed by another device's key (enrolled {enrolled}, claimed {claimed})")]
    AnotherDevicesKey { enrolled: String, claimed: String },
}

impl Dropped {
    /// Counted as a dropped report (and logged): all but a key enrolled a moment ago.
    pub fn counts(&self) -> bool {
        !matches!(self, Dropped::NotEnrolled)
    }
}

/// A status report from MQTT or gossip is accepted only from an enrolled, unrevoked key,
/// for the device that key is enrolled as, and newer than the last one seen.
pub fn judge(
    bytes: &[u8],
    devices: &Devices,
    revoked: impl Fn(&PublicKey) -> bool,
    inventory: &Inventory,
) -> Judgement {
    let (key, report) = match verify_status(bytes, |id| devices.get(id).map(|(_, k)| *k)) {
        Ok(v) => v,
        Err(e) => return Judgement::Dropped(Dropped::Unverified(e)),
    };
    let Some((name, _)) = devices.get(&key.id()) else {
        return Judgement::Dropped(Dropped::NotEnrolled);
    };
    if revoked(&key) {
        let device = name.clone();
        return Judgement::Dropped(Dropped::Revoked { device });
    }
    if name != &report.device {
        return Judgement::Dropped(Dropped::AnotherDevicesKey {
            enrolled: name.clone(),
            claimed: report.device,
        });
    }
    if inventory
        .get(&entry_id(&report))
        .is_some_and(|e| e.seq >= report.seq)
    {
        return Judgement::Seen;
    }
    Judgement::Accept(Box::new(report))
}

/// The inventory's key of a report: `device/app`.
pub fn entry_id(r: &StatusReport) -> String {
    format!("{}/{}", r.device, r.app)
}

/// The inventory entry an accepted report makes, seen at `now`, and the event to keep in
/// git when its state or release changed from `old` (downloads make none: a percentage
/// a second is not history).
pub fn record(
    r: &StatusReport,
    old: Option<&DeviceEntry>,
    now: u64,
) -> (DeviceEntry, Option<Event>) {
    let detail = detail(r);
    let entry = DeviceEntry {
        device: r.device.clone(),
        app: r.app.clone(),
        channel: r.channel.clone(),
        release: r.release,
        version: r.version.clone(),
        manifest: r.manifest,
        state: r.state.label().into(),
        detail: detail.clone(),
        last_seen: now,
        seq: r.seq,
        bytes_from_peers: r.bytes_from_peers,
        bytes_from_hub: r.bytes_from_hub,
        ondemand: r.ondemand,
        hosted: r.hosted.clone(),
        network: r.network,
        tags: r.tags.clone(),
        platform: Some(r.platform),
        failed_release: match r.state {
            DeviceState::RolledBack { failed_release, .. } => Some(failed_release),
            _ => None,
        },
    };
    let changed = old.is_none_or(|old| old.state != entry.state || old.release != entry.release);
    let event = (changed && !matches!(r.state, DeviceState::Downloading { .. })).then(|| Event {
        at: now,
        kind: format!("device-{}", entry.state),
        app: Some(r.app.clone()),
        channel: Some(r.channel.clone()),
        release: r.release,
        device: Some(r.device.clone()),
        detail,
    });
    (entry, event)
}

/// The line the inventory shows beside the state.
fn detail(r: &StatusReport) -> String {
    match &r.state {
        DeviceState::Downloading { percent } => format!("{percent}%"),
        DeviceState::RolledBack {
            failed_release,
            reason,
        } => format!(
            "release {failed_release} failed: {reason}; console: {}",
            r.console_tail.trim()
        ),
        DeviceState::Failed { reason } => reason.clone(),
        DeviceState::Waiting { release, until } => format!(
            "release {release} at {} (its rollout wave)",
            crate::trust::human_time(*until)
        ),
        DeviceState::Held { release, kind } => format!("release {release} {}", kind.label()),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::SecretKey;

    fn report(device: &str, seq: u64, state: DeviceState) -> StatusReport {
        StatusReport {
            fleet: "home".into(),
            device: device.into(),
            tags: vec!["attic".into()],
            platform: proto::manifest::Platform::QemuX86_64,
            seq,
            at: 1,
            app: "hello".into(),
            channel: "stable".into(),
            release: Some(3),
            version: Some("1.0.3".into()),
            manifest: None,
            state,
            bytes_from_peers: 0,
            bytes_from_hub: 0,
            console_tail: " boom \n".into(),
            ondemand: None,
            network: None,
            guest: None,
            hosted: None,
        }
    }

    fn signed(r: &StatusReport, key: &SecretKey) -> Vec<u8> {
        let mut env = r.seal().unwrap();
        env.sign(key).unwrap();
        env.encode().unwrap()
    }

    fn enrolled(name: &str, key: &SecretKey) -> Devices {
        [(key.public().id(), (name.to_string(), key.public()))].into()
    }

    #[test]
    fn a_report_is_taken_only_from_the_enrolled_unrevoked_key_of_its_device() {
        let (a, b) = (SecretKey::from_seed([1; 32]), SecretKey::from_seed([2; 32]));
        let devices = enrolled("attic", &a);
        let inv = Inventory::new();
        let ok = signed(&report("attic", 1, DeviceState::Active), &a);
        let none = |_: &PublicKey| false;
        assert!(matches!(judge(&ok, &devices, none, &inv), Judgement::Accept(r) if r.seq == 1));
        let all = |_: &PublicKey| true;
        assert!(matches!(
            judge(&ok, &devices, all, &inv),
            Judgement::Dropped(Dropped::Revoked { device }) if device == "attic"
        ));
        let stranger = signed(&report("attic", 1, DeviceState::Active), &b);
        let d = judge(&stranger, &devices, none, &inv);
        assert!(matches!(&d, Judgement::Dropped(e @ Dropped::Unverified(_)) if e.counts()));
        let posing = signed(&report("cellar", 1, DeviceState::Active), &a);
        assert!(matches!(
            judge(&posing, &devices, none, &inv),
            Judgement::Dropped(Dropped::AnotherDevicesKey { enrolled, claimed })
                if enrolled == "attic" && claimed == "cellar"
        ));
        assert!(!judge(b"not a report", &devices, none, &inv).is_accepted());
    }

    #[test]
    fn a_report_no_newer_than_the_one_recorded_is_seen_not_taken() {
        let a = SecretKey::from_seed([1; 32]);
        let devices = enrolled("attic", &a);
        let (entry, _) = record(&report("attic", 5, DeviceState::Active), None, 10);
        let inv: Inventory = [("attic/hello".to_string(), entry)].into();
        let none = |_: &PublicKey| false;
        for seq in [4, 5] {
            let old = signed(&report("attic", seq, DeviceState::Idle), &a);
            assert!(matches!(judge(&old, &devices, none, &inv), Judgement::Seen));
        }
        let new = signed(&report("attic", 6, DeviceState::Idle), &a);
        assert!(judge(&new, &devices, none, &inv).is_accepted());
    }

    #[test]
    fn an_event_is_kept_when_state_or_release_change_and_never_for_downloads() {
        let active = report("attic", 1, DeviceState::Active);
        let (first, event) = record(&active, None, 10);
        assert_eq!(event.unwrap().kind, "device-active");
        assert_eq!(
            (first.last_seen, first.tags.clone()),
            (10, vec!["attic".into()])
        );
        let (_, again) = record(&report("attic", 2, DeviceState::Active), Some(&first), 11);
        assert!(again.is_none());
        let downloading = report("attic", 3, DeviceState::Downloading { percent: 40 });
        let (entry, none) = record(&downloading, Some(&first), 12);
        assert!(none.is_none());
        assert_eq!(
            (entry.state.as_str(), entry.detail.as_str()),
            ("downloading", "40%")
        );
        let back = DeviceState::RolledBack {
            failed_release: 4,
            reason: "probe".into(),
        };
        let (entry, event) = record(&report("attic", 4, back), Some(&first), 13);
        assert_eq!(entry.failed_release, Some(4));
        assert_eq!(entry.detail, "release 4 failed: probe; console: boom");
        assert_eq!(event.unwrap().kind, "device-rolled-back");
    }

    impl Judgement {
        fn is_accepted(&self) -> bool {
            matches!(self, Judgement::Accept(_))
        }
    }
}
