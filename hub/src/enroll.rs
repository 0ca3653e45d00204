//! Enrolling devices: their public keys go into the git store (one commit for the whole
//! batch), and a running hub reloads them. One key, one name: enrolling a name again
//! with another key needs `replace` (and is an event of its own), and a key enrolled
//! under one name cannot be enrolled under a second.

use crate::home::{now, Home};
use crate::store::{Change, Event};
use anyhow::{bail, Context, Result};
use proto::PublicKey;
use std::collections::HashMap;

/// Enrolls each `(name, key)`; everything is checked before anything is written.
pub fn enroll(home: &Home, devices: &[(String, PublicKey)], replace: bool) -> Result<()> {
    let store = home.store()?;
    let mut by_name: HashMap<String, PublicKey> = crate::inventory::load_devices(&store)?
        .into_values()
        .collect();
    let mut change = Change::default();
    for (name, key) in devices {
        proto::names::check("device", name).with_context(|| format!("enrolling {name:?}"))?;
        if let Some((other, _)) = by_name.iter().find(|(n, k)| *k == key && *n != name) {
            bail!(
                "key {} is already enrolled as {other:?}; one key is one device (revoke \
                 {other} first with `hub revoke {other}` if the board was renamed)",
                key.id().short()
            );
        }
        let kind = match by_name.get(name) {
            Some(old) if old == key => continue,
            Some(old) if !replace => bail!(
                "{name} is already enrolled with key {}; pass --replace to give it key {} \
                 (the old key's reports are refused from then on)",
                old.id().short(),
                key.id().short()
            ),
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
