//! The hub's side of trust over time: the root chain devices catch up through, the
//! freshness of announcements (re-signed by the running hub with its timestamp key), the
//! revocation list, and warnings before anything expires.
//!
//! The decisions are pure ([`Freshness`], [`expiry_warnings`]); the rest reads and writes
//! the git store in one commit per change.

use crate::home::{now, Home, HomeError, KeyError, WriteError};
use crate::store::{Change, Event, ListError, Store, StoreError};
use proto::announcement::Announcement;
use proto::codec::Kind;
use proto::envelope::Envelope;
use proto::revocation::{Revocations, Revoked};
use proto::root::{Root, TrustedRoot};
use proto::{PublicKey, SecretKey};
use std::path::{Path, PathBuf};

pub use crate::store::{root_link, root_path};

/// Why `hub root publish` refused a new root or could not install it.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("reading new root {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is not the next root after the hub's version {version} (it must be version {}, \
         signed by a threshold of the current and of its own root keys)",
        path.display(),
        version + 1
    )]
    NotNext {
        path: PathBuf,
        version: u64,
        #[source]
        source: Box<proto::VerifyError>,
    },
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(
        "the new root's timestamp role does not list the hub's timestamp key {0}: pass \
         --timestamp-key with the key it lists"
    )]
    TimestampNotListed(String),
    #[error(
        "the new root's {role} role does not list the hub's {role} key {key}: pass \
         --{role}-key with one it lists"
    )]
    KeyNotListed { role: &'static str, key: String },
    #[error(
        "the new root names another rollout key, and the hold list must be signed again \
         with it: pass --rollout-key with the key it lists"
    )]
    NoRolloutKey,
    #[error(transparent)]
    List(#[from] ListError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("signing the {0} again")]
    Sign(&'static str, #[source] proto::codec::CodecError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("installing {}", path.display())]
    Install {
        path: PathBuf,
        #[source]
        source: WriteError,
    },
}

/// Why `hub revoke` could not revoke a device.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    List(#[from] ListError),
    #[error("no device {0:?} is enrolled (see `hub devices`)")]
    NotEnrolled(String),
    #[error("reading the enrolled key of {name}")]
    EnrolledKey {
        name: String,
        #[source]
        source: proto::keys::KeyTextError,
    },
    #[error("{0} is already revoked")]
    Already(String),
    #[error("signing the revocation list")]
    Sign(#[source] proto::codec::CodecError),
}

/// Why `hub status` could not say how the hub stands.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    List(#[from] ListError),
}

/// When a running hub signs an announcement again: once half of its freshness has gone,
/// so devices always hold one with half a lifetime left while the hub is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// Seconds an announcement stays fresh (hub.toml `freshness_secs`).
    pub lifetime: u64,
}

impl Freshness {
    /// Whether `ann` should be signed again at `now`: half its life gone, issued in the
    /// future (the hub's clock went back), or lasting longer than the lifetime now set.
    pub fn due(&self, ann: &Announcement, now: u64) -> bool {
        now >= ann.issued_at.saturating_add(self.lifetime / 2)
            || ann.issued_at > now.saturating_add(60)
            || ann.expires_at > now.saturating_add(self.lifetime)
    }

    /// `ann` issued afresh at `now`, signed by the timestamp key.
    pub fn sign(
        &self,
        ann: &Announcement,
        key: &SecretKey,
        now: u64,
    ) -> Result<Vec<u8>, proto::codec::CodecError> {
        let mut env = ann.refreshed(now, self.lifetime).seal()?;
        env.sign(key)?;
        env.encode()
    }

    /// The hub's own stored announcement bytes, signed again if [`Freshness::due`];
    /// `None` when they are fresh enough as they are.
    pub fn refresh(
        &self,
        bytes: &[u8],
        key: &SecretKey,
        now: u64,
    ) -> Result<Option<Vec<u8>>, proto::VerifyError> {
        let env = Envelope::decode(bytes, Kind::Announcement)?;
        let ann: Announcement = proto::codec::decode(Kind::Announcement, &env.payload)?;
        if !self.due(&ann, now) {
            return Ok(None);
        }
        Ok(Some(self.sign(&ann, key, now)?))
    }
}

/// What an operator must hear of before it bites: a root expiring within
/// [`WARN_AHEAD`] (then every device refuses updates), or a freshness lifetime so short
/// that a hub restart lets announcements lapse.
pub fn expiry_warnings(root: &Root, freshness: Freshness, now: u64) -> Vec<String> {
    let mut out: Vec<String> = root_warning(root, now).into_iter().collect();
    if freshness.lifetime < 3600 {
        out.push(format!(
            "freshness_secs is {} s: announcements lapse if the hub is down longer than that",
            freshness.lifetime
        ));
    }
    out
}

