//! Holders reported silent: the tracker's (`tracker.rs`) policy for devices an asker says
//! did not deliver before its deadline — a frozen board, a process stopped by its OS, a
//! NAT path gone silent, a link at 1 KiB/s. Pure, time passed in.
//!
//! A suspect is named to nobody for [`SUSPECT_FOR`], twice as long each time it is
//! reported again after a suspicion ended, up to [`SUSPECT_MAX`]. A report is believed
//! only [`REPORT_AFTER`] the naming or later, and at most [`REPORTS_PER_ASKER`] times per
//! [`SUSPECT_FOR`] from one asker: one device, broken or malicious, can keep a few holders
//! out of the rotation for a while, not send the fleet to the hub.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How long a holder reported silent is named to nobody at first. Long enough for the
/// askers it was named to before the first report to come back (their deadlines are at
/// most 18 s); short enough that a board that hung and came back is a source again
/// within the release.
pub const SUSPECT_FOR: Duration = Duration::from_secs(20);
/// The longest suspicion; strikes are remembered this long after one ends.
pub const SUSPECT_MAX: Duration = Duration::from_secs(320);
/// A report sooner than this after the naming is not believed: no honest deadline is
/// shorter (a device gives a holder its 5 s of upload backlog at least).
pub const REPORT_AFTER: Duration = Duration::from_secs(5);
/// Reports taken from one asker per [`SUSPECT_FOR`]; beyond, they are ignored: a device
/// reporting every holder it is named would otherwise send the fleet to the hub.
pub const REPORTS_PER_ASKER: u32 = 4;

/// A holder reported silent: named to nobody until `until`; `strikes` counts the
/// reports that came after an earlier suspicion had ended.
#[derive(Debug, Clone, Copy)]
struct Suspicion {
    until: Instant,
    strikes: u32,
}

#[derive(Debug)]
pub struct Suspects<P> {
    suspects: HashMap<P, Suspicion>,
    /// Reports taken from each asker lately: how many, since when.
    reporters: HashMap<P, (u32, Instant)>,
}

impl<P> Default for Suspects<P> {
    fn default() -> Self {
        Suspects {
            suspects: HashMap::new(),
            reporters: HashMap::new(),
        }
    }
}

impl<P: Clone + Eq + Hash> Suspects<P> {
    /// Whether to believe a report from `asker` about holders named to it at `named_at`
    /// (counted against its share when believed).
    pub fn believe(&mut self, asker: &P, named_at: Instant, now: Instant) -> bool {
        if now.duration_since(named_at) < REPORT_AFTER {
            return false;
        }
        let taken = self.reporters.entry(asker.clone()).or_insert((0, now));
        if now.duration_since(taken.1) >= SUSPECT_FOR {
            *taken = (0, now);
        }
        if taken.0 >= REPORTS_PER_ASKER {
            return false;
        }
        taken.0 += 1;
        true
    }

    /// `holder` did not deliver: suspect from now on. False if it was suspect already
    /// (askers named it before the first report come back one by one).
    pub fn suspect(&mut self, holder: &P, now: Instant) -> bool {
        let strikes = match self.suspects.get(holder) {
            Some(s) if now < s.until => return false,
            Some(s) if now.duration_since(s.until) < SUSPECT_MAX => s.strikes + 1,
            _ => 1,
        };
        let factor = 1u32 << (strikes - 1).min(8);
        let until = now + (SUSPECT_FOR * factor).min(SUSPECT_MAX);
        self.suspects
            .insert(holder.clone(), Suspicion { until, strikes });
        true
    }

    /// Whether `p` may be named now.
    pub fn is_live(&self, p: &P, now: Instant) -> bool {
        self.suspects.get(p).is_none_or(|s| now >= s.until)
    }

    /// Holders suspect now.
    pub fn count(&self, now: Instant) -> u64 {
        self.suspects.values().filter(|s| now < s.until).count() as u64
    }

    /// Peers that went away: suspect or reporting no more.
    pub fn forget(&mut self, peer: impl Fn(&P) -> bool) {
        self.suspects.retain(|p, _| !peer(p));
        self.reporters.retain(|p, _| !peer(p));
    }

    /// Forgets what no longer counts: a suspicion once a new report would no longer
    /// double it, a reporter's share once it is renewed anyway.
    pub fn sweep(&mut self, now: Instant) {
        self.suspects
            .retain(|_, s| now.duration_since(s.until) < SUSPECT_MAX);
        self.reporters
            .retain(|_, (_, since)| now.duration_since(*since) < SUSPECT_FOR);
    }
}
