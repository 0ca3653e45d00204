//! When the updater installs what: a state machine per app, events in and actions out, no
//! I/O and no clock of its own (every event carries `now`), like `autoscale` and the hub's
//! `tracker`. The agent's updater task is its I/O shell: it feeds announcements and
//! outcomes in and runs the installs this hands out.
//!
//! Rules:
//! - Per app, only the newest announced release is wanted; an older one is never
//!   installed after a newer one was heard.
//! - One install at a time, across apps (a board has one disk and little memory); apps
//!   that are ready take turns in the order they became ready.
//! - A failed attempt (network, disk) is tried again after a pause that doubles from
//!   [`RETRY_FIRST`] to [`RETRY_MAX`], kept **per app**: one app's failure never erases
//!   another's retry. A newer release of the app replaces the retry at once, with the
//!   pause reset.
//! - An attempt that found damaged chunks (and removed them) is tried again at once, once
//!   per release; if that fails too, the usual pause applies.
//! - A release that is done — installed, rolled back after a failed probe, or refused —
//!   is never handed out again.
//! - A release this device may not start yet (its rollout wave opens later, or the
//!   release is held) is deferred: handed out again at the time given, with no backoff,
//!   or at once when nudged (the hold list changed).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// First pause before a failed update is tried again; it doubles up to [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_secs(5);
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// How an install attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Finished for good: active, rolled back after its probe failed, already installed,
    /// or refused. Never handed out again.
    Done,
    /// Failed for a reason that may pass (network, a full disk, a dead hub).
    Failed,
    /// Failed because stored chunks were damaged; they were removed, so fetching again
    /// repairs it.
    Repairable,
    /// Not yet: its wave opens at this time, or it is held (looked at again then, or
    /// when nudged).
    Deferred(Instant),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A verified announcement of `release` of `app`.
    Announced {
        app: String,
        release: u64,
        now: Instant,
    },
    /// The install of `release` of `app` that [`Action::Install`] started has ended.
    Finished {
        app: String,
        release: u64,
        outcome: Outcome,
        now: Instant,
    },
    /// Time passed (the shell wakes at [`Updater::wake_at`]).
    Tick { now: Instant },
    /// What a deferred release waits on may have changed (a new hold list): deferred
    /// releases are ready now.
    Nudged { now: Instant },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Install this release of this app now (fetch, assemble, activate).
    Install { app: String, release: u64 },
}

/// One app's wanted release and where its attempts stand.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    release: u64,
    /// Not before this (a retry's pause); `None`: ready now.
    not_before: Option<Instant>,
    /// The pause after the next failure.
    backoff: Duration,
    /// Whether the one immediate repair retry was used.
    repaired: bool,
    /// Waiting for its wave or a hold to lift, not for a retry.
    deferred: bool,
    /// When it became ready (turn order between apps).
    ready_since: Instant,
}

impl Wanted {
    fn new(release: u64, now: Instant) -> Wanted {
        Wanted {
            release,
            not_before: None,
            backoff: RETRY_FIRST,
            repaired: false,
            deferred: false,
            ready_since: now,
        }
    }

    fn ready_at(&self) -> Instant {
        self.not_before.unwrap_or(self.ready_since)
    }
}

#[derive(Debug, Default)]
pub struct Updater {
    /// Per app: the newest announced release not yet done.
    wanted: BTreeMap<String, Wanted>,
    /// Per app: the newest release that is done (never handed out again, nor older).
    done: BTreeMap<String, u64>,
    /// The install running now, if any.
    running: Option<(String, u64)>,
}

impl Updater {
    pub fn new() -> Updater {
        Updater::default()
    }

