//! The staging gate: wait for an enrolled staging device's signed report on a candidate.
//!
//! `hub serve` keeps each device's latest accepted report (raw signed bytes) under
//! `HUB/reports/`; the gate reads those, so the verdict rests on the device's signature,
//! not on anything the hub computed.

use crate::home::{now, Home};
use crate::store::{Change, Event, ReleaseInfo, Store, StoreError};
use proto::status::{verify_status, DeviceState, StatusReport};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The channel every release passes through before its target channel.
pub use proto::manifest::STAGING_CHANNEL;

/// Why the staging gate did not pass a release.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// Reading the enrolled keys.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("nothing to stage")]
    Empty,
    #[error("recording the staging verdict")]
    Record(#[source] StoreError),
    /// `on`: `on DEVICE (PLATFORM)`, or `for PLATFORM` when no device reported.
    #[error("staging failed {on}: {detail}")]
    Failed { on: String, detail: String },
}

type Result<T, E = StagingError> = std::result::Result<T, E>;

/// Progress lines for a terminal or a git push.
pub type Progress<'a> = &'a mut dyn FnMut(&str);

/// An instance that passed staging and still runs on its staging device: what an app's
/// functional tests are run against.
#[derive(Debug, Clone)]
pub struct Staged {
    pub platform: proto::manifest::Platform,
    pub device: String,
    /// Its address, as the device's signed report gives it (`None`: the device gave none:
    /// a release without a network card, or a device from before reports carried it).
    pub guest: Option<std::net::IpAddr>,
    /// The port its health probe speaks to (80 for a console probe).
    pub port: u16,
}

/// Why an app's functional tests refused a staged instance (the caller's own error).
pub type CheckError = Box<dyn std::error::Error + Send + Sync>;

/// Run on each staged instance before the release is signed; an error refuses it.
pub type Check<'a> = &'a mut dyn FnMut(&Staged, Progress<'_>) -> Result<(), CheckError>;

impl Staged {
    /// The staged instance of `m` that a healthy report (verified by the gate) describes.
    pub fn from_report(bytes: &[u8], m: &proto::manifest::Manifest) -> Staged {
        use proto::codec::Kind;
        let report = proto::envelope::Envelope::decode(bytes, Kind::StatusReport)
            .ok()
            .and_then(|env| {
                proto::codec::decode::<StatusReport>(Kind::StatusReport, &env.payload).ok()
            });
        let port = match m.boot.probe {
            proto::manifest::HealthProbe::Http { port, .. } => port,
            proto::manifest::HealthProbe::TcpConnect { port } if port != 0 => port,
            _ => 80,
        };
        Staged {
            platform: m.platform,
            device: report
                .as_ref()
                .map_or("(an unreadable report)".into(), |r| r.device.clone()),
            guest: report.and_then(|r| r.guest),
            port,
        }
    }
}

/// Where serve keeps a device's latest report for an app.
pub fn report_path(home: &Home, device: &str, app: &str) -> std::path::PathBuf {
    home.dir
        .join("reports")
        .join(format!("{device}--{app}.bin"))
}

/// How often the gate reloads the enrolled keys (a staging device enrolled while it waits).
const RELOAD_KEYS: Duration = Duration::from_secs(5);

/// A report file's (size, mtime) when read, and what it held if it verified.
type Seen = (
    (u64, std::time::SystemTime),
    Option<(Vec<u8>, StatusReport)>,
);

/// The staging reports of one app as `hub serve` keeps them, each verified once: a report
/// file is read and checked again only when it changed (the gate looks every 100 ms).
struct Reports {
    devices: std::collections::HashMap<proto::KeyId, (String, proto::PublicKey)>,
    loaded_at: Instant,
    /// Per report file: its (size, mtime) when read, and what it held if it verified.
    seen: std::collections::HashMap<std::path::PathBuf, Seen>,
}

impl Reports {
    fn new(store: &Store) -> Result<Reports> {
        Ok(Reports {
            devices: crate::inventory::load_devices(store)?,
            loaded_at: Instant::now(),
            seen: Default::default(),
        })
    }

    fn staging(
        &mut self,
        home: &Home,
        store: &Store,
        app: &str,
    ) -> Result<Vec<(Vec<u8>, StatusReport)>> {
        if self.loaded_at.elapsed() >= RELOAD_KEYS {
            self.devices = crate::inventory::load_devices(store)?;
            self.loaded_at = Instant::now();
            self.seen.clear();
        }
        let mut out = vec![];
        let Ok(entries) = std::fs::read_dir(home.dir.join("reports")) else {
            return Ok(out);
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            let stamp = (meta.len(), meta.modified().unwrap_or(std::time::UNIX_EPOCH));
            let path = e.path();
            if self.seen.get(&path).is_none_or(|(s, _)| *s != stamp) {
                let devices = &self.devices;
                let read = std::fs::read(&path).ok().and_then(|bytes| {
                    let (_, r) =
                        verify_status(&bytes, |id| devices.get(id).map(|(_, k)| *k)).ok()?;
                    Some((bytes, r))
                });
                self.seen.insert(path.clone(), (stamp, read));
            }
            if let Some((_, Some((bytes, r)))) = self.seen.get(&path) {
                if r.app == app && r.channel == STAGING_CHANNEL {
                    out.push((bytes.clone(), r.clone()));
                }
            }
        }
        Ok(out)
    }
}

/// What one staging report says about a candidate release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Candidate `i` is healthy on `device`.
    Passed { i: usize, device: String },
    /// Candidate `i` failed on `device` (the reason, with the console tail).
    Failed {
        i: usize,
        device: String,
        detail: String,
    },
    /// A progress line worth printing.
    Note(String),
}

