//! What to do when a release's domain, healthy at activation, is found stopped: a pure
//! state machine (time passed in). A domain that dies is restarted; one that dies more than
//! [`RESTARTS`] times within [`WINDOW`] is given up on, and the updater rolls back to the
//! previous release (or, with none, reports the release as failing and leaves it stopped).
//! The limit keeps a crash-looping image from burning a small board's CPU on boots.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Restarts allowed within [`WINDOW`] before the release is given up on.
pub const RESTARTS: usize = 3;
pub const WINDOW: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Start it again (the `n`th restart within the window).
    Restart { n: usize },
    /// It keeps dying: roll back, or stop trying.
    GiveUp { deaths: usize },
}

#[derive(Debug, Default)]
pub struct Watchdog {
    /// Per (app, release): when its domain was found dead, within the window.
    deaths: BTreeMap<(String, u64), VecDeque<Instant>>,
}

impl Watchdog {
    pub fn new() -> Watchdog {
        Watchdog::default()
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

    /// `app` moved to another release: what its old one did no longer counts.
    pub fn forget(&mut self, app: &str) {
        self.deaths.retain(|(a, _), _| a != app);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_up_to_the_limit_then_gives_up() {
        let (mut w, t) = (Watchdog::new(), Instant::now());
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
    fn deaths_older_than_the_window_do_not_count() {
        let (mut w, t) = (Watchdog::new(), Instant::now());
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
        let (mut w, t) = (Watchdog::new(), Instant::now());
        for _ in 0..3 {
            w.died("a", 2, t);
        }
        assert_eq!(w.died("b", 2, t), Verdict::Restart { n: 1 });
        assert_eq!(w.died("a", 3, t), Verdict::Restart { n: 1 });
        w.forget("a");
        assert_eq!(w.died("a", 2, t), Verdict::Restart { n: 1 });
    }
}