    /// Feeds one event in; returns what to start now (at most one install).
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let now = match event {
            Event::Announced { app, release, now } => {
                self.announced(app, release, now);
                now
            }
            Event::Finished {
                app,
                release,
                outcome,
                now,
            } => {
                self.finished(app, release, outcome, now);
                now
            }
            Event::Tick { now } => now,
            Event::Nudged { now } => {
                for w in self.wanted.values_mut().filter(|w| w.deferred) {
                    w.not_before = None;
                    w.ready_since = now;
                }
                now
            }
        };
        self.next(now).into_iter().collect()
    }

    /// When the shell should send the next [`Event::Tick`]: the earliest pending retry,
    /// if nothing is running.
    pub fn wake_at(&self) -> Option<Instant> {
        if self.running.is_some() {
            return None;
        }
        self.wanted.values().filter_map(|w| w.not_before).min()
    }

    /// The release of `app` waiting for its retry, and when it is due (for status lines;
    /// a release deferred for its wave or a hold is not a retry).
    pub fn retry_of(&self, app: &str) -> Option<(u64, Instant)> {
        let w = self.wanted.get(app).filter(|w| !w.deferred)?;
        Some((w.release, w.not_before?))
    }

    fn announced(&mut self, app: String, release: u64, now: Instant) {
        if self.done.get(&app).is_some_and(|d| release <= *d) {
            return;
        }
        match self.wanted.get(&app) {
            Some(w) if release <= w.release => {}
            // Newer than anything wanted: replaces it, retry pause and all.
            _ => {
                self.wanted.insert(app, Wanted::new(release, now));
            }
        }
    }

    fn finished(&mut self, app: String, release: u64, outcome: Outcome, now: Instant) {
        if self.running.as_ref() == Some(&(app.clone(), release)) {
            self.running = None;
        }
        let Some(w) = self.wanted.get_mut(&app) else {
            return;
        };
        if w.release != release {
            // A newer release was heard meanwhile: it is ready now, whatever this was.
            if outcome == Outcome::Done {
                let d = self.done.entry(app).or_default();
                *d = (*d).max(release);
            }
            return;
        }
        w.deferred = false;
        match outcome {
            Outcome::Deferred(until) => {
                w.deferred = true;
                w.not_before = Some(until);
            }
            Outcome::Done => {
                self.wanted.remove(&app);
                let d = self.done.entry(app).or_default();
                *d = (*d).max(release);
            }
            Outcome::Repairable if !w.repaired => {
                w.repaired = true;
                w.not_before = None;
                w.ready_since = now;
            }
            Outcome::Failed | Outcome::Repairable => {
                w.not_before = Some(now + w.backoff);
                w.backoff = (w.backoff * 2).min(RETRY_MAX);
            }
        }
    }

    /// Starts the app that has waited longest among those ready, if nothing runs.
    fn next(&mut self, now: Instant) -> Option<Action> {
        if self.running.is_some() {
            return None;
        }
        let (app, w) = self
            .wanted
            .iter_mut()
            .filter(|(_, w)| w.not_before.is_none_or(|t| t <= now))
            .min_by_key(|(_, w)| w.ready_at())?;
        w.not_before = None;
        let action = Action::Install {
            app: app.clone(),
            release: w.release,
        };
        self.running = Some((app.clone(), w.release));
        Some(action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    fn announced(app: &str, release: u64, now: Instant) -> Event {
        Event::Announced {
            app: app.into(),
            release,
            now,
        }
    }

    fn finished(app: &str, release: u64, outcome: Outcome, now: Instant) -> Event {
        Event::Finished {
            app: app.into(),
            release,
            outcome,
            now,
        }
    }

    fn install(app: &str, release: u64) -> Vec<Action> {
        vec![Action::Install {
            app: app.into(),
            release,
        }]
    }

    #[test]
    fn a_deferred_release_comes_back_at_its_time_or_when_nudged_without_backoff() {
        let (mut u, t) = (Updater::new(), t0());
        assert_eq!(u.handle(announced("a", 2, t)), install("a", 2));
        let wave = t + Duration::from_secs(3600);
        assert_eq!(
            u.handle(finished("a", 2, Outcome::Deferred(wave), t)),
            vec![]
        );
        assert_eq!(u.wake_at(), Some(wave));
        assert_eq!(u.handle(Event::Tick { now: wave }), install("a", 2));
        // Held: deferred again; the hold list changes and it is looked at at once.
        let later = wave + Duration::from_secs(30);
        assert_eq!(
            u.handle(finished("a", 2, Outcome::Deferred(later), wave)),
            vec![]
        );
        assert_eq!(u.handle(Event::Nudged { now: wave }), install("a", 2));
        // A nudge does not cut a failed attempt's retry pause short.
        assert_eq!(u.handle(finished("a", 2, Outcome::Failed, wave)), vec![]);
        assert_eq!(u.handle(Event::Nudged { now: wave }), vec![]);
        assert_eq!(u.retry_of("a"), Some((2, wave + RETRY_FIRST)));
    }

    #[test]
    fn an_announcement_starts_an_install_and_done_ends_it() {
        let (mut u, t) = (Updater::new(), t0());
        assert_eq!(u.handle(announced("a", 1, t)), install("a", 1));
        assert_eq!(u.handle(finished("a", 1, Outcome::Done, t)), vec![]);
        // The same release again (the hub re-announces every 5 s): nothing to do.
        assert_eq!(u.handle(announced("a", 1, t)), vec![]);
        assert_eq!(u.wake_at(), None);
    }

    #[test]
    fn one_install_at_a_time_and_apps_take_turns() {
        let (mut u, t) = (Updater::new(), t0());
        assert_eq!(u.handle(announced("a", 1, t)), install("a", 1));
        assert_eq!(
            u.handle(announced("b", 1, t + Duration::from_secs(1))),
            vec![]
        );
        assert_eq!(
            u.handle(finished("a", 1, Outcome::Done, t + Duration::from_secs(2))),
            install("b", 1)
        );
    }

    #[test]
    fn one_apps_failure_never_erases_another_apps_retry() {
        // The old updater kept one retry slot: b's failure replaced a's pending retry, and
        // a was never tried again until its next announcement.
        let (mut u, t) = (Updater::new(), t0());
        u.handle(announced("a", 1, t));
        u.handle(announced("b", 1, t));
        assert_eq!(
            u.handle(finished("a", 1, Outcome::Failed, t)),
            install("b", 1)
        );
        assert_eq!(u.handle(finished("b", 1, Outcome::Failed, t)), vec![]);
        assert_eq!(u.wake_at(), Some(t + RETRY_FIRST));
        // Both come back, one after the other.
        let later = t + RETRY_FIRST;
        assert_eq!(u.handle(Event::Tick { now: later }), install("a", 1));
        assert_eq!(
            u.handle(finished("a", 1, Outcome::Done, later)),
            install("b", 1)
        );
    }

    #[test]
    fn the_pause_doubles_up_to_the_maximum_per_app() {
        let (mut u, mut t) = (Updater::new(), t0());
        u.handle(announced("a", 1, t));
        let mut pauses = vec![];
        for _ in 0..9 {
            u.handle(finished("a", 1, Outcome::Failed, t));
            let at = u.wake_at().unwrap();
            pauses.push((at - t).as_secs());
            t = at;
            assert_eq!(u.handle(Event::Tick { now: t }), install("a", 1));
        }
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn a_tick_before_the_pause_is_over_starts_nothing() {
        let (mut u, t) = (Updater::new(), t0());
        u.handle(announced("a", 1, t));
        u.handle(finished("a", 1, Outcome::Failed, t));
        assert_eq!(
            u.handle(Event::Tick {
                now: t + Duration::from_secs(4)
            }),
            vec![]
        );
        assert_eq!(u.retry_of("a"), Some((1, t + RETRY_FIRST)));
    }

    #[test]
    fn a_newer_release_replaces_a_waiting_retry_at_once() {
        let (mut u, t) = (Updater::new(), t0());
        u.handle(announced("a", 1, t));
        u.handle(finished("a", 1, Outcome::Failed, t));
        assert_eq!(
            u.handle(announced("a", 2, t + Duration::from_secs(1))),
            install("a", 2)
        );
        // Its own failure starts from the first pause again.
        u.handle(finished(
            "a",
            2,
            Outcome::Failed,
            t + Duration::from_secs(1),
        ));
        assert_eq!(u.wake_at(), Some(t + Duration::from_secs(1) + RETRY_FIRST));
    }

    #[test]
    fn a_newer_release_heard_during_an_install_runs_next_and_the_older_never_again() {
        let (mut u, t) = (Updater::new(), t0());
        u.handle(announced("a", 1, t));
        assert_eq!(u.handle(announced("a", 2, t)), vec![], "one at a time");
        assert_eq!(
            u.handle(finished("a", 1, Outcome::Failed, t)),
            install("a", 2)
        );
        assert_eq!(u.handle(finished("a", 2, Outcome::Done, t)), vec![]);
        assert_eq!(u.handle(announced("a", 1, t)), vec![], "older than done");
        assert_eq!(u.wake_at(), None);
    }

    #[test]
    fn an_older_announcement_never_replaces_a_newer_wanted_one() {
        let (mut u, t) = (Updater::new(), t0());
        u.handle(announced("a", 3, t));
        u.handle(finished("a", 3, Outcome::Failed, t));
        assert_eq!(u.handle(announced("a", 2, t)), vec![]);
        assert_eq!(u.retry_of("a"), Some((3, t + RETRY_FIRST)));
    }

    #[test]
    fn damaged_chunks_are_repaired_at_once_then_the_pause_applies() {
        let (mut u, t) = (Updater::new(), t0());
        u.handle(announced("a", 1, t));
        assert_eq!(
            u.handle(finished("a", 1, Outcome::Repairable, t)),
            install("a", 1)
        );
        assert_eq!(u.handle(finished("a", 1, Outcome::Repairable, t)), vec![]);
        assert_eq!(u.wake_at(), Some(t + RETRY_FIRST));
    }

    #[test]
    fn a_failed_release_waits_while_a_ready_app_goes_first() {
        let (mut u, t) = (Updater::new(), t0());
        u.handle(announced("a", 1, t));
        u.handle(finished("a", 1, Outcome::Failed, t));
        assert_eq!(
            u.handle(announced("b", 1, t + Duration::from_secs(1))),
            install("b", 1)
        );
        // a's pause ends while b installs: a starts when b is done.
        let later = t + Duration::from_secs(6);
        assert_eq!(u.handle(Event::Tick { now: later }), vec![]);
        assert_eq!(
            u.handle(finished("b", 1, Outcome::Done, later)),
            install("a", 1)
        );
    }

    #[test]
    fn many_apps_all_converge_whatever_fails() {
        // 50 apps, each failing its first two attempts: every one is installed in the end.
        let (mut u, mut t) = (Updater::new(), t0());
        let mut attempts: BTreeMap<String, u32> = BTreeMap::new();
        let mut todo: Vec<Action> = vec![];
        for i in 0..50 {
            todo.extend(u.handle(announced(&format!("app{i}"), 1, t)));
        }
        let mut installed = 0;
        for _ in 0..10_000 {
            let Some(Action::Install { app, release }) = todo.pop() else {
                match u.wake_at() {
                    Some(at) => {
                        t = at;
                        todo.extend(u.handle(Event::Tick { now: t }));
                        continue;
                    }
                    None => break,
                }
            };
            let n = attempts.entry(app.clone()).or_default();
            *n += 1;
            let outcome = if *n > 2 {
                Outcome::Done
            } else {
                Outcome::Failed
            };
            installed += u32::from(outcome == Outcome::Done);
            todo.extend(u.handle(finished(&app, release, outcome, t)));
        }
        assert_eq!(installed, 50);
        assert!(attempts.values().all(|n| *n == 3));
    }
}