/// The root expired or expiring within [`WARN_AHEAD`], said with its date and the next
/// step (the CLI, the log, the dashboard's banner and the announcer's refusal say this).
pub fn root_warning(root: &Root, now: u64) -> Option<String> {
    RootExpiry::of(root, now).map(|e| e.to_string())
}

pub use crate::home::{human_time, RootExpiry, WARN_AHEAD};
pub use proto::status::{human_ago, human_secs};

/// `hub root publish NEW_ROOT`: `NEW_ROOT` must verify as the next link after the hub's
/// root. It is kept in the store's chain and becomes the hub's root; a running hub
/// announces it and serves every link to devices catching up.
pub fn publish_root(
    home: &Home,
    new_root: &Path,
    keys: &NewKeys<'_>,
) -> Result<TrustedRoot, RootError> {
    let NewKeys {
        timestamp: timestamp_key,
        release: release_key,
        rollout: rollout_key,
    } = *keys;
    let bytes = std::fs::read(new_root).map_err(|source| RootError::Read {
        path: new_root.into(),
        source,
    })?;
    let current = home.anchor_root()?;
    let next = current
        .update(&bytes, now())
        .map_err(|source| RootError::NotNext {
            path: new_root.into(),
            version: current.root().version,
            source: Box::new(source),
        })?;
    let timestamp = match timestamp_key {
        Some(p) => crate::home::read_secret(p)?,
        None => home.timestamp_key()?,
    };
    if next.root().timestamp.key(&timestamp.id()).is_none() {
        return Err(RootError::TimestampNotListed(timestamp.id().short()));
    }
    let release = optional_key(
        release_key,
        home.release_key().ok(),
        &next.root().release,
        "release",
    )?;
    let rollout = optional_key(
        rollout_key,
        home.rollout_key()?,
        &next.root().rollout,
        "rollout",
    )?;
    let version = next.root().version;
    let store = home.store()?;
    let mut change = resigned_lists(&store, &current, &next, &timestamp, rollout.as_ref())?;
    change.put(root_path(version), bytes.clone());
    change.put("root.bin", bytes.clone());
    change.event(Event {
        at: now(),
        kind: "root".into(),
        app: None,
        channel: None,
        release: None,
        device: None,
        detail: format!(
            "trust root version {version}, expires {}",
            human_time(next.root().expires_at)
        ),
    });
    store.commit(&format!("trust root version {version}"), &change, None)?;
    crate::home::write_atomic(&home.dir.join("root.bin"), &bytes)?;
    for (given, key, file) in [
        (timestamp_key, &Some(timestamp), "keys/timestamp.key"),
        (release_key, &release, "keys/release.key"),
        (rollout_key, &rollout, "keys/rollout.key"),
    ] {
        if let (Some(p), Some(k)) = (given, key) {
            crate::home::replace_secret(&home.dir.join(file), k).map_err(|source| {
                RootError::Install {
                    path: p.into(),
                    source,
                }
            })?;
        }
    }
    Ok(next)
}

/// The lists an online key signs, signed again (one version up) where the new root
/// names another key for it: otherwise neither the hub nor a device that adopted the new
/// root could verify them, and a revoked device or a halted release would be let go.
fn resigned_lists(
    store: &Store,
    current: &TrustedRoot,
    next: &TrustedRoot,
    timestamp: &SecretKey,
    rollout: Option<&SecretKey>,
) -> Result<Change, RootError> {
    let mut change = Change::default();
    if let Some(bytes) = store.read("revocations.bin")? {
        if proto::revocation::verify_revocations(&bytes, next, 0).is_err() {
            let mut list =
                proto::revocation::verify_revocations(&bytes, current, 0).map_err(|source| {
                    ListError::Unverified {
                        what: "revocation list",
                        source: Box::new(source),
                    }
                })?;
            list.version += 1;
            list.issued_at = now();
            let signed =
                sign(list.seal(), timestamp).map_err(|e| RootError::Sign("revocation list", e))?;
            change.put("revocations.bin", signed);
        }
    }
    if let Some(bytes) = store.read(crate::rollout::HOLDS_PATH)? {
        if proto::rollout::verify_holds(&bytes, next, 0).is_err() {
            let key = rollout.ok_or(RootError::NoRolloutKey)?;
            let mut list = proto::rollout::verify_holds(&bytes, current, 0).map_err(|source| {
                ListError::Unverified {
                    what: "hold list",
                    source: Box::new(source),
                }
            })?;
            list.version += 1;
            list.issued_at = now();
            let signed = sign(list.seal(), key).map_err(|e| RootError::Sign("hold list", e))?;
            change.put(crate::rollout::HOLDS_PATH, signed);
        }
    }
    Ok(change)
}

