//! What the hub accepted and has not written yet, and the batch that writes it: each
//! device's latest report (the staging gate's evidence), the inventory, events as one git
//! commit. Written once a second off the loop: at 1,000 devices, writing and syncing the
//! inventory for every report held the loop, and with it every blob request, for seconds
//! at a time.

use crate::home::{write_atomic, Home};
use crate::inventory::{save_inventory, Inventory};
use crate::store::Change;
use crate::store_owner::StoreWriter;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Default)]
pub(super) struct Pending {
    pub inventory: bool,
    /// Latest signed report per file (an older one for the same file is superseded).
    pub reports: HashMap<PathBuf, Vec<u8>>,
    pub events: Change,
}

impl Pending {
    /// The batch to write, if anything is pending.
    pub fn take(&mut self, inventory: &Inventory) -> Option<Batch> {
        if !self.inventory && self.reports.is_empty() && self.events.is_empty() {
            return None;
        }
        let batch = Batch {
            inventory: std::mem::take(&mut self.inventory).then(|| Arc::new(inventory.clone())),
            reports: std::mem::take(&mut self.reports),
            events: std::mem::take(&mut self.events),
        };
        Some(batch)
    }
}

/// One batch of writes: files on a blocking thread, events through the store's writer.
pub(super) struct Batch {
    /// The inventory when it changed (also published to the dashboard, see
    /// [`Batch::inventory`]).
    inventory: Option<Arc<Inventory>>,
    reports: HashMap<PathBuf, Vec<u8>>,
    events: Change,
}

impl Batch {
    /// The inventory this batch writes, if it changed.
    pub fn inventory(&self) -> Option<&Arc<Inventory>> {
        self.inventory.as_ref()
    }

    /// On a blocking thread outside the tree: the hub's loop awaits every write, the last
    /// one included, before it exits.
    #[allow(clippy::disallowed_methods)]
    pub async fn write(self, home: Home, store: StoreWriter) {
        let Batch {
            inventory,
            reports,
            events,
        } = self;
        let files = tokio::task::spawn_blocking(move || {
            for (path, bytes) in &reports {
                if let Err(e) = write_atomic(path, bytes) {
                    tracing::error!("keeping report {}: {}", path.display(), proto::Chain(&e));
                }
            }
            if let Some(inv) = &inventory {
                if let Err(e) = save_inventory(&home, inv) {
                    tracing::error!("saving inventory: {}", proto::Chain(&e));
                }
            }
        });
        if let Err(e) = files.await {
            tracing::error!("writing reports and inventory: {e}");
        }
        if !events.is_empty() {
            if let Err(e) = store.commit("device events", events).await {
                tracing::error!("committing events: {}", proto::Chain(&e));
            }
        }
    }
}
