//! What to do when a release's domain, healthy at activation, is found stopped: a pure
//! state machine (time passed in). A domain that dies is restarted; one that dies more than
//! [`RESTARTS`] times within [`WINDOW`] is given up on, and the updater rolls back to the
//! previous release (or, with none, reports the release as failing and leaves it stopped).
//! The limit keeps a crash-looping image from burning a small board's CPU on boots.
//!
//! A domain can run and serve nothing (a hung unikernel): releases whose probe speaks to
//! the guest over its network interface are probed again every `probe_every` (by default
//! [`PROBE_EVERY`]), and
//! [`MISSES`] unanswered probes in a row count as a death.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Restarts allowed within [`WINDOW`] before the release is given up on.
pub const RESTARTS: usize = 3;
pub const WINDOW: Duration = Duration::from_secs(600);
/// How often a running release's health probe is tried again, by default.
pub const PROBE_EVERY: Duration = Duration::from_secs(10);
/// Unanswered probes in a row that count as a death (one lost answer is not).
pub const MISSES: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Start it again (the `n`th restart within the window).
    Restart { n: usize },
    /// It keeps dying: roll back, or stop trying.
    GiveUp { deaths: usize },
}

#[derive(Debug)]
pub struct Watchdog {
    /// How often a running release is probed again.
    probe_every: Duration,
    /// Per (app, release): when its domain was found dead, within the window.
    deaths: BTreeMap<(String, u64), VecDeque<Instant>>,
    /// Per (app, release): when it was last probed, and its unanswered probes in a row.
    probes: BTreeMap<(String, u64), (Instant, u32)>,
}

impl Watchdog {
    pub fn new(probe_every: Duration) -> Watchdog {
        Watchdog {
            probe_every,
            deaths: BTreeMap::new(),
            probes: BTreeMap::new(),
        }
    }

    /// The domain of `release` of `app` was found stopped at `now`.
    pub fn died(&mut self, app: &str, release: u64, now: Instant) -> Verdict {
        let deaths = self.deaths.entry((app.to_string(), release)).or_default();
        while deaths
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW)
        {
            deaths.pop_front();
        }
        deaths.push_back(now);
        if deaths.len() > RESTARTS {
            let n = deaths.len();
            self.deaths.remove(&(app.to_string(), release));
            Verdict::GiveUp { deaths: n }
        } else {
            Verdict::Restart { n: deaths.len() }
        }
    }

    /// Whether the running `release` of `app` is due for a liveness probe at `now`.
    pub fn probe_due(&mut self, app: &str, release: u64, now: Instant) -> bool {
        let key = (app.to_string(), release);
        match self.probes.get_mut(&key) {
            Some((at, _)) if now.saturating_duration_since(*at) < self.probe_every => false,
            Some((at, _)) => {
                *at = now;
                true
            }
            None => {
                // Just activated (healthy): the first probe one interval from now.
                self.probes.insert(key, (now, 0));
                false
            }
        }
    }

    /// The probe answered: misses start again from zero.
    pub fn answered(&mut self, app: &str, release: u64) {
        if let Some((_, misses)) = self.probes.get_mut(&(app.to_string(), release)) {
            *misses = 0;
        }
    }

    /// The probe went unanswered at `now`: after [`MISSES`] in a row, a death.
    pub fn unanswered(&mut self, app: &str, release: u64, now: Instant) -> Option<Verdict> {
        let entry = self
            .probes
            .entry((app.to_string(), release))
            .or_insert((now, 0));
        entry.1 += 1;
        if entry.1 < MISSES {
            return None;
        }
        entry.1 = 0;
        Some(self.died(app, release, now))
    }

    /// `app` moved to another release: what its old one did no longer counts.
    pub fn forget(&mut self, app: &str) {
        self.deaths.retain(|(a, _), _| a != app);
        self.probes.retain(|(a, _), _| a != app);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_up_to_the_limit_then_gives_up() {
        let (mut w, t) = (Watchdog::new(PROBE_EVERY), Instant::now());
        let verdicts: Vec<Verdict> = (0..4)
            .map(|k| w.died("a", 2, t + Duration::from_secs(k * 10)))
            .collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Restart { n: 1 },
                Verdict::Restart { n: 2 },
                Verdict::Restart { n: 3 },
                Verdict::GiveUp { deaths: 4 }
            ]
        );
    }

    #[test]
    fn a_hung_release_dies_after_misses_in_a_row_and_one_answer_forgives() {
        let (mut w, t) = (Watchdog::new(PROBE_EVERY), Instant::now());
        let at = |s| t + Duration::from_secs(s);
        assert!(!w.probe_due("a", 2, t), "not right after activation");
        assert!(!w.probe_due("a", 2, at(9)));
        assert!(w.probe_due("a", 2, at(10)));
        assert!(!w.probe_due("a", 2, at(15)));
        assert_eq!(w.unanswered("a", 2, at(10)), None);
        assert_eq!(w.unanswered("a", 2, at(20)), None);
        w.answered("a", 2);
        assert_eq!(w.unanswered("a", 2, at(30)), None);
        assert_eq!(w.unanswered("a", 2, at(40)), None);
        assert_eq!(
            w.unanswered("a", 2, at(50)),
            Some(Verdict::Restart { n: 1 })
        );
        // Counted afresh after the restart; deaths add up to giving up.
        for n in 2..=RESTARTS {
            for k in 0..MISSES {
                let v = w.unanswered("a", 2, at(60 + 10 * u64::from(k)));
                assert_eq!(v, (k + 1 == MISSES).then_some(Verdict::Restart { n }));
            }
        }
        let last: Vec<_> = (0..MISSES).map(|_| w.unanswered("a", 2, at(200))).collect();
        assert_eq!(last.last(), Some(&Some(Verdict::GiveUp { deaths: 4 })));
    }

    #[test]
    fn deaths_older_than_the_window_do_not_count() {
        let (mut w, t) = (Watchdog::new(PROBE_EVERY), Instant::now());
        for k in 0..3 {
            w.died("a", 2, t + Duration::from_secs(k));
        }
        // Once a day for a month: never given up on.
        for day in 1..30 {
            let at = t + Duration::from_secs(day * 86_400);
            assert_eq!(w.died("a", 2, at), Verdict::Restart { n: 1 });
        }
    }

    #[test]
    fn apps_and_releases_count_apart_and_a_new_release_starts_afresh() {
        let (mut w, t) = (Watchdog::new(PROBE_EVERY), Instant::now());
        for _ in 0..3 {
            w.died("a", 2, t);
        }
        assert_eq!(w.died("b", 2, t), Verdict::Restart { n: 1 });
        assert_eq!(w.died("a", 3, t), Verdict::Restart { n: 1 });
        w.forget("a");
        assert_eq!(w.died("a", 2, t), Verdict::Restart { n: 1 });
    }
}
