//! Enrolling devices: their public keys go into the git store (one commit for the whole
//! batch), and a running hub reloads them. One key, one name: enrolling a name again
//! with another key needs `replace` (and is an event of its own), and a key enrolled
//! under one name cannot be enrolled under a second.
//!
//! Tags are the operator's: `hub enroll --tag` assigns them (enrolling again with other
//! tags changes them). Once any tag is assigned, every enrollment signs the fleet's
//! members with their tags into the revocation list (`proto::revocation`), which devices
//! target releases by.

use crate::home::{now, Home, HomeError};
use crate::store::{Change, Event, StoreError};
use proto::PublicKey;
use std::collections::HashMap;

/// Why `hub enroll` enrolled nothing.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("enrolling {0:?}")]
    Name(String, #[source] proto::names::BadName),
    #[error("--tag {0:?}")]
    Tag(String, #[source] proto::names::BadName),
    #[error("{count} tags given; a device may carry at most {max}")]
    TooManyTags { count: usize, max: usize },
    #[error(transparent)]
    List(#[from] crate::store::ListError),
    #[error("signing the revocation list with the fleet's members")]
    Sign(#[source] proto::codec::CodecError),
    #[error(
        "the revocation list would be {bytes} bytes with {members} devices' tags, more than \
         the broker carries ({max} bytes): assign tags to fewer devices, or fewer tags",
        max = proto::revocation::MAX_SPREAD_BYTES
    )]
    ListTooLarge { bytes: usize, members: usize },
    #[error(
        "key {key} is already enrolled as {other:?}; one key is one device (revoke {other} \
         first with `hub revoke {other}` if the board was renamed)"
    )]
    KeyTaken { key: String, other: String },
    #[error(
        "{name} is already enrolled with key {old}; pass --replace to give it key {new} (the \
         old key's reports are refused from then on)"
    )]
    Enrolled {
        name: String,
        old: String,
        new: String,
    },
}

/// Enrolls each `(name, key)`, with `tags` assigned to each where given (`None`: a
/// device enrolled before keeps its tags, a new one has none); everything is checked
/// before anything is written. Says whether the revocation list changed (a running hub
/// was asked to spread it).
pub fn enroll(
    home: &Home,
    devices: &[(String, PublicKey)],
    tags: Option<&[String]>,
    replace: bool,
) -> Result<bool, EnrollError> {
    let tags = tags.map(dedup);
    check_tags(tags.as_deref().unwrap_or_default())?;
    let root = home.anchor_root()?;
    let timestamp = home.timestamp_key()?;
    let store = home.store()?;
    let message = match devices {
        [(name, _)] => format!("enroll {name}"),
        _ => format!("enroll {} devices", devices.len()),
    };
    // One transaction: a `hub revoke` committing meanwhile is read, never overwritten.
    let (changed, listed) = store.transaction(|store| -> Result<_, EnrollError> {
        let before: HashMap<String, PublicKey> = crate::inventory::load_devices(store)?
            .into_values()
            .collect();
        let mut change = Change::default();
        let by_name = keys(&before, devices, replace, &mut change)?;
        let named: Vec<&str> = devices.iter().map(|(n, _)| n.as_str()).collect();
        let assign = Assign {
            before: &before,
            after: &by_name,
            named: &named,
            tags: tags.as_deref(),
        };
        let listed = members(store, &root, &timestamp, &assign, &mut change)?;
        let changed = !change.is_empty();
        let commit = crate::store::Commit {
            message: message.clone(),
            change,
            tag: None,
        };
        Ok((commit, (changed, listed)))
    })?;
    if changed {
        crate::control::reload_devices(home);
    }
    Ok(listed)
}

