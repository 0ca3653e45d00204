//! What the hub knows of its devices: the enrolled keys (in the store) and each device's
//! last report (`inventory.json`).

use crate::home::{write_atomic, Home, WriteError};
use crate::store::{Store, StoreError};
use proto::keys::{KeyId, PublicKey};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// One device as the hub last saw it. Survives restarts (`inventory.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceEntry {
    pub device: String,
    pub app: String,
    pub channel: String,
    pub release: Option<u64>,
    pub version: Option<String>,
    #[serde(default)]
    pub manifest: Option<proto::Digest>,
    pub state: String,
    pub detail: String,
    pub last_seen: u64,
    pub seq: u64,
    pub bytes_from_peers: u64,
    pub bytes_from_hub: u64,
    /// For an app served on demand: instances by location, boots, scale decisions.
    #[serde(default)]
    pub ondemand: Option<proto::status::OnDemandCounts>,
    /// For an app served on demand with a hosted host: instance time and connections
    /// there (what a hosted provider bills), and why it is not used when it is not.
    #[serde(default)]
    pub hosted: Option<proto::status::HostedUse>,
    /// Reachability (public, relayed, unreachable) and bytes by path (LAN, direct, relayed, hub).
    #[serde(default)]
    pub network: Option<proto::status::NetworkCounts>,
    /// The device's tags, from its signed reports (releases may target them).
    #[serde(default)]
    pub tags: Vec<String>,
    /// The release it rolled back from, when `state` is `rolled-back`.
    #[serde(default)]
    pub failed_release: Option<u64>,
    /// What it boots (`None`: an entry written before reports said).
    #[serde(default)]
    pub platform: Option<proto::manifest::Platform>,
}

pub type Inventory = BTreeMap<String, DeviceEntry>;

pub fn load_inventory(home: &Home) -> Inventory {
    std::fs::read(home.inventory_path())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

pub(crate) fn save_inventory(home: &Home, inv: &Inventory) -> Result<(), WriteError> {
    let path = home.inventory_path();
    match serde_json::to_vec_pretty(inv) {
        Ok(bytes) => write_atomic(&path, &bytes),
        Err(source) => Err(WriteError::Encode { path, source }),
    }
}

/// Enrolled device keys: key id -> (device name, key).
pub fn load_devices(store: &Store) -> Result<HashMap<KeyId, (String, PublicKey)>, StoreError> {
    let mut out = HashMap::new();
    for file in store.list("devices")? {
        let Some(name) = file.strip_suffix(".pub") else {
            continue;
        };
        let bytes = store.read(&format!("devices/{file}"))?.unwrap_or_default();
        match PublicKey::from_text(&String::from_utf8_lossy(&bytes)) {
            Ok(k) => {
                out.insert(k.id(), (name.to_string(), k));
            }
            Err(e) => tracing::warn!(device = name, "enrolled key unreadable: {e}"),
        }
    }
    Ok(out)
}