/// The staging gate of one release, without I/O: staging reports in, verdicts out. Each
/// candidate is one platform's manifest; a report counts for the manifest it names, so
/// each platform's staging device passes only its own image.
#[derive(Debug)]
pub struct Gate {
    candidates: Vec<ReleaseInfo>,
    passed: Vec<Option<Vec<u8>>>,
    /// Which candidate each staging device took up (a report naming its manifest): a
    /// rolled-back report names the release the device is back on, not the one it tried.
    tried: HashMap<String, usize>,
    last_note: String,
}

impl Gate {
    pub fn new(candidates: &[ReleaseInfo]) -> Gate {
        Gate {
            candidates: candidates.to_vec(),
            passed: vec![None; candidates.len()],
            tried: HashMap::new(),
            last_note: String::new(),
        }
    }

    /// A verified staging report (`bytes` is its signed form, kept as evidence).
    pub fn report(&mut self, bytes: &[u8], r: &StatusReport) -> Option<Verdict> {
        let release = self.candidates.first()?.release;
        if let Some(i) = self
            .candidates
            .iter()
            .position(|c| r.manifest == Some(c.manifest))
        {
            self.tried.insert(r.device.clone(), i);
        }
        // A device seen only rolled back (it failed between two looks): the release
        // failed all the same; with several platforms the first is named.
        let rolled_back = matches!(&r.state,
            DeviceState::RolledBack { failed_release, .. } if *failed_release == release);
        let i = self
            .tried
            .get(&r.device)
            .copied()
            .or(rolled_back.then_some(0))?;
        let c = &self.candidates[i];
        let ours = r.manifest == Some(c.manifest);
        let device = r.device.clone();
        match &r.state {
            DeviceState::Active if ours && self.passed[i].is_none() => {
                self.passed[i] = Some(bytes.to_vec());
                Some(Verdict::Passed { i, device })
            }
            DeviceState::RolledBack { reason, .. } if rolled_back => Some(Verdict::Failed {
                i,
                device,
                detail: format!("{reason}; console: {}", r.console_tail.trim()),
            }),
            DeviceState::Failed { reason } if ours => Some(Verdict::Failed {
                i,
                device,
                detail: reason.clone(),
            }),
            DeviceState::Downloading { percent } if ours => {
                let note = format!(
                    "staging device {device} ({}): downloading {percent}%",
                    c.track.platform
                );
                (note != self.last_note).then(|| {
                    self.last_note = note.clone();
                    Verdict::Note(note)
                })
            }
            _ => None,
        }
    }