/// The enrolled keys by name once `devices` are enrolled; their key files and events go
/// into `change`.
fn keys(
    before: &HashMap<String, PublicKey>,
    devices: &[(String, PublicKey)],
    replace: bool,
    change: &mut Change,
) -> Result<HashMap<String, PublicKey>, EnrollError> {
    let mut by_name = before.clone();
    for (name, key) in devices {
        proto::names::check("device", name).map_err(|e| EnrollError::Name(name.clone(), e))?;
        if let Some((other, _)) = by_name.iter().find(|(n, k)| *k == key && *n != name) {
            return Err(EnrollError::KeyTaken {
                key: key.id().short(),
                other: other.clone(),
            });
        }
        let kind = match by_name.get(name) {
            Some(old) if old == key => continue,
            Some(old) if !replace => {
                return Err(EnrollError::Enrolled {
                    name: name.clone(),
                    old: old.id().short(),
                    new: key.id().short(),
                })
            }
            Some(_) => "replace-key",
            None => "enroll",
        };
        let detail = match by_name.insert(name.clone(), *key) {
            Some(old) => format!("key {} replaces {}", key.id().short(), old.id().short()),
            None => format!("key {}", key.id().short()),
        };
        change.put(format!("devices/{name}.pub"), key.to_text().into_bytes());
        change.event(event(name, kind, detail));
    }
    Ok(by_name)
}

/// `tags` in order, each once.
fn dedup(tags: &[String]) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for t in tags {
        if !out.contains(t) {
            out.push(t.clone());
        }
    }
    out
}

fn check_tags(tags: &[String]) -> Result<(), EnrollError> {
    for t in tags {
        proto::names::check("tag", t).map_err(|e| EnrollError::Tag(t.clone(), e))?;
    }
    if tags.len() > proto::status::MAX_TAGS {
        return Err(EnrollError::TooManyTags {
            count: tags.len(),
            max: proto::status::MAX_TAGS,
        });
    }
    Ok(())
}

fn event(name: &str, kind: &str, detail: String) -> Event {
    Event {
        at: now(),
        kind: kind.into(),
        app: None,
        channel: None,
        release: None,
        device: Some(name.into()),
        detail,
    }
}

/// What one enrollment assigns: the keys by name `before` and `after` it, the devices it
/// `named`, and the tags given them (`None`: each keeps its own).
struct Assign<'a> {
    before: &'a HashMap<String, PublicKey>,
    after: &'a HashMap<String, PublicKey>,
    named: &'a [&'a str],
    tags: Option<&'a [String]>,
}

impl Assign<'_> {
    /// Every enrolled device's tags after this enrollment, by name: those given to the
    /// named ones, else those the `old` list gave the name's key before (a replaced key
    /// keeps its board's tags).
    fn tags(&self, old: &proto::revocation::Revocations) -> Vec<(&str, PublicKey, Vec<String>)> {
        let mut out: Vec<_> = self
            .after
            .iter()
            .map(|(name, key)| {
                let tags = match self.tags {
                    Some(t) if self.named.contains(&name.as_str()) => t.to_vec(),
                    _ => self
                        .before
                        .get(name)
                        .map(|k| old.tags_of(k).to_vec())
                        .unwrap_or_default(),
                };
                (name.as_str(), *key, tags)
            })
            .collect();
        out.sort();
        out
    }
}

