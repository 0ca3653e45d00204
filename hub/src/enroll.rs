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
/// before anything is written.
pub fn enroll(
    home: &Home,
    devices: &[(String, PublicKey)],
    tags: Option<&[String]>,
    replace: bool,
) -> Result<(), EnrollError> {
    check_tags(tags.unwrap_or_default())?;
    let store = home.store()?;
    let mut by_name: HashMap<String, PublicKey> = crate::inventory::load_devices(&store)?
        .into_values()
        .collect();
    let mut change = Change::default();
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
    let named: Vec<&str> = devices.iter().map(|(n, _)| n.as_str()).collect();
    let listed = members(home, &store, &by_name, &named, tags, &mut change)?;
    if change.is_empty() {
        return Ok(());
    }
    let message = match devices {
        [(name, _)] => format!("enroll {name}"),
        _ => format!("enroll {} devices", devices.len()),
    };
    store.commit(&message, &change, None)?;
    crate::control::reload_devices(home);
    if listed {
        // A running hub spreads the new list (devices learn their tags from it).
        crate::control::reload_trust(home, &mut |_| {});
    }
    Ok(())
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

/// Adds to `change` a revocation list one version up naming every enrolled device
/// (`by_name`) with its tags — `tags` for the `named` ones where given, else those the
/// last list gave it — when that differs from the members the stored list names; says
/// whether it did.
fn members(
    home: &Home,
    store: &crate::store::Store,
    by_name: &HashMap<String, PublicKey>,
    named: &[&str],
    tags: Option<&[String]>,
    change: &mut Change,
) -> Result<bool, EnrollError> {
    let root = home.anchor_root()?;
    let mut list = crate::trust::revocations(store, &root)?
        .map(|(l, _)| l)
        .unwrap_or_else(|| proto::revocation::Revocations {
            fleet: root.fleet().into(),
            ..Default::default()
        });
    let old = list.members.clone().unwrap_or_default();
    let old_tags = |name: &str| {
        old.iter()
            .find(|m| m.name == name)
            .map(|m| m.tags.clone())
            .unwrap_or_default()
    };
    let mut members: Vec<proto::revocation::Member> = by_name
        .iter()
        .filter(|(_, key)| !list.is_revoked(key))
        .map(|(name, key)| proto::revocation::Member {
            name: name.clone(),
            key: *key,
            tags: match tags {
                Some(t) if named.contains(&name.as_str()) => t.to_vec(),
                _ => old_tags(name),
            },
        })
        .collect();
    members.sort_by(|a, b| a.name.cmp(&b.name));
    // A fleet that never assigned a tag keeps lists without members, which devices from
    // before tags can still read (a list with members is new to them).
    let unused = list.members.is_none() && members.iter().all(|m| m.tags.is_empty());
    if unused || list.members.as_ref() == Some(&members) {
        return Ok(false);
    }
    for m in members.iter().filter(|m| m.tags != old_tags(&m.name)) {
        let detail = format!(
            "tags [{}] (were [{}])",
            m.tags.join(", "),
            old_tags(&m.name).join(", ")
        );
        change.event(event(&m.name, "tag", detail));
    }
    list.version += 1;
    list.issued_at = now();
    list.members = Some(members);
    let key = home.timestamp_key()?;
    let signed = list
        .seal()
        .and_then(|mut env| {
            env.sign(&key)?;
            env.encode()
        })
        .map_err(EnrollError::Sign)?;
    change.put("revocations.bin", signed);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> PublicKey {
        proto::SecretKey::from_seed([seed; 32]).public()
    }

    fn members(home: &Home) -> Option<Vec<(String, Vec<String>)>> {
        let store = home.store().unwrap();
        let root = home.anchor_root().unwrap();
        let (list, _) = crate::trust::revocations(&store, &root).unwrap()?;
        let members = list.members?;
        Some(members.into_iter().map(|m| (m.name, m.tags)).collect())
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
                p2p_listen: "/ip4/127.0.0.1/tcp/0",
            },
        )
        .unwrap();
        let home = Home::open(dir.path()).unwrap();
        enroll(&home, &[("a".into(), key(1))], None, false).unwrap();
        assert_eq!(members(&home), None, "no tag assigned: no members listed");

        let beta = ["beta".to_string()];
        enroll(&home, &[("b".into(), key(2))], Some(&beta), false).unwrap();
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            members(&home).unwrap(),
            [("a".into(), vec![]), ("b".into(), tags(&["beta"]))]
        );
        // Enrolled again without tags: kept; with others: replaced; emptied: none.
        enroll(&home, &[("b".into(), key(2))], None, false).unwrap();
        assert_eq!(members(&home).unwrap()[1].1, tags(&["beta"]));
        let kitchen = ["kitchen".to_string()];
        enroll(&home, &[("b".into(), key(2))], Some(&kitchen), false).unwrap();
        assert_eq!(members(&home).unwrap()[1].1, tags(&["kitchen"]));
        enroll(&home, &[("b".into(), key(2))], Some(&[]), false).unwrap();
        assert_eq!(members(&home).unwrap()[1].1, tags(&[]));

        let bad = ["Not A Tag".to_string()];
        assert!(matches!(
            enroll(&home, &[("c".into(), key(3))], Some(&bad), false),
            Err(EnrollError::Tag(..))
        ));
    }
}
