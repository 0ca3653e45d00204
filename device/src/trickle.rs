//! When to re-gossip an announcement: the Trickle algorithm (RFC 6206), as a state machine
//! without I/O (time is passed in).
//!
//! Gossip reaches the whole fleet, so one re-announcement per interval is enough; a device
//! that heard a copy during its interval stays quiet. Each device fires at its own point
//! of the second half of the interval (`phase`), so the first to speak silences the rest.
//! Intervals double from `min` to `max` while all is quiet, and fall back to `min` when
//! something new happens (a newer release). Newcomers do not wait for it: they ask the
//! peers they connect to (`agent::Router::ask_announcements`).

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Trickle {
    min: Duration,
    max: Duration,
    interval: Duration,
    /// Where in the second half of each interval this device speaks, 0..1.
    phase: f64,
    started: Instant,
    heard: bool,
}

impl Trickle {
    pub fn new(min: Duration, max: Duration, phase: f64, now: Instant) -> Trickle {
        Trickle {
            min,
            max,
            interval: min,
            phase: phase.clamp(0.0, 1.0),
            started: now,
            heard: false,
        }
    }

    /// When this device should decide whether to speak.
    pub fn fire_at(&self) -> Instant {
        self.started + self.interval.mul_f64(0.5 + 0.5 * self.phase)
    }

    /// Another device gossiped the same (or a newer) announcement.
    pub fn heard(&mut self) {
        self.heard = true;
    }

    /// Something new: back to the shortest interval, starting now.
    pub fn reset(&mut self, now: Instant) {
        self.interval = self.min;
        self.started = now;
        self.heard = false;
    }

    /// At [`Trickle::fire_at`]: whether to re-gossip now. The next interval, twice as
    /// long (up to `max`), starts.
    pub fn fire(&mut self, now: Instant) -> bool {
        let speak = !self.heard;
        self.interval = (self.interval * 2).min(self.max);
        self.started = now;
        self.heard = false;
        speak
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(6);
    const MAX: Duration = Duration::from_secs(120);

    #[test]
    fn a_device_that_heard_nothing_speaks_and_intervals_double_to_the_maximum() {
        let t0 = Instant::now();
        let mut t = Trickle::new(MIN, MAX, 0.0, t0);
        assert_eq!(t.fire_at(), t0 + MIN / 2);
        let mut now = t.fire_at();
        let mut gaps = vec![];
        for _ in 0..8 {
            assert!(t.fire(now), "nothing heard: speak");
            let next = t.fire_at();
            gaps.push(next - now);
            now = next;
        }
        assert_eq!(gaps[0], Duration::from_secs(6));
        assert_eq!(*gaps.last().unwrap(), MAX / 2);
    }

    #[test]
    fn hearing_a_copy_keeps_a_device_quiet_for_that_interval_only() {
        let t0 = Instant::now();
        let mut t = Trickle::new(MIN, MAX, 0.5, t0);
        t.heard();
        assert!(!t.fire(t.fire_at()));
        assert!(t.fire(t.fire_at()));
    }

    #[test]
    fn something_new_brings_the_interval_back_to_the_minimum() {
        let t0 = Instant::now();
        let mut t = Trickle::new(MIN, MAX, 1.0, t0);
        for _ in 0..5 {
            let at = t.fire_at();
            t.fire(at);
        }
        let now = t.fire_at();
        t.reset(now);
        assert_eq!(t.fire_at(), now + MIN);
    }

    #[test]
    fn in_a_fleet_with_different_phases_few_speak_per_interval() {
        // 1,000 devices, heard copies reach everyone 100 ms after they are sent.
        let t0 = Instant::now();
        let n = 1000;
        let mut fleet: Vec<Trickle> = (0..n)
            .map(|i| Trickle::new(MIN, MAX, i as f64 / n as f64, t0))
            .collect();
        let mut spoke = 0;
        let mut last_spoken: Option<Instant> = None;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| fleet[i].fire_at());
        for i in order {
            let at = fleet[i].fire_at();
            if last_spoken.is_some_and(|s| at >= s + Duration::from_millis(100)) {
                fleet[i].heard();
            }
            if fleet[i].fire(at) {
                spoke += 1;
                last_spoken.get_or_insert(at);
            }
        }
        assert!(
            spoke <= 40,
            "{spoke} of {n} devices spoke in the first interval"
        );
    }
}
