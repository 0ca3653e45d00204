//! A hosted host: another machine's libvirtd, reached over its network transport
//! (`qemu+tls://HOST/system`), where the device bursts on-demand instances when its own
//! are full. Nothing on the device's disk means anything there, so the image travels
//! through libvirt: it is uploaded into a storage pool of that host (`virStorageVolUpload`),
//! read back and checked against the release's signed digest before any boot, reused by
//! later boots of the release, and deleted when the release is retired. Domains started
//! there carry metadata naming the fleet, device, app and release, so a restarted agent
//! (or one whose hosted host restarted) finds its own again — and no one else's.
//!
//! Runs on the hosted hypervisor's owner thread, inside [`super::libvirt::Libvirt`].

use super::libvirt::xml_escape;
use super::Launch;
use proto::Digest;
use std::collections::HashSet;
use std::path::PathBuf;
use virt::connect::Connect;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

/// The XML namespace of the metadata unifleet writes into hosted domains.
pub const METADATA_NS: &str = "https://unifleet.dev/xmlns/instance/1";

/// Whose domains and volumes these are, and where images go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosted {
    /// The storage pool on the hosted host (`[hosted] pool`).
    pub pool: String,
    pub fleet: String,
    pub device: String,
}

/// Why an image could not be made ready on the hosted host. Never the release's fault.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("reading the image {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no storage pool {pool:?} on the hosted host: {source} (it needs a started pool of \
         that name, e.g. `virsh pool-define-as {pool} dir --target /var/lib/unifleet-hosted \
         && virsh pool-build {pool} && virsh pool-start {pool}`, or set [hosted] pool)"
    )]
    Pool {
        pool: String,
        source: virt::error::Error,
    },
    #[error("{op} {volume} in pool {pool}: {source}")]
    Volume {
        op: VolOp,
        volume: String,
        pool: String,
        source: virt::error::Error,
    },
    #[error(
        "{volume} in pool {pool} holds {found}, not the release's image {expected}: the \
         hosted host did not store it intact"
    )]
    Mismatch {
        volume: String,
        pool: String,
        expected: Digest,
        found: Digest,
    },
}

/// What was being done to a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolOp {
    Path,
    Create,
    Upload,
    Download,
    Delete,
}

impl std::fmt::Display for VolOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VolOp::Path => "finding the path of",
            VolOp::Create => "creating volume",
            VolOp::Upload => "uploading",
            VolOp::Download => "reading back",
            VolOp::Delete => "deleting",
        })
    }
}

/// A hosted host that has not answered keepalives for `KEEPALIVE_SECS` ×
/// `KEEPALIVE_COUNT` is taken for gone: the call waiting on it fails and the next one
/// reconnects.
const KEEPALIVE_SECS: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

/// Keepalives on a new connection to the hosted host (libvirt's event loop runs them:
/// [`start_event_loop`]).
pub(super) fn keep_alive(conn: &Connect, shown: &str) {
    if let Err(e) = conn.set_keep_alive(KEEPALIVE_SECS, KEEPALIVE_COUNT) {
        tracing::warn!(uri = %shown, "no keepalive on the hosted host's connection: {e}");
    }
}

/// libvirt's own event loop, on a thread of its own, started once — before any libvirt
/// connection opens (libvirt wants it registered first): keepalives need it, and without
/// them a call on a connection whose host vanished (a dead link) blocks until TCP gives
/// up, a quarter of an hour. Registered by the thread that runs it, so a loop that could
/// not start is never registered (a registered loop nobody runs drops connections).
pub fn start_event_loop() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(move || {
                let registered = virt::event::event_register_default_impl();
                let ok = registered.is_ok();
                let _ = tx.send(registered);
                if !ok {
                    return;
                }
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::warn!("libvirt's event loop: {e}");
                        std::thread::sleep(std::time::Duration::from_secs(1));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start libvirt's event loop: {e}");
            return;
        }
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("libvirt's event loop not registered: {e}"),
            Err(_) => tracing::warn!("libvirt's event loop thread ended before registering"),
        }
    });
}

/// Bytes per stream message (libvirt's own limit is 256 KiB).
const PIECE: usize = 128 * 1024;

/// The start of the names of the domains and image volumes of `app` of `device` in
/// `fleet` on a hosted host: `uf-` and 16 hex digits of a digest of the three. Devices of
/// several fleets share such a host and names may contain `-`, so `uf-DEVICE-APP-` would
/// not tell `d1`'s app `x-y` from `d1-x`'s app `y` (nor app `web` from `web-api`); this
/// is unique to the three and of one length.
pub fn prefix(fleet: &str, device: &str, app: &str) -> String {
    let d = Digest::of(format!("{fleet}\0{device}\0{app}").as_bytes());
    format!("uf-{}-", &d.to_hex()[..16])
}

