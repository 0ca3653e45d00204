//! The embedded broker's routing state: who is connected as whom, what each subscribed
//! to, the retained messages, and the fleet's access rules. Pure: the broker's one router
//! task owns it and turns its answers into packets.
//!
//! Sessions are keyed by who a client proved to be, not by the client id it sent: a
//! device's certificate names it, so a second connection of the same device replaces
//! the first (a reconnect), while no client can take over another's session (the hub's
//! least of all) by sending its client id.

use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Who a client is, as the broker established it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// The hub itself: the hub's client certificate, or (on the loopback listener) the
    /// secret the broker gave the hub in-process.
    Hub,
    /// An enrolled device, by the name its client certificate carries for its key.
    Device(String),
    /// An unauthenticated client on the loopback listener: the hub's machine is trusted
    /// as before (plaintext is only ever on loopback), keyed by its client id.
    Local(String),
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Hub => write!(f, "the hub"),
            Identity::Device(n) => write!(f, "device {n}"),
            Identity::Local(id) => write!(f, "local client {id:?}"),
        }
    }
}

/// One message for a client: (topic, payload, retained).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
}

/// A connection's number, so a replaced session's late goodbye does not end its successor.
pub type ConnId = u64;

/// The fleet's access rules: what each identity may publish and subscribe to.
#[derive(Clone, Debug)]
pub struct Acl {
    fleet_prefix: String,
    release_prefix: String,
    trust: [String; 3],
}

impl Acl {
    pub fn new(fleet: &str) -> Acl {
        Acl {
            fleet_prefix: format!("unifleet/{fleet}/"),
            release_prefix: format!("unifleet/{fleet}/release/"),
            trust: net::mqtt_topics::trust(fleet),
        }
    }

    /// A device's status topic.
    pub fn status_topic(&self, name: &str) -> String {
        format!("{}status/{name}", self.fleet_prefix)
    }

    /// The hub and local clients publish anywhere in the fleet; a device only its own
    /// status topic.
    pub fn may_publish(&self, who: &Identity, topic: &str) -> bool {
        match who {
            Identity::Hub | Identity::Local(_) => topic.starts_with(&self.fleet_prefix),
            Identity::Device(name) => {
                topic.strip_prefix(&self.fleet_prefix) == Some(&format!("status/{name}"))
            }
        }
    }

    /// A device subscribes to release announcements and the trust records only: never
    /// to other devices' reports.
    pub fn may_subscribe(&self, who: &Identity, filter: &str) -> bool {
        match who {
            Identity::Hub | Identity::Local(_) => filter.starts_with(&self.fleet_prefix),
            Identity::Device(_) => {
                self.trust.iter().any(|t| t == filter)
                    || filter
                        .strip_prefix(&self.release_prefix)
                        .is_some_and(|rest| !rest.is_empty())
            }
        }
    }
}