    /// Every candidate's signed healthy report, in order, once all passed.
    pub fn evidence(&self) -> Option<Vec<Vec<u8>>> {
        self.passed.iter().cloned().collect()
    }

    /// The candidates no staging device has passed yet.
    pub fn waiting(&self) -> Vec<&ReleaseInfo> {
        self.candidates
            .iter()
            .zip(&self.passed)
            .filter(|(_, p)| p.is_none())
            .map(|(c, _)| c)
            .collect()
    }
}

/// Waits for a staging device to report each of `candidates` (one release, one manifest per
/// platform) healthy: returns their signed reports in order, or an error naming the
/// platform that failed (with the console tail) or that no device reported within the
/// timeout.
pub fn await_verdicts(
    home: &Home,
    store: &Store,
    candidates: &[ReleaseInfo],
    timeout_secs: u64,
    progress: Progress<'_>,
) -> Result<Vec<Vec<u8>>> {
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    let mut reports = Reports::new(store)?;
    let mut gate = Gate::new(candidates);
    let app = &candidates.first().ok_or(StagingError::Empty)?.track.app;
    let (candidate, device, detail) = 'wait: loop {
        for (bytes, r) in reports.staging(home, store, app)? {
            match gate.report(&bytes, &r) {
                Some(Verdict::Passed { i, device }) => {
                    let c = &candidates[i];
                    progress(&format!(
                        "staging passed on {device} for {}: {} is healthy",
                        c.track.platform, c.track.app
                    ));
                    record_verdict(store, c, "staging-passed", &device, String::new())?;
                }
                Some(Verdict::Failed { i, device, detail }) => {
                    break 'wait (candidates[i].clone(), device, detail)
                }
                Some(Verdict::Note(note)) => progress(&note),
                None => {}
            }
        }
        if let Some(evidence) = gate.evidence() {
            return Ok(evidence);
        }
        if Instant::now() >= deadline {
            let waiting = gate.waiting();
            let names: Vec<&str> = waiting.iter().map(|c| c.track.platform.name()).collect();
            break (
                waiting[0].clone(),
                String::new(),
                format!(
                    "no staging device of {} reported within {timeout_secs} s (is `hub serve` \
                     running, with a device of that platform enrolled on the staging channel? \
                     Without one, publish with --no-staging-for {})",
                    names.join(", "),
                    names.join(" --no-staging-for ")
                ),
            );
        }
        // Reports arrive through `hub serve` as files; poll them with a deadline.
        std::thread::sleep(Duration::from_millis(100));
    };
    record_verdict(store, &candidate, "staging-failed", &device, detail.clone())?;
    tracing::error!(app = %candidate.track.app, "staging failed: {detail}");
    let platform = candidate.track.platform;
    let on = if device.is_empty() {
        format!("for {platform}")
    } else {
        format!("on {device} ({platform})")
    };
    Err(StagingError::Failed { on, detail })
}