/// An image volume's name: the app's [`prefix`], `rRELEASE-` and 16 hex digits of the
/// image's digest, `.img`.
fn volume_name(h: &Hosted, l: &Launch) -> String {
    format!(
        "{}r{}-{}.img",
        app_prefix(h, &l.of.app),
        l.of.release,
        &l.of.image.to_hex()[..16]
    )
}

fn app_prefix(h: &Hosted, app: &str) -> String {
    prefix(&h.fleet, &h.device, app)
}

impl Hosted {
    /// The `<metadata>` element of a domain started for `l`.
    pub fn metadata(&self, l: &Launch) -> String {
        format!(
            "<metadata><uf:instance xmlns:uf='{METADATA_NS}' fleet='{}' device='{}' app='{}' \
             release='{}'/></metadata>",
            xml_escape(&self.fleet),
            xml_escape(&self.device),
            xml_escape(&l.of.app),
            l.of.release
        )
    }

    /// Whether `metadata` (the element read back from a domain) says this device started it.
    pub fn owns(&self, metadata: &str) -> bool {
        let attr = |k: &str, v: &str| {
            metadata.contains(&format!("{k}=\"{}\"", xml_escape(v)))
                || metadata.contains(&format!("{k}='{}'", xml_escape(v)))
        };
        attr("fleet", &self.fleet) && attr("device", &self.device)
    }

    /// Makes `l`'s image ready in the pool and returns its path on the hosted host: an
    /// intact volume already there is reused (checked once per connection), anything else
    /// is uploaded again and checked.
    pub fn stage(
        &self,
        conn: &Connect,
        verified: &mut HashSet<String>,
        l: &Launch,
    ) -> Result<String, StageError> {
        let volume = volume_name(self, l);
        let pool = conn
            .lookup_storage_pool_by_name(&self.pool)
            .map_err(|source| self.pool_error(source))?;
        let err = |op, source| StageError::Volume {
            op,
            volume: volume.clone(),
            pool: self.pool.clone(),
            source,
        };
        // libvirt's list of the pool's volumes is refreshed only when the volume is not
        // on it: another agent or an operator may have changed the directory behind it.
        let found = pool.lookup_storage_vol_by_name(&volume).or_else(|_| {
            let _ = pool.refresh(0);
            pool.lookup_storage_vol_by_name(&volume)
        });
        if let Ok(vol) = found {
            if verified.contains(&volume) {
                return vol.path().map_err(|e| err(VolOp::Path, e));
            }
            match self.check(conn, &vol, &volume, l) {
                Ok(()) => {
                    verified.insert(volume.clone());
                    return vol.path().map_err(|e| err(VolOp::Path, e));
                }
                Err(e) => {
                    tracing::warn!("{e}: uploading it again");
                    vol.delete(0).map_err(|e| err(VolOp::Delete, e))?;
                }
            }
        }
        let image = std::fs::read(&l.image).map_err(|source| StageError::Read {
            path: l.image.clone(),
            source,
        })?;
        let xml = format!(
            "<volume><name>{}</name><capacity unit='bytes'>{}</capacity>\
             <target><format type='raw'/><permissions><mode>0644</mode></permissions></target></volume>",
            xml_escape(&volume),
            image.len()
        );
        let vol = StorageVol::create_xml(&pool, &xml, 0).map_err(|e| err(VolOp::Create, e))?;
        let sent = upload(conn, &vol, &image).map_err(|e| err(VolOp::Upload, e));
        if let Err(e) = sent.and_then(|()| self.check(conn, &vol, &volume, l)) {
            // A half-written volume must not be taken for the image later.
            let _ = vol.delete(0);
            return Err(e);
        }
        tracing::info!(volume = %volume, pool = %self.pool, bytes = image.len(), "image uploaded to the hosted host and checked");
        verified.insert(volume.clone());
        vol.path().map_err(|e| err(VolOp::Path, e))
    }

    /// Reads the volume back and compares its digest with the release's.
    fn check(
        &self,
        conn: &Connect,
        vol: &StorageVol,
        volume: &str,
        l: &Launch,
    ) -> Result<(), StageError> {
        let found = download(conn, vol).map_err(|source| StageError::Volume {
            op: VolOp::Download,
            volume: volume.into(),
            pool: self.pool.clone(),
            source,
        })?;
        match found == l.of.image {
            true => Ok(()),
            false => Err(StageError::Mismatch {
                volume: volume.into(),
                pool: self.pool.clone(),
                expected: l.of.image,
                found,
            }),
        }
    }