/// Whether `topic` matches the MQTT filter `filter` (`+` one level, `#` the rest).
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut topic_levels = topic.split('/');
    for f in filter.split('/') {
        match (f, topic_levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// A filter the broker can hold: levels, with `#` only last and wildcards whole levels.
pub fn valid_filter(filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    !filter.is_empty()
        && levels.iter().enumerate().all(|(i, l)| {
            (*l == "#" && i == levels.len() - 1)
                || *l == "+"
                || !(l.contains('#') || l.contains('+'))
        })
}

/// Why a message or subscription was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The identity may not publish there (or subscribe to that).
    NotAllowed,
    /// The session holds [`MAX_FILTERS`] subscriptions already.
    TooMany,
}

/// Subscriptions one session may hold (a device needs one per app, and three).
pub const MAX_FILTERS: usize = 64;

/// Bounds on what the router keeps.
#[derive(Clone, Copy, Debug)]
pub struct RouterLimits {
    /// Total payload bytes of retained messages of local clients (the hub's are its own
    /// topics, a device has one status topic, each bounded by the packet size).
    pub retained_bytes: usize,
}

/// A connected session.
#[derive(Debug)]
struct Session<C> {
    conn: ConnId,
    outbox: C,
    /// A device's key, as its certificate carried it.
    key: Option<[u8; 32]>,
    filters: HashSet<String>,
}

/// What a publish did: the outboxes to deliver it to (each subscriber once), and
/// whether a retained message was kept.
#[derive(Debug, PartialEq, Eq)]
pub struct Published<C> {
    pub to: Vec<C>,
    pub kept: bool,
}

/// The routing state.
#[derive(Debug)]
pub struct Router<C> {
    acl: Acl,
    limits: RouterLimits,
    sessions: HashMap<Identity, Session<C>>,
    /// Filter → identities subscribed to it.
    filters: HashMap<String, HashSet<Identity>>,
    /// Topic → (payload, whether it counts against the local clients' budget).
    retained: BTreeMap<String, (Bytes, bool)>,
    /// Bytes of local clients' retained messages, and of all.
    budgeted_bytes: usize,
    retained_bytes: usize,
}

impl<C: Clone> Router<C> {
    pub fn new(acl: Acl, limits: RouterLimits) -> Router<C> {
        Router {
            acl,
            limits,
            sessions: HashMap::new(),
            filters: HashMap::new(),
            retained: BTreeMap::new(),
            budgeted_bytes: 0,
            retained_bytes: 0,
        }
    }

    /// A session starts; the one it replaces (the same identity connected again) is
    /// returned so its connection can be closed. Sessions start clean.
    pub fn connect(
        &mut self,
        who: Identity,
        key: Option<[u8; 32]>,
        conn: ConnId,
        outbox: C,
    ) -> Option<C> {
        let old = self.remove(&who);
        let session = Session {
            conn,
            outbox,
            key,
            filters: HashSet::new(),
        };
        self.sessions.insert(who, session);
        old
    }

    /// Connection `conn` ended: its session goes unless a newer connection replaced it.
    pub fn disconnect(&mut self, who: &Identity, conn: ConnId) {
        if self.is_current(who, conn) {
            self.remove(who);
        }
    }

    fn remove(&mut self, who: &Identity) -> Option<C> {
        let session = self.sessions.remove(who)?;
        for f in &session.filters {
            if let Some(set) = self.filters.get_mut(f) {
                set.remove(who);
                if set.is_empty() {
                    self.filters.remove(f);
                }
            }
        }
        Some(session.outbox)
    }

    /// Whether `who` is connected on `conn` (what a replaced connection still sends is
    /// not its successor's).
    pub fn is_current(&self, who: &Identity, conn: ConnId) -> bool {
        self.sessions.get(who).is_some_and(|s| s.conn == conn)
    }

    /// Subscribes `who` to `filter`: the retained messages it matches are returned, for
    /// the session to send at once.
    pub fn subscribe(&mut self, who: &Identity, filter: &str) -> Result<Vec<Message>, Refusal> {
        if !valid_filter(filter) || !self.acl.may_subscribe(who, filter) {
            return Err(Refusal::NotAllowed);
        }
        let session = self.sessions.get_mut(who).ok_or(Refusal::NotAllowed)?;
        if !session.filters.contains(filter) && session.filters.len() >= MAX_FILTERS {
            return Err(Refusal::TooMany);
        }
        session.filters.insert(filter.to_string());
        self.filters
            .entry(filter.to_string())
            .or_default()
            .insert(who.clone());
        Ok(self
            .retained
            .iter()
            .filter(|(topic, _)| matches(filter, topic))
            .map(|(topic, (payload, _))| Message {
                topic: topic.clone(),
                payload: payload.clone(),
                retain: true,
            })
            .collect())
    }

    pub fn unsubscribe(&mut self, who: &Identity, filter: &str) {
        if let Some(session) = self.sessions.get_mut(who) {
            session.filters.remove(filter);
        }
        if let Some(set) = self.filters.get_mut(filter) {
            set.remove(who);
            if set.is_empty() {
                self.filters.remove(filter);
            }
        }
    }

    /// A message from `who`. Retained with an empty payload, it clears the retained
    /// message; a local client's that does not fit the budget is delivered, not kept.
    pub fn publish(&mut self, who: &Identity, msg: &Message) -> Result<Published<C>, Refusal> {
        if !self.acl.may_publish(who, &msg.topic) {
            return Err(Refusal::NotAllowed);
        }
        let kept =
            !msg.retain || self.retain(&msg.topic, &msg.payload, matches!(who, Identity::Local(_)));
        let mut to: HashSet<&Identity> = HashSet::new();
        for (filter, set) in &self.filters {
            if matches(filter, &msg.topic) {
                to.extend(set.iter());
            }
        }
        let to = to
            .into_iter()
            .filter_map(|id| self.sessions.get(id).map(|s| s.outbox.clone()))
            .collect();
        Ok(Published { to, kept })
    }

    /// Keeps (or, empty, clears) the retained message of `topic`; false when a budgeted
    /// one does not fit.
    fn retain(&mut self, topic: &str, payload: &Bytes, budgeted: bool) -> bool {
        let (old, old_budgeted) = self
            .retained
            .get(topic)
            .map_or((0, false), |(p, b)| (p.len(), *b));
        let budget_after = self.budgeted_bytes - if old_budgeted { old } else { 0 }
            + if budgeted { payload.len() } else { 0 };
        if budgeted && !payload.is_empty() && budget_after > self.limits.retained_bytes {
            // Not kept, and what it replaces is gone: a later subscriber gets nothing
            // rather than a value its publisher has since replaced.
            self.retain(topic, &Bytes::new(), false);
            return false;
        }
        self.retained_bytes = self.retained_bytes - old + payload.len();
        self.budgeted_bytes = budget_after;
        if payload.is_empty() {
            self.retained.remove(topic);
        } else {
            self.retained
                .insert(topic.to_string(), (payload.clone(), budgeted));
        }
        true
    }

    /// Devices no longer enrolled with the key they connected with (revoked, or their
    /// key replaced): their sessions end here (what they still send is dropped), and are
    /// returned to be closed.
    pub fn not_enrolled(
        &mut self,
        enrolled: &dyn Fn(&str, &[u8; 32]) -> bool,
    ) -> Vec<(Identity, C)> {
        let gone: Vec<(Identity, C)> = self
            .sessions
            .iter()
            .filter(|(who, s)| match (who, &s.key) {
                (Identity::Device(n), Some(k)) => !enrolled(n, k),
                _ => false,
            })
            .map(|(who, s)| (who.clone(), s.outbox.clone()))
            .collect();
        for (who, _) in &gone {
            self.remove(who);
        }
        gone
    }

    /// Drops the retained status of every device `enrolled` does not name (revoked while
    /// offline, or never enrolled).
    pub fn drop_statuses(&mut self, enrolled: &dyn Fn(&str) -> bool) {
        let prefix = self.acl.status_topic("");
        let stale: Vec<String> = self
            .retained
            .keys()
            .filter(|t| t.strip_prefix(&prefix).is_some_and(|n| !enrolled(n)))
            .cloned()
            .collect();
        for topic in stale {
            self.retain(&topic, &Bytes::new(), false);
        }
    }

    /// Connected sessions and retained bytes (for the metrics page).
    pub fn counts(&self) -> (usize, usize) {
        (self.sessions.len(), self.retained_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, payload: &str, retain: bool) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from(payload.to_string()),
            retain,
        }
    }

    fn router() -> Router<u32> {
        Router::new(
            Acl::new("f"),
            RouterLimits {
                retained_bytes: 100,
            },
        )
    }

    fn dev(n: &str) -> Identity {
        Identity::Device(n.into())
    }

    #[test]
    fn filters_match_levels_and_wildcards() {
        assert!(matches("unifleet/f/status/+", "unifleet/f/status/a"));
        assert!(!matches("unifleet/f/status/+", "unifleet/f/status/a/b"));
        assert!(matches("unifleet/f/#", "unifleet/f/status/a/b"));
        assert!(matches("unifleet/f/root", "unifleet/f/root"));
        assert!(!matches("unifleet/f/root", "unifleet/f/roots"));
        assert!(!matches("unifleet/f/root/x", "unifleet/f/root"));
        assert!(valid_filter("a/+/#"));
        assert!(!valid_filter("a/#/b"));
        assert!(!valid_filter("a/b#"));
        assert!(!valid_filter(""));
    }

    #[test]
    fn a_device_publishes_only_its_own_status_and_reads_only_releases_and_trust() {
        let acl = Acl::new("f");
        let a = dev("a");
        assert!(acl.may_publish(&a, "unifleet/f/status/a"));
        assert!(!acl.may_publish(&a, "unifleet/f/status/b"));
        assert!(!acl.may_publish(&a, "unifleet/f/status/a/x"));
        assert!(!acl.may_publish(&a, "unifleet/f/release/stable/hello/x86_64"));
        assert!(!acl.may_publish(&a, "unifleet/f/root"));
        assert!(acl.may_subscribe(&a, "unifleet/f/release/stable/hello/x86_64"));
        assert!(acl.may_subscribe(&a, "unifleet/f/release/#"));
        assert!(acl.may_subscribe(&a, "unifleet/f/revocations"));
        assert!(!acl.may_subscribe(&a, "unifleet/f/status/+"));
        assert!(!acl.may_subscribe(&a, "unifleet/f/#"));
        assert!(!acl.may_subscribe(&a, "#"));
        assert!(!acl.may_subscribe(&a, "unifleet/g/release/#"));
        assert!(acl.may_publish(&Identity::Hub, "unifleet/f/root"));
        assert!(!acl.may_publish(&Identity::Hub, "elsewhere"));
    }

    #[test]
    fn retained_messages_reach_later_subscribers_and_local_ones_stay_within_their_budget() {
        let mut r = router();
        let local = Identity::Local("tool".into());
        r.connect(local.clone(), None, 1, 1);
        let kept = |p: Result<Published<u32>, Refusal>| p.unwrap().kept;
        assert!(kept(r.publish(
            &local,
            &msg("unifleet/f/root", &"x".repeat(60), true)
        )));
        // Over the budget: delivered, not kept.
        r.connect(dev("a"), Some([1; 32]), 2, 2);
        r.subscribe(&dev("a"), "unifleet/f/holds").unwrap();
        let p = r
            .publish(&local, &msg("unifleet/f/holds", &"y".repeat(60), true))
            .unwrap();
        assert_eq!(
            p,
            Published {
                to: vec![2],
                kept: false
            }
        );
        // Replacing a retained message counts only the difference.
        assert!(kept(r.publish(
            &local,
            &msg("unifleet/f/root", &"z".repeat(90), true)
        )));
        assert_eq!(r.counts(), (2, 90));
        // The hub's messages are not the local clients' budget.
        assert!(kept(r.publish(
            &Identity::Hub,
            &msg("unifleet/f/holds", &"h".repeat(500), true)
        )));
        let got = r.subscribe(&dev("a"), "unifleet/f/root").unwrap();
        assert_eq!(got.len(), 1);
        assert!(got[0].retain);
        r.publish(&local, &msg("unifleet/f/root", "", true))
            .unwrap();
        assert_eq!(r.counts(), (2, 500));
    }

    #[test]
    fn a_message_reaches_each_matching_subscriber_once() {
        let mut r = router();
        r.connect(Identity::Hub, None, 1, 10);
        r.subscribe(&Identity::Hub, "unifleet/f/status/+").unwrap();
        r.subscribe(&Identity::Hub, "unifleet/f/#").unwrap();
        r.connect(dev("a"), Some([1; 32]), 2, 20);
        let p = r
            .publish(&dev("a"), &msg("unifleet/f/status/a", "hi", false))
            .unwrap();
        assert_eq!(p.to, vec![10]);
        assert_eq!(
            r.publish(&dev("a"), &msg("unifleet/f/status/b", "lie", false)),
            Err(Refusal::NotAllowed)
        );
    }

    #[test]
    fn a_session_holds_a_bounded_number_of_subscriptions() {
        let mut r = router();
        r.connect(dev("a"), Some([1; 32]), 1, 10);
        for i in 0..MAX_FILTERS {
            r.subscribe(&dev("a"), &format!("unifleet/f/release/x{i}"))
                .unwrap();
        }
        assert_eq!(
            r.subscribe(&dev("a"), "unifleet/f/release/more"),
            Err(Refusal::TooMany)
        );
        // The same filter again is no new one.
        r.subscribe(&dev("a"), "unifleet/f/release/x0").unwrap();
        r.unsubscribe(&dev("a"), "unifleet/f/release/x0");
        r.subscribe(&dev("a"), "unifleet/f/release/more").unwrap();
    }

    #[test]
    fn a_reconnect_replaces_the_session_and_the_old_goodbye_does_not_end_it() {
        let mut r = router();
        assert_eq!(r.connect(dev("a"), Some([1; 32]), 1, 10), None);
        r.subscribe(&dev("a"), "unifleet/f/root").unwrap();
        assert_eq!(r.connect(dev("a"), Some([1; 32]), 2, 20), Some(10));
        r.disconnect(&dev("a"), 1);
        assert!(r.is_current(&dev("a"), 2));
        // The replaced session's subscriptions went with it.
        r.connect(Identity::Hub, None, 3, 30);
        let p = r
            .publish(&Identity::Hub, &msg("unifleet/f/root", "r", false))
            .unwrap();
        assert!(p.to.is_empty());
        // Another identity sending a's client id would be Local("…"), a session of its own.
        r.connect(Identity::Local("unifleet-device-a".into()), None, 4, 40);
        assert!(r.is_current(&dev("a"), 2));
        r.disconnect(&dev("a"), 2);
        assert!(!r.is_current(&dev("a"), 2));
    }

    #[test]
    fn devices_no_longer_enrolled_with_their_key_are_closed_and_their_status_dropped() {
        let mut r = router();
        r.connect(dev("a"), Some([1; 32]), 1, 10);
        r.connect(dev("b"), Some([2; 32]), 2, 20);
        r.connect(Identity::Hub, None, 3, 30);
        r.publish(&dev("b"), &msg("unifleet/f/status/b", "report", true))
            .unwrap();
        // a is enrolled with its key; b's key was replaced.
        let gone = r.not_enrolled(&|n, k| n == "a" && *k == [1; 32] || n == "b" && *k == [9; 32]);
        assert_eq!(gone, vec![(dev("b"), 20)]);
        assert!(!r.is_current(&dev("b"), 2));
        assert_eq!(r.counts(), (2, 6));
        r.drop_statuses(&|n| n == "a");
        assert_eq!(r.counts().1, 0);
    }
}