/// Adds to `change` a revocation list one version up naming the enrolled devices with
/// tags and their tags, when that differs from the members the stored list names; says
/// whether it did.
fn members(
    store: &crate::store::Store,
    root: &proto::root::TrustedRoot,
    timestamp: &proto::SecretKey,
    assign: &Assign<'_>,
    change: &mut Change,
) -> Result<bool, EnrollError> {
    let mut list = crate::trust::revocations(store, root)?
        .map(|(l, _)| l)
        .unwrap_or_else(|| proto::revocation::Revocations {
            fleet: root.fleet().into(),
            ..Default::default()
        });
    let assigned = assign.tags(&list);
    let members: Vec<proto::revocation::Member> = assigned
        .iter()
        .filter(|(_, key, tags)| !tags.is_empty() && !list.is_revoked(key))
        .map(|(_, key, tags)| proto::revocation::Member {
            key: *key,
            tags: tags.clone(),
        })
        .collect();
    // A fleet that never assigned a tag keeps lists without members, which devices from
    // before tags can still read (a list with members is new to them).
    let unused = list.members.is_none() && members.is_empty();
    if unused || list.members.as_ref() == Some(&members) {
        return Ok(false);
    }
    for (name, _, tags) in &assigned {
        let was = assign
            .before
            .get(*name)
            .map_or(&[][..], |k| list.tags_of(k));
        if tags.as_slice() != was {
            let detail = format!("tags [{}] (were [{}])", tags.join(", "), was.join(", "));
            change.event(event(name, "tag", detail));
        }
    }
    list.version += 1;
    list.issued_at = now();
    list.members = Some(members);
    let signed = list
        .seal()
        .and_then(|mut env| {
            env.sign(timestamp)?;
            env.encode()
        })
        .map_err(EnrollError::Sign)?;
    if signed.len() > proto::revocation::MAX_SPREAD_BYTES {
        return Err(EnrollError::ListTooLarge {
            bytes: signed.len(),
            members: list.members.as_ref().map_or(0, Vec::len),
        });
    }
    change.put("revocations.bin", signed);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> PublicKey {
        proto::SecretKey::from_seed([seed; 32]).public()
    }

    fn members(home: &Home) -> Option<Vec<(PublicKey, Vec<String>)>> {
        let store = home.store().unwrap();
        let root = home.anchor_root().unwrap();
        let (list, _) = crate::trust::revocations(&store, &root).unwrap()?;
        let members = list.members?;
        Some(members.into_iter().map(|m| (m.key, m.tags)).collect())
    }

    /// Tags are assigned at enrollment and signed into the revocation list with every
    /// member; a fleet that never assigned one writes no such list (older devices could
    /// not read it).
    #[test]
    fn tags_are_assigned_at_enrollment_kept_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        crate::init::init(
            dir.path(),
            &crate::init::InitArgs {
                fleet: "home",
                root: None,
                release_key: None,
                timestamp_key: None,
                rollout_key: None,
                mqtt_listen: "127.0.0.1:0",
                mqtt_tls: false,
                p2p_listen: "/ip4/127.0.0.1/tcp/0",
            },
        )
        .unwrap();
        let home = Home::open(dir.path()).unwrap();
        assert!(!enroll(&home, &[("a".into(), key(1))], None, false).unwrap());
        assert_eq!(members(&home), None, "no tag assigned: no members listed");

        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let beta = tags(&["beta", "beta"]);
        assert!(enroll(&home, &[("b".into(), key(2))], Some(&beta), false).unwrap());
        assert_eq!(members(&home).unwrap(), [(key(2), tags(&["beta"]))]);
        // Enrolled again without tags: kept; with others: replaced; emptied: none; a new
        // key for the board keeps its tags.
        assert!(!enroll(&home, &[("b".into(), key(2))], None, false).unwrap());
        assert_eq!(members(&home).unwrap(), [(key(2), tags(&["beta"]))]);
        let kitchen = tags(&["kitchen"]);
        enroll(&home, &[("b".into(), key(2))], Some(&kitchen), false).unwrap();
        assert_eq!(members(&home).unwrap(), [(key(2), kitchen.clone())]);
        enroll(&home, &[("b".into(), key(4))], None, true).unwrap();
        assert_eq!(members(&home).unwrap(), [(key(4), kitchen)]);
        enroll(&home, &[("b".into(), key(4))], Some(&[]), false).unwrap();
        assert_eq!(members(&home).unwrap(), []);

        let bad = ["Not A Tag".to_string()];
        assert!(matches!(
            enroll(&home, &[("c".into(), key(3))], Some(&bad), false),
            Err(EnrollError::Tag(..))
        ));
    }
}
