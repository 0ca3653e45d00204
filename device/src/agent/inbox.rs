//! The router's hand-off to the installer: the newest announcement per app, never a
//! release lost while the installer is busy.

use proto::announcement::Announcement;
use std::collections::HashMap;

/// The router's announcements for the updater: the newest per app, never dropped (a
/// bounded queue that was full lost a release the router had already recorded as known,
/// and nothing announced it again). Bounded by the number of apps.
#[derive(Default)]
pub(super) struct Inbox {
    pub(super) newest: std::sync::Mutex<HashMap<String, Heard>>,
    /// The hold list changed: releases waiting on it are looked at again.
    pub(super) nudged: std::sync::atomic::AtomicBool,
    pub(super) wake: tokio::sync::Notify,
}

impl Inbox {
    pub(super) fn put(&self, heard: Heard) {
        let mut newest = self.newest.lock().unwrap_or_else(|p| p.into_inner());
        let app = heard.ann.app.clone();
        if newest.get(&app).is_none_or(|h| heard.supersedes(h)) {
            newest.insert(app, heard);
        }
        drop(newest);
        self.wake.notify_one();
    }

    pub(super) fn nudge(&self) {
        self.nudged
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Waits until something was put or a nudge came, then takes everything (and
    /// whether it was nudged).
    pub(super) async fn take(&self) -> (Vec<Heard>, bool) {
        loop {
            let taken: Vec<Heard> = {
                let mut newest = self.newest.lock().unwrap_or_else(|p| p.into_inner());
                newest.drain().map(|(_, h)| h).collect()
            };
            let nudged = self
                .nudged
                .swap(false, std::sync::atomic::Ordering::Relaxed);
            if !taken.is_empty() || nudged {
                return (taken, nudged);
            }
            self.wake.notified().await;
        }
    }
}

/// A new release of one of our apps, as the router verified it.
pub(super) struct Heard {
    pub(super) ann: Announcement,
    pub(super) bytes: Vec<u8>,
    /// When the router verified it (Unix ms): when the device learned of the release.
    pub(super) verified_ms: u64,
}

impl Heard {
    /// A newer release, or the same one signed afresh (the hub re-signs announcements
    /// before they lapse).
    pub(super) fn supersedes(&self, other: &Heard) -> bool {
        (self.ann.release, self.ann.issued_at) > (other.ann.release, other.ann.issued_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::manifest::Platform;

    fn heard(app: &str, release: u64) -> Heard {
        let ann = Announcement {
            fleet: "home".into(),
            app: app.into(),
            channel: "stable".into(),
            platform: Platform::QemuX86_64,
            release,
            version: semver::Version::new(1, 0, release),
            manifest: proto::Digest::of(&release.to_le_bytes()),
            issued_at: 0,
            expires_at: u64::MAX,
        };
        Heard {
            ann,
            bytes: vec![],
            verified_ms: 0,
        }
    }

    /// An install waiting for its retry held the announcement it was first handed; signed
    /// afresh by the hub, the same release must replace it, or it lapses unused.
    #[tokio::test]
    async fn a_fresher_announcement_of_the_same_release_replaces_the_older_one() {
        let inbox = Inbox::default();
        let mut old = heard("a", 3);
        old.ann.issued_at = 100;
        let mut fresh = heard("a", 3);
        fresh.ann.issued_at = 200;
        inbox.put(old);
        inbox.put(fresh);
        let mut stale_again = heard("a", 3);
        stale_again.ann.issued_at = 150;
        inbox.put(stale_again);
        let (taken, _) = inbox.take().await;
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].ann.issued_at, 200, "the freshest bytes win");
    }

    /// The router handed releases to the updater through a queue of 16 with `try_send`:
    /// a full queue lost a release the router had already recorded as known, and nothing
    /// announced it to the updater again. The inbox keeps the newest per app, whatever
    /// arrives while the updater is busy.
    #[tokio::test]
    async fn a_busy_updater_never_loses_a_release() {
        let inbox = Inbox::default();
        for release in 1..=100 {
            for app in ["a", "b", "c"] {
                inbox.put(heard(app, release));
            }
        }
        inbox.put(heard("a", 7)); // older than what is waiting: kept out
        let mut taken: Vec<(String, u64)> = inbox
            .take()
            .await
            .0
            .into_iter()
            .map(|h| (h.ann.app, h.ann.release))
            .collect();
        taken.sort();
        assert_eq!(
            taken,
            [("a".into(), 100), ("b".into(), 100), ("c".into(), 100)]
        );
    }
}