/// A sealed list signed with `key` and encoded.
fn sign(
    sealed: Result<Envelope, proto::codec::CodecError>,
    key: &SecretKey,
) -> Result<Vec<u8>, proto::codec::CodecError> {
    let mut env = sealed?;
    env.sign(key)?;
    env.encode()
}

/// Keys `hub root publish` installs with the new root, where it lists new ones.
#[derive(Debug, Clone, Copy, Default)]
pub struct NewKeys<'a> {
    pub timestamp: Option<&'a Path>,
    pub release: Option<&'a Path>,
    pub rollout: Option<&'a Path>,
}

/// A key the hub may hold for `role` (`given`, else the one it `held`): it must be one
/// the new root lists.
fn optional_key(
    given: Option<&Path>,
    held: Option<SecretKey>,
    role: &proto::root::Role,
    name: &'static str,
) -> Result<Option<SecretKey>, RootError> {
    let key = match given {
        Some(p) => Some(crate::home::read_secret(p)?),
        None => held,
    };
    if let Some(k) = &key {
        if role.key(&k.id()).is_none() {
            return Err(RootError::KeyNotListed {
                role: name,
                key: k.id().short(),
            });
        }
    }
    Ok(key)
}

/// The stored revocation list, verified against `root` (`None`: nobody was revoked).
pub fn revocations(
    store: &Store,
    root: &TrustedRoot,
) -> Result<Option<(Revocations, Vec<u8>)>, ListError> {
    let Some(bytes) = store.read("revocations.bin")? else {
        return Ok(None);
    };
    let list = proto::revocation::verify_revocations(&bytes, root, 0).map_err(|source| {
        ListError::Unverified {
            what: "revocation list",
            source: Box::new(source),
        }
    })?;
    Ok(Some((list, bytes)))
}

/// `hub revoke DEVICE`: adds its enrolled key to the revocation list (signed with the
/// timestamp key, one version up) in one commit with an event.
pub fn revoke(home: &Home, name: &str, reason: &str) -> Result<Revocations, RevokeError> {
    // Under an expired root too: revoking a stolen device must always work (devices
    // check the list against the timestamp role, not the root's expiry).
    let root = home.anchor_root()?;
    let key = home.timestamp_key()?;
    let store = home.store()?;
    // One transaction: an enrollment committing its own list meanwhile is read, never
    // overwritten.
    store.transaction(|store| -> Result<_, RevokeError> {
        let enrolled = store
            .read(&format!("devices/{name}.pub"))?
            .ok_or_else(|| RevokeError::NotEnrolled(name.into()))?;
        let device =
            PublicKey::from_text(&String::from_utf8_lossy(&enrolled)).map_err(|source| {
                RevokeError::EnrolledKey {
                    name: name.into(),
                    source,
                }
            })?;
        let mut list = revocations(store, &root)?
            .map(|(l, _)| l)
            .unwrap_or_else(|| Revocations {
                fleet: root.fleet().into(),
                ..Revocations::default()
            });
        if list.is_revoked(&device) {
            return Err(RevokeError::Already(name.into()));
        }
        list.version += 1;
        list.issued_at = now();
        list.devices.push(Revoked {
            name: name.into(),
            key: device,
            at: now(),
        });
        if let Some(members) = &mut list.members {
            members.retain(|m| m.key != device);
        }
        let signed = sign(list.seal(), &key).map_err(RevokeError::Sign)?;
        let mut change = Change::default();
        change.put("revocations.bin", signed);
        change.put(format!("revoked/{name}.pub"), enrolled);
        let said = if reason.is_empty() {
            String::new()
        } else {
            format!(": {reason}")
        };
        change.event(Event {
            at: now(),
            kind: "revoke".into(),
            app: None,
            channel: None,
            release: None,
            device: Some(name.into()),
            detail: format!(
                "key {} revoked{said}; revocation list version {}",
                device.id().short(),
                list.version
            ),
        });
        let commit = crate::store::Commit {
            message: format!("revoke {name}"),
            change,
            tag: None,
        };
        Ok((commit, list))
    })
}

