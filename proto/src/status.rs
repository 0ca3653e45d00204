//! Device status reports, signed by the device's own key.

use crate::codec::{CodecError, Kind};
use crate::envelope::Envelope;
use crate::error::{Invalid, VerifyError};
use crate::keys::{KeyId, PublicKey};
use crate::names;
use serde::{Deserialize, Serialize};

/// Where a device is with one app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    Idle,
    Downloading {
        percent: u8,
    },
    Installing,
    Active,
    /// The named release failed its health probe; the previous one is back in service.
    RolledBack {
        failed_release: u64,
        reason: String,
    },
    Failed {
        reason: String,
    },
    /// `release` is announced but this device's rollout wave opens only at `until` (Unix s).
    Waiting {
        release: u64,
        until: u64,
    },
    /// `release` is held (paused or halted) before this device installed it.
    Held {
        release: u64,
        kind: crate::rollout::HoldKind,
    },
}

impl DeviceState {
    pub fn label(&self) -> &'static str {
        match self {
            DeviceState::Idle => "idle",
            DeviceState::Downloading { .. } => "downloading",
            DeviceState::Installing => "installing",
            DeviceState::Active => "active",
            DeviceState::RolledBack { .. } => "rolled-back",
            DeviceState::Failed { .. } => "failed",
            DeviceState::Waiting { .. } => "waiting",
            DeviceState::Held { .. } => "held",
        }
    }

    /// For people, as of `now`: `waiting for release 4: its wave opens in 3m 0s`.
    pub fn describe(&self, now: u64) -> String {
        match self {
            DeviceState::Downloading { percent } => format!("downloading ({percent}%)"),
            DeviceState::RolledBack {
                failed_release,
                reason,
            } => format!("rolled back from release {failed_release}: {reason}"),
            DeviceState::Failed { reason } => format!("failed: {reason}"),
            DeviceState::Waiting { release, until } => format!(
                "waiting for release {release}: its rollout wave opens {}",
                human_ago(*until, now)
            ),
            DeviceState::Held { release, kind } => {
                format!("holding back release {release} ({})", kind.label())
            }
            other => other.label().into(),
        }
    }
}

/// One status report. `seq` grows with every report a device sends, so a replayed old
/// report is recognisable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub fleet: String,
    pub device: String,
    pub seq: u64,
    pub at: u64,
    pub app: String,
    pub channel: String,
    /// Release running (or being installed); `None` before the first install.
    pub release: Option<u64>,
    pub version: Option<String>,
    pub manifest: Option<crate::Digest>,
    pub state: DeviceState,
    pub bytes_from_peers: u64,
    pub bytes_from_hub: u64,
    /// Last lines of the instance console, for failures.
    pub console_tail: String,
    /// For an app served on demand: its instances and scaling so far.
    pub ondemand: Option<OnDemandCounts>,
    /// How peers reach the device and how its bytes came (`None`: an agent that does not
    /// count them).
    pub network: Option<NetworkCounts>,
    /// The device's tags (`device enroll --tag`), which releases may target.
    pub tags: Vec<String>,
    /// What the device boots: which of a release's images is its own.
    pub platform: crate::manifest::Platform,
    /// The running instance's address on its network card, for an active release that
    /// has one and is not served on demand: where a staging hub runs the app's
    /// functional tests (`UNIFLEET_URL`).
    pub guest: Option<std::net::IpAddr>,
    /// For an app served on demand with a hosted host: what its instances there served.
    pub hosted: Option<HostedUse>,
}

/// How others can reach a device, as far as it can tell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reachability {
    /// Not known yet (no hub has told it the address it sees it at).
    #[default]
    Unknown,
    /// The hub sees it at an address it listens on: anyone can dial it.
    Public,
    /// Behind NAT, with a slot on the hub's relay: dialled through it, then upgraded to
    /// a direct connection by hole punching.
    Relayed,
    /// Behind NAT without a relay slot: it can only dial out.
    Unreachable,
}

impl Reachability {
    pub fn label(self) -> &'static str {
        match self {
            Reachability::Unknown => "unknown",
            Reachability::Public => "public",
            Reachability::Relayed => "relayed",
            Reachability::Unreachable => "unreachable",
        }
    }
}

