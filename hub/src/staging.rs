//! The staging gate: wait for an enrolled staging device's signed report on a candidate.
//!
//! `hub serve` keeps each device's latest accepted report (raw signed bytes) under
//! `HUB/reports/`; the gate reads those, so the verdict rests on the device's signature,
//! not on anything the hub computed.

use crate::home::{now, Home};
use crate::publish::{Progress, STAGING_CHANNEL};
use crate::store::{Change, Event, ReleaseInfo, Store};
use anyhow::{bail, Context, Result};
use proto::status::{verify_status, DeviceState, StatusReport};
use std::time::{Duration, Instant};

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
            devices: crate::serve::load_devices(store)?,
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
            self.devices = crate::serve::load_devices(store)?;
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

/// Waits for a staging device to report each of `candidates` (one release, one manifest per
/// platform) healthy: returns their signed reports in order, or an error naming the
/// platform that failed (with the console tail) or that no device reported within the
/// timeout. A report counts for the manifest it names, so each platform's staging device
/// passes only its own image.
pub fn await_verdicts(
    home: &Home,
    store: &Store,
    candidates: &[ReleaseInfo],
    timeout_secs: u64,
    progress: Progress<'_>,
) -> Result<Vec<Vec<u8>>> {
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    let mut last_note = String::new();
    let mut reports = Reports::new(store)?;
    let mut passed: Vec<Option<Vec<u8>>> = vec![None; candidates.len()];
    // Which candidate each staging device took up (a report naming its manifest): a
    // rolled-back report names the release the device is back on, not the one it tried.
    let mut tried: std::collections::HashMap<String, usize> = Default::default();
    let app = &candidates.first().context("nothing to stage")?.track.app;
    let (candidate, device, detail) = 'wait: loop {
        for (bytes, r) in reports.staging(home, store, app)? {
            if let Some(i) = candidates
                .iter()
                .position(|c| r.manifest == Some(c.manifest))
            {
                tried.insert(r.device.clone(), i);
            }
            // A device seen only rolled back (it failed between two looks): the release
            // failed all the same; with several platforms the first is named.
            let rolled_back = matches!(&r.state, DeviceState::RolledBack { failed_release, .. }
                if *failed_release == candidates[0].release);
            let Some(i) = tried.get(&r.device).copied().or(rolled_back.then_some(0)) else {
                continue;
            };
            let c = &candidates[i];
            let ours = r.manifest == Some(c.manifest);
            match &r.state {
                DeviceState::Active if ours && passed[i].is_none() => {
                    progress(&format!(
                        "staging passed on {} for {}: {} is healthy",
                        r.device, c.track.platform, c.track.app
                    ));
                    record_verdict(store, c, "staging-passed", &r.device, String::new())?;
                    passed[i] = Some(bytes);
                }
                DeviceState::RolledBack {
                    failed_release,
                    reason,
                } if *failed_release == c.release => {
                    break 'wait (
                        c.clone(),
                        r.device.clone(),
                        format!("{reason}; console: {}", r.console_tail.trim()),
                    );
                }
                DeviceState::Failed { reason } if ours => {
                    break 'wait (c.clone(), r.device.clone(), reason.clone())
                }
                DeviceState::Downloading { percent } if ours => {
                    let note = format!(
                        "staging device {} ({}): downloading {percent}%",
                        r.device, c.track.platform
                    );
                    if note != last_note {
                        progress(&note);
                        last_note = note;
                    }
                }
                _ => {}
            }
        }
        if passed.iter().all(Option::is_some) {
            return Ok(passed.into_iter().flatten().collect());
        }
        if Instant::now() >= deadline {
            let waiting: Vec<&ReleaseInfo> = candidates
                .iter()
                .zip(&passed)
                .filter(|(_, p)| p.is_none())
                .map(|(c, _)| c)
                .collect();
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
    bail!("staging failed {on}: {detail}")
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
        .context("recording the staging verdict")?;
    Ok(())
}