/// `hub status`'s line on the keys the hub holds: who signs releases, who re-signs
/// announcements.
fn keys_line(home: &Home, r: &proto::root::Root, freshness: Freshness) -> String {
    let signs = match home.release_key() {
        Ok(k) if r.release.key(&k.id()).is_some() && r.release.threshold == 1 => {
            "signs releases itself".to_string()
        }
        Ok(k) if r.release.key(&k.id()).is_some() => format!(
            "holds 1 of the {} release signatures each release needs (publish --hold)",
            r.release.threshold
        ),
        _ => "holds no release key (publish --hold, co-signed offline)".to_string(),
    };
    let ts = match home.timestamp_key() {
        Ok(k) if r.timestamp.key(&k.id()).is_some() => format!(
            "re-signs announcements' freshness ({} each) with timestamp key {}",
            human_secs(freshness.lifetime),
            k.id().short()
        ),
        Ok(k) => format!(
            "warning: the timestamp key {} is not the root's: announcements will be refused",
            k.id().short()
        ),
        Err(e) => format!("warning: {}", proto::Chain(&e)),
    };
    format!("hub: {signs}; {ts}")
}

/// `hub status`: lines for people, warnings first.
pub fn status(home: &Home) -> Result<Vec<String>, StatusError> {
    let root = home.anchor_root()?;
    let freshness = Freshness {
        lifetime: home.config.freshness_secs,
    };
    let now = now();
    let mut out: Vec<String> = expiry_warnings(root.root(), freshness, now)
        .into_iter()
        .map(|w| format!("warning: {w}"))
        .collect();
    let r = root.root();
    out.push(format!(
        "fleet {}: trust root version {}, {} {} ({}); root {}-of-{}, release {}-of-{}",
        r.fleet,
        r.version,
        if r.expires_at <= now {
            "expired"
        } else {
            "expires"
        },
        human_time(r.expires_at),
        human_ago(r.expires_at, now),
        r.root.threshold,
        r.root.keys.len(),
        r.release.threshold,
        r.release.keys.len(),
    ));
    let store = home.store()?;
    out.push(keys_line(home, r, freshness));
    let mut held: Vec<String> = std::fs::read_dir(home.dir.join("held"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    held.sort();
    if !held.is_empty() {
        out.push(format!(
            "held for co-signing: {} (see {})",
            held.join(", "),
            home.dir.join("held").display()
        ));
    }
    match revocations(&store, &root)? {
        Some((list, _)) => out.push(format!(
            "revoked: {} (revocation list version {})",
            list.devices
                .iter()
                .map(|d| format!("{} since {}", d.name, human_time(d.at)))
                .collect::<Vec<_>>()
                .join(", "),
            list.version
        )),
        None => out.push("revoked: none".into()),
    }
    let mirrors = crate::mirror::load(home);
    if mirrors.is_empty() {
        out.push("mirrors: none; a lost disk loses the history (hub mirror add URL)".into());
    }
    let heads = crate::mirror::heads(home).ok();
    for line in mirrors.iter().map(|m| m.describe(now, heads.as_deref())) {
        // Warnings first, as above.
        match line.starts_with("warning:") {
            true => out.insert(0, line),
            false => out.push(line),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    use proto::VerifyError;

    const DAY: u64 = 86_400;

    fn ann(issued_at: u64, lifetime: u64) -> Announcement {
        Announcement {
            fleet: "home".into(),
            app: "hello".into(),
            channel: "stable".into(),
            platform: proto::manifest::Platform::QemuX86_64,
            release: 1,
            version: semver::Version::new(1, 0, 0),
            manifest: proto::Digest::of(b"m"),
            issued_at,
            expires_at: issued_at + lifetime,
        }
    }

    /// Releases expired after 90 days and nothing re-signed them. Two simulated years,
    /// hour by hour, time passed in: a hub that is up keeps every pointer fresh and the
    /// device takes every release; a 20-day outage lets freshness lapse (the device
    /// refuses the stale pointer and keeps its release); the hub back restores it.
    #[test]
    fn two_simulated_years_keep_updating_and_an_outage_past_freshness_lapses_then_recovers() {
        use proto::announcement::verify_announcement;
        use proto::manifest::{Expectations, Platform};
        let key = |n| SecretKey::from_seed([n; 32]);
        let role = |n| proto::root::Role {
            keys: vec![key(n).public()],
            threshold: 1,
        };
        const START: u64 = 1_800_000_000;
        let root = Root {
            fleet: "home".into(),
            version: 1,
            expires_at: START + 5 * 365 * DAY,
            root: role(1),
            release: role(2),
            timestamp: role(3),
            rollout: role(4),
        };
        let mut env = root.seal().unwrap();
        env.sign(&key(1)).unwrap();
        let root = TrustedRoot::bootstrap(&env.encode().unwrap(), START).unwrap();
        let f = Freshness { lifetime: 7 * DAY };
        let ts = key(3);
        let outage = START + 400 * DAY..START + 420 * DAY;
        let mut hub_bytes = f.sign(&ann(START, 7 * DAY), &ts, START).unwrap();
        let mut device_holds = hub_bytes.clone();
        let (mut installed, mut released) = (0u64, 1u64);
        let (mut refused_hours, mut resignings) = (0u64, 0u64);
        for hour in 0..2 * 365 * 24 {
            let now = START + hour * 3600;
            let hub_up = !outage.contains(&now);
            if hub_up {
                if hour > 0 && hour % (30 * 24) == 0 {
                    released += 1;
                    let mut next = ann(now, 7 * DAY);
                    next.release = released;
                    hub_bytes = f.sign(&next, &ts, now).unwrap();
                }
                if let Some(fresh) = f.refresh(&hub_bytes, &ts, now).unwrap() {
                    resignings += 1;
                    hub_bytes = fresh;
                }
                device_holds = hub_bytes.clone();
            }
            let expect = Expectations {
                app: Some("hello"),
                channel: "stable",
                platform: Platform::QemuX86_64,
                installed_release: Some(installed),
            };
            match verify_announcement(&device_holds, &root, now) {
                Ok(a) => {
                    assert!(hub_up || now < outage.start + 7 * DAY, "fresh at {hour} h");
                    if expect.applies(&a).is_ok() {
                        installed = a.release;
                    }
                }
                Err(VerifyError::Expired { .. }) => {
                    assert!(!hub_up, "stale with the hub up at hour {hour}");
                    refused_hours += 1;
                }
                Err(e) => panic!("hour {hour}: {e}"),
            }
            assert!(installed >= released.saturating_sub(1), "hour {hour}");
        }
        eprintln!(
            "two years: {released} releases taken, {resignings} re-signings, \
             {refused_hours} h stale in the 20-day outage"
        );
        assert_eq!(installed, released, "every release was taken");
        assert_eq!(released, 25);
        // Stale from 7 days after the last re-signing (3.5 days before the outage at
        // most) to the outage's end: between 13.5 and 16.5 days of the 20.
        assert!(
            (13 * 24..=17 * 24).contains(&refused_hours),
            "{refused_hours} h"
        );
        // Re-signed every 3.5 days, about 200 times in two years.
        assert!((180..=230).contains(&resignings), "{resignings}");
    }

    #[test]
    fn an_announcement_is_re_signed_at_half_its_life() {
        let f = Freshness { lifetime: 7 * DAY };
        let a = ann(1_000_000, 7 * DAY);
        assert!(!f.due(&a, 1_000_000));
        assert!(!f.due(&a, 1_000_000 + 3 * DAY));
        assert!(f.due(&a, 1_000_000 + 7 * DAY / 2));
        // The clock went back a day: sign again rather than wait days.
        assert!(f.due(&a, 1_000_000 - DAY));
        // The lifetime was shortened: what was signed for longer is signed again.
        assert!(Freshness { lifetime: DAY }.due(&a, 1_000_000));
    }

    #[test]
    fn a_root_expiring_soon_is_warned_of_with_a_date() {
        let f = Freshness { lifetime: 7 * DAY };
        let mut root = Root {
            fleet: "home".into(),
            version: 3,
            expires_at: 1_800_000_000 + 90 * DAY,
            root: proto::root::Role {
                keys: vec![SecretKey::from_seed([1; 32]).public()],
                threshold: 1,
            },
            release: proto::root::Role {
                keys: vec![SecretKey::from_seed([2; 32]).public()],
                threshold: 1,
            },
            timestamp: proto::root::Role {
                keys: vec![SecretKey::from_seed([3; 32]).public()],
                threshold: 1,
            },
            rollout: proto::root::Role {
                keys: vec![SecretKey::from_seed([4; 32]).public()],
                threshold: 1,
            },
        };
        assert!(expiry_warnings(&root, f, 1_800_000_000).is_empty());
        root.expires_at = 1_800_000_000 + 59 * DAY;
        let w = expiry_warnings(&root, f, 1_800_000_000);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("version 3")
                && w[0].contains("2027-03-15")
                && w[0].contains("in 59 days"),
            "{}",
            w[0]
        );
        let w = expiry_warnings(&root, f, root.expires_at + 1);
        assert!(w[0].contains("expired"), "{}", w[0]);
    }
}