/// A device's network as of a report: its reachability, blob bytes received by path
/// since the agent started, and hole punches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkCounts {
    pub reachability: Reachability,
    /// From peers on its LAN (private addresses).
    pub bytes_lan: u64,
    /// From peers in other networks over direct connections (public or hole-punched).
    pub bytes_direct: u64,
    /// Through a relay (none, by design: requests wait for a direct connection).
    pub bytes_relayed: u64,
    /// From the hub.
    pub bytes_hub: u64,
    /// Relayed connections upgraded to direct ones by DCUtR, and upgrades that failed.
    pub hole_punches: u64,
    pub hole_punch_failures: u64,
}

impl NetworkCounts {
    /// "reachable relayed; bytes by path: lan 700, direct 300, relayed 0, hub 10; hole
    /// punches 1 (2 failed)", for `hub devices` and `device status`.
    pub fn summary(&self) -> String {
        format!(
            "reachable {}; bytes by path: lan {}, direct {}, relayed {}, hub {}; hole punches {} ({} failed)",
            self.reachability.label(),
            human_bytes(self.bytes_lan),
            human_bytes(self.bytes_direct),
            human_bytes(self.bytes_relayed),
            human_bytes(self.bytes_hub),
            self.hole_punches,
            self.hole_punch_failures
        )
    }
}

/// `n` bytes for people: "0 B", "980 B", "14.2 kB", "2.1 MB", "3.4 GB" (decimal units).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1000.0;
    let mut unit = 0;
    while v >= 999.95 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Seconds as people say them: `40s`, `5m 20s`, `3h 5m`, `59 days`.
pub fn human_secs(secs: u64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// `at` (Unix s) from `now`: `12s ago`, `5h 20m ago`, `in 3m 0s`.
pub fn human_ago(at: u64, now: u64) -> String {
    if at <= now {
        format!("{} ago", human_secs(now - at))
    } else {
        format!("in {}", human_secs(at - now))
    }
}

/// `at` (Unix s) as a wall-clock time `offset_secs` east of UTC (the caller's local
/// offset): `2026-12-04 20:20:55 +01:00`.
pub fn local_time(at: u64, offset_secs: i32) -> String {
    let t = at as i64 + i64::from(offset_secs);
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let (year, month, day) = civil_date(days);
    let sign = if offset_secs < 0 { '-' } else { '+' };
    let off = offset_secs.unsigned_abs();
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} {sign}{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60,
        off / 3600,
        off % 3600 / 60
    )
}

/// (year, month, day) of the day `days` after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, proleptic Gregorian).
pub fn civil_date(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// What the on-demand pool of one app is doing, as of the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnDemandCounts {
    /// Instances running (or booting) on the device itself.
    pub local: u32,
    /// Instances running (or booting) on the hosted overflow host.
    pub remote: u32,
    /// Instances booted to healthy since the agent started.
    pub boots: u64,
    /// Sum of their boot-to-healthy times, in milliseconds (mean = this / boots).
    pub boot_ms_total: u64,
    /// Start and stop decisions made by the autoscaler.
    pub decisions: u64,
}

impl OnDemandCounts {
    /// One line for people: `1 local, 1 hosted, 4 boots`.
    pub fn summary(&self) -> String {
        format!(
            "{} local, {} hosted, {} boots",
            self.local, self.remote, self.boots
        )
    }
}

/// What an app's instances on the hosted host served, since the agent started: what a
/// hosted provider bills.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostedUse {
    /// Instance time there, in milliseconds (as of the report).
    pub instance_ms: u64,
    /// Connections its instances there served.
    pub connections: u64,
    /// Why the hosted host is not used now (unreachable, refused, …), if it is not.
    pub down: Option<String>,
}

impl HostedUse {
    /// One line for people: `3m 20s of instance time, 57 connections; unavailable: …`.
    pub fn summary(&self) -> String {
        let mut text = format!(
            "{} of instance time, {} connection{}",
            human_secs(self.instance_ms / 1000),
            self.connections,
            if self.connections == 1 { "" } else { "s" }
        );
        if let Some(why) = &self.down {
            text += &format!("; hosted host unavailable: {why}");
        }
        text
    }
}