    /// Deletes the volumes of `app` this device uploaded, except `keep`'s: the release it
    /// serves now. Returns how many went.
    pub fn retire(
        &self,
        conn: &Connect,
        app: &str,
        keep: Option<&Launch>,
    ) -> Result<u32, StageError> {
        let pool = conn
            .lookup_storage_pool_by_name(&self.pool)
            .map_err(|source| self.pool_error(source))?;
        let _ = pool.refresh(0);
        let keep = keep.map(|l| volume_name(self, l));
        let prefix = app_prefix(self, app);
        let names = pool
            .list_volumes()
            .map_err(|source| self.pool_error(source))?;
        let mut gone = 0;
        for name in names {
            if !name.starts_with(&prefix) || Some(&name) == keep.as_ref() {
                continue;
            }
            let delete = |source| StageError::Volume {
                op: VolOp::Delete,
                volume: name.clone(),
                pool: self.pool.clone(),
                source,
            };
            pool.lookup_storage_vol_by_name(&name)
                .and_then(|v| v.delete(0))
                .map_err(delete)?;
            tracing::info!(volume = %name, pool = %self.pool, "retired image deleted from the hosted host");
            gone += 1;
        }
        Ok(gone)
    }

    fn pool_error(&self, source: virt::error::Error) -> StageError {
        StageError::Pool {
            pool: self.pool.clone(),
            source,
        }
    }
}

/// Sends `image` into `vol` over a libvirt stream.
fn upload(conn: &Connect, vol: &StorageVol, image: &[u8]) -> Result<(), virt::error::Error> {
    let stream = Stream::new(conn, 0)?;
    vol.upload(&stream, 0, image.len() as u64, 0)?;
    let mut rest = image;
    while !rest.is_empty() {
        let n = match stream.send(&rest[..rest.len().min(PIECE)]) {
            Ok(n) => n.max(0) as usize,
            Err(e) => {
                let _ = stream.abort();
                return Err(e);
            }
        };
        rest = &rest[n..];
    }
    stream.finish()
}

/// The BLAKE3 digest of what `vol` holds, read over a libvirt stream.
fn download(conn: &Connect, vol: &StorageVol) -> Result<Digest, virt::error::Error> {
    let stream = Stream::new(conn, 0)?;
    vol.download(&stream, 0, 0, 0)?;
    let mut hasher = proto::digest::Hasher::new();
    let mut buf = vec![0u8; PIECE];
    loop {
        match stream.recv(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n.max(0) as usize]),
            Err(e) => {
                let _ = stream.abort();
                return Err(e);
            }
        }
    }
    stream.finish()?;
    Ok(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosted(device: &str) -> Hosted {
        Hosted {
            pool: "unifleet".into(),
            fleet: "home".into(),
            device: device.into(),
        }
    }

    /// A hosted host runs other devices' (and other tenants') domains: only those whose
    /// metadata names this fleet and device are this agent's to stop.
    #[test]
    fn only_domains_whose_metadata_names_this_device_are_its_own() {
        let l = super::super::fake::launch("uf-d1-a-od1");
        let meta = hosted("d1").metadata(&l);
        assert!(meta.contains(METADATA_NS), "{meta}");
        // libvirt gives the element back with double quotes.
        let back = meta
            .trim_start_matches("<metadata>")
            .trim_end_matches("</metadata>")
            .replace('\'', "\"");
        assert!(hosted("d1").owns(&back));
        assert!(
            !hosted("d10").owns(&back),
            "a device whose name starts alike"
        );
        assert!(!hosted("d2").owns(&back));
        let other_fleet = Hosted {
            fleet: "work".into(),
            ..hosted("d1")
        };
        assert!(!other_fleet.owns(&back));
    }

    /// Volumes are per fleet, device, app and release, so one device's roll-over retires
    /// only its own images of that app.
    #[test]
    fn volume_names_carry_device_app_release_and_digest() {
        let l = super::super::fake::launch("uf-d1-a-od1");
        let name = volume_name(&hosted("d1"), &l);
        assert!(name.starts_with(&app_prefix(&hosted("d1"), "a")), "{name}");
        assert!(
            name.ends_with(&format!("-r1-{}.img", &l.of.image.to_hex()[..16])),
            "{name}"
        );
        // Names may contain `-`: device d1's app x-y is not device d1-x's app y, and app
        // a's names do not start another app's.
        assert_ne!(prefix("home", "d1", "x-y"), prefix("home", "d1-x", "y"));
        assert_ne!(prefix("home", "d1", "a"), prefix("work", "d1", "a"));
        assert!(!name.starts_with(&app_prefix(&hosted("d1"), "a-b")));
        assert_eq!(prefix("home", "d1", "a").len(), "uf-".len() + 16 + 1);
    }
}