fn record_verdict(
    store: &Store,
    c: &ReleaseInfo,
    kind: &str,
    device: &str,
    detail: String,
) -> Result<()> {
    let mut change = Change::default();
    change.event(Event {
        at: now(),
        kind: kind.into(),
        app: Some(c.track.app.clone()),
        channel: Some(STAGING_CHANNEL.into()),
        release: Some(c.release),
        device: (!device.is_empty()).then(|| device.to_string()),
        detail: format!(
            "{}{}{detail}",
            c.track.platform,
            if detail.is_empty() { "" } else { ": " }
        ),
    });
    store
        .commit(kind, &change, None)
        .map_err(StagingError::Record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::announcement::Track;
    use proto::manifest::Platform;
    use proto::Digest;

    fn candidate(platform: Platform, m: &[u8]) -> ReleaseInfo {
        ReleaseInfo {
            track: Track::new("hello", STAGING_CHANNEL, platform),
            release: 4,
            manifest: Digest::of(m),
        }
    }

    fn report(device: &str, manifest: Option<&[u8]>, state: DeviceState) -> StatusReport {
        StatusReport {
            fleet: "home".into(),
            device: device.into(),
            tags: vec![],
            platform: proto::manifest::Platform::QemuX86_64,
            seq: 1,
            at: 1,
            app: "hello".into(),
            channel: STAGING_CHANNEL.into(),
            release: Some(4),
            version: None,
            manifest: manifest.map(Digest::of),
            state,
            bytes_from_peers: 0,
            bytes_from_hub: 0,
            console_tail: "boom".into(),
            ondemand: None,
            network: None,
            guest: None,
            hosted: None,
        }
    }

    #[test]
    fn each_platform_passes_on_its_own_manifest_and_the_release_only_when_all_did() {
        let cs = [
            candidate(Platform::QemuX86_64, b"x86"),
            candidate(Platform::QemuAarch64, b"arm"),
        ];
        let mut gate = Gate::new(&cs);
        // Another release's report counts for nothing.
        assert_eq!(
            gate.report(b"r", &report("old", Some(b"other"), DeviceState::Active)),
            None
        );
        let arm_downloading = report(
            "arm",
            Some(b"arm"),
            DeviceState::Downloading { percent: 50 },
        );
        assert!(matches!(
            gate.report(b"r", &arm_downloading),
            Some(Verdict::Note(_))
        ));
        // The same progress is said once.
        assert_eq!(gate.report(b"r", &arm_downloading), None);
        let x86 = gate.report(
            b"x86 report",
            &report("x86", Some(b"x86"), DeviceState::Active),
        );
        assert_eq!(
            x86,
            Some(Verdict::Passed {
                i: 0,
                device: "x86".into()
            })
        );
        assert_eq!(gate.evidence(), None);
        assert_eq!(gate.waiting(), vec![&cs[1]]);
        let arm = gate.report(
            b"arm report",
            &report("arm", Some(b"arm"), DeviceState::Active),
        );
        assert_eq!(
            arm,
            Some(Verdict::Passed {
                i: 1,
                device: "arm".into()
            })
        );
        assert_eq!(
            gate.evidence(),
            Some(vec![b"x86 report".to_vec(), b"arm report".to_vec()])
        );
    }

    #[test]
    fn a_rollback_fails_the_platform_the_device_tried_even_naming_its_old_release() {
        let cs = [
            candidate(Platform::QemuX86_64, b"x86"),
            candidate(Platform::QemuAarch64, b"arm"),
        ];
        let mut gate = Gate::new(&cs);
        gate.report(b"r", &report("arm", Some(b"arm"), DeviceState::Installing));
        let back = DeviceState::RolledBack {
            failed_release: 4,
            reason: "never ready".into(),
        };
        // Back on its old release: the report names that manifest, not the candidate's.
        let verdict = gate.report(b"r", &report("arm", Some(b"old"), back.clone()));
        assert_eq!(
            verdict,
            Some(Verdict::Failed {
                i: 1,
                device: "arm".into(),
                detail: "never ready; console: boom".into()
            })
        );
        // A device first seen rolled back fails the release too (the first platform named).
        let mut gate = Gate::new(&cs);
        let verdict = gate.report(b"r", &report("new", None, back));
        assert!(matches!(verdict, Some(Verdict::Failed { i: 0, .. })));
    }
}