/// Most bytes of console kept in a report.
pub const MAX_CONSOLE_TAIL: usize = 2048;
/// Most bytes of [`HostedUse::down`] in a report.
pub const MAX_HOSTED_REASON: usize = 512;
/// Most tags one device may carry.
pub const MAX_TAGS: usize = 16;

/// A device's tags, as a report declares them or the revocation list assigns them: at
/// most [`MAX_TAGS`], each a name.
pub fn check_tags(tags: &[String]) -> Result<(), Invalid> {
    if tags.len() > MAX_TAGS {
        return Err(Invalid::TooManyTags {
            count: tags.len(),
            max: MAX_TAGS,
        });
    }
    for t in tags {
        names::check("tag", t)?;
    }
    Ok(())
}

impl StatusReport {
    /// Without hosted use (and without a guest address) it is written as reports were
    /// before those fields (which older hubs read): see
    /// [`crate::codec::Kind::appended_options`].
    pub fn seal(&self) -> Result<Envelope, CodecError> {
        let absent = match (&self.guest, &self.hosted) {
            (_, Some(_)) => 0,
            (Some(_), None) => 1,
            (None, None) => 2,
        };
        Envelope::new(crate::codec::encode_appended(
            Kind::StatusReport,
            self,
            absent,
        )?)
    }
}

/// The one entry point for status reports: the signer must be the enrolled key `lookup`
/// returns for the signature's key id, and the report must name a valid device and app.
pub fn verify_status(
    bytes: &[u8],
    lookup: impl Fn(&KeyId) -> Option<PublicKey>,
) -> Result<(PublicKey, StatusReport), VerifyError> {
    let env = Envelope::decode(bytes, Kind::StatusReport)?;
    let Some(first) = env.signatures.first() else {
        return Err(VerifyError::MissingSignature {
            kind: Kind::StatusReport,
        });
    };
    let Some(key) = lookup(&first.key_id) else {
        return Err(VerifyError::UnknownKey {
            kind: Kind::StatusReport,
            key_id: first.key_id,
        });
    };
    let role = crate::root::Role {
        keys: vec![key],
        threshold: 1,
    };
    let report: StatusReport = env.open("device", &role)?;
    let invalid = |reason: Invalid| VerifyError::Invalid {
        kind: Kind::StatusReport,
        reason,
    };
    names::check("device", &report.device).map_err(|e| invalid(e.into()))?;
    names::check("app", &report.app).map_err(|e| invalid(e.into()))?;
    names::check("channel", &report.channel).map_err(|e| invalid(e.into()))?;
    if report.console_tail.len() > MAX_CONSOLE_TAIL {
        return Err(invalid(Invalid::ConsoleTailTooLong));
    }
    let reason = report.hosted.as_ref().and_then(|h| h.down.as_ref());
    if reason.is_some_and(|r| r.len() > MAX_HOSTED_REASON) {
        return Err(invalid(Invalid::HostedReasonTooLong {
            max: MAX_HOSTED_REASON,
        }));
    }
    check_tags(&report.tags).map_err(invalid)?;
    Ok((key, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_people_write_them() {
        assert_eq!(local_time(0, 0), "1970-01-01 00:00:00 +00:00");
        assert_eq!(
            local_time(1_796_412_055, 3600),
            "2026-12-04 20:20:55 +01:00"
        );
        assert_eq!(
            local_time(1_709_164_800, -5 * 3600 - 1800),
            "2024-02-28 18:30:00 -05:30"
        );
        assert_eq!(human_ago(988, 1000), "12s ago");
        assert_eq!(human_ago(1000 + 180, 1000), "in 3m 0s");
        assert_eq!(human_secs(5 * 86_400), "5 days");
    }

    #[test]
    fn byte_counts_read_as_people_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1000), "1.0 kB");
        assert_eq!(human_bytes(14_200), "14.2 kB");
        assert_eq!(human_bytes(999_960), "1.0 MB");
        assert_eq!(human_bytes(2_140_000), "2.1 MB");
        assert_eq!(human_bytes(3_400_000_000), "3.4 GB");
        assert_eq!(human_bytes(u64::MAX), "18446744.1 TB");
    }
}
