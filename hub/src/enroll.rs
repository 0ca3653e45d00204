//! Enrolling devices: their public keys go into the git store (one commit for the whole
//! batch), and a running hub reloads them.

use crate::home::{now, Home};
use crate::store::{Change, Event};
use anyhow::{Context, Result};
use proto::PublicKey;

/// Enrolls each `(name, key)`; names are checked before anything is written.
pub fn enroll(home: &Home, devices: &[(String, PublicKey)]) -> Result<()> {
    let mut change = Change::default();
    for (name, key) in devices {
        proto::names::check("device", name)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("enrolling {name:?}"))?;
        change.put(format!("devices/{name}.pub"), key.to_text().into_bytes());
        change.event(Event {
            at: now(),
            kind: "enroll".into(),
            app: None,
            channel: None,
            release: None,
            device: Some(name.clone()),
            detail: format!("key {}", key.id().short()),
        });
    }
    let message = match devices {
        [(name, _)] => format!("enroll {name}"),
        _ => format!("enroll {} devices", devices.len()),
    };
    home.store()?.commit(&message, &change, None)?;
    crate::control::reload_devices(home);
    Ok(())
}
