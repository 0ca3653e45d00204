//! Enrolling devices: their public keys go into the git store (one commit for the whole
//! batch), and a running hub reloads them. One key, one name: enrolling a name again
//! with another key needs `replace` (and is an event of its own), and a key enrolled
//! under one name cannot be enrolled under a second.

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

/// Enrolls each `(name, key)`; everything is checked before anything is written.
pub fn enroll(
    home: &Home,
    devices: &[(String, PublicKey)],
    replace: bool,
) -> Result<(), EnrollError> {
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
        change.event(Event {
            at: now(),
            kind: kind.into(),
            app: None,
            channel: None,
            release: None,
            device: Some(name.clone()),
            detail,
        });
    }
    if change.is_empty() {
        return Ok(());
    }
    let message = match devices {
        [(name, _)] => format!("enroll {name}"),
        _ => format!("enroll {} devices", devices.len()),
    };
    store.commit(&message, &change, None)?;
    crate::control::reload_devices(home);
    Ok(())
}
