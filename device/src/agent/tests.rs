//! The installer and supervisor against the fake hypervisor: real store, trust, signed
//! manifests and a libp2p node on loopback (with no peers), domains in a table.

use super::inbox::Heard;
use super::installer::Updater;
use crate::config::Config;
use crate::hypervisor::fake::{Fake, Table};
use crate::metrics::DeviceMetrics;
use crate::report::Reporter;
use crate::store::{Installed, Store};
use crate::trust::{Clock, Trust};
use crate::updater::Outcome;
use crate::watchdog::Watchdog;
use proto::manifest::{BootSpec, ChunkRef, HealthProbe, Manifest, Platform, Staging};
use proto::root::{Role, Root, TrustedRoot};
use proto::{Digest, SecretKey};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const FAR: u64 = 4_000_000_000;

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

/// Root version 1: root key 1, release key 2, timestamp key 3, rollout key 9.
fn root_bytes() -> Vec<u8> {
    let role = |n| Role {
        keys: vec![key(n).public()],
        threshold: 1,
    };
    let root = Root {
        fleet: "home".into(),
        version: 1,
        expires_at: FAR,
        root: role(1),
        release: role(2),
        timestamp: role(3),
        rollout: role(9),
    };
    let mut env = root.seal().unwrap();
    env.sign(&key(1)).unwrap();
    env.encode().unwrap()
}

struct Harness {
    upd: Updater,
    table: Arc<Mutex<Table>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let text = "name = \"d1\"\nfleet = \"home\"\nchannel = \"stable\"\napps = [\"hello\"]\n\
                    platform = \"qemu-x86_64\"\nroot = \"root.bin\"\nkey = \"device.key\"\n\
                    state_dir = \"state\"\nmdns = false\n";
        let cfg = Config::parse(text, dir.path()).unwrap();
        let store = Arc::new(Store::open(&cfg.state_dir).unwrap());
        let root = TrustedRoot::bootstrap(&root_bytes(), crate::time::now()).unwrap();
        let trust = Arc::new(Trust::new(
            store.dir(),
            root,
            Clock::open(store.dir(), crate::trust::system_now),
        ));
        let tasks = net::tasks::Tasks::new();
        let mut net_cfg = net::NetConfig::new(net::keypair_from_seed([7; 32]), "home");
        net_cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
        net_cfg.mdns = false;
        let (net, _events) = net::start(net_cfg, &tasks).unwrap();
        let metrics = Arc::new(DeviceMetrics::default());
        let fetcher = crate::fetch::Fetcher::new(
            net.clone(),
            store.clone(),
            vec![],
            &cfg,
            metrics.clone(),
            trust.clone(),
            tasks.clone(),
        );
        let reporter = Arc::new(Reporter::new(
            &cfg,
            key(5),
            net,
            None,
            &metrics,
            tasks.clone(),
        ));
        let (hypervisor, table) = Fake::hypervisor();
        let upd = Updater {
            seed: 0,
            key: proto::SecretKey::from_seed([7; 32]).public(),
            platform: Platform::QemuX86_64,
            cfg,
            trust,
            store,
            fetcher,
            hypervisor,
            hosted: None,
            reporter,
            metrics,
            ondemand: Default::default(),
            tasks,
            free_bytes: Store::free_bytes,
        };
        Harness {
            upd,
            table,
            _dir: dir,
        }
    }

    /// Release `n` of `hello`, signed and stored; its slot is a name only (the fake boots
    /// nothing).
    fn release(&self, n: u64) -> (Manifest, Installed) {
        let m = Manifest {
            fleet: "home".into(),
            app: "hello".into(),
            version: semver::Version::new(1, 0, n),
            release: n,
            channel: "stable".into(),
            platform: Platform::QemuX86_64,
            image_digest: Digest::of(&n.to_le_bytes()),
            image_size: 8,
            chunks: vec![ChunkRef {
                digest: Digest::of(&n.to_le_bytes()),
                size: 8,
            }],
            boot: BootSpec {
                memory_mib: 16,
                vcpus: 1,
                cmdline: String::new(),
                probe: HealthProbe::ConsoleBanner {
                    line: "READY".into(),
                },
                probe_timeout_ms: 1000,
                network: false,
            },
            staging: Staging::Skipped,
            created_at: 1,
            previous: None,
            rollout: Default::default(),
            provenance: None,
        };
        let mut env = m.seal().unwrap();
        env.sign(&key(2)).unwrap();
        let bytes = env.encode().unwrap();
        let digest = Digest::of(&bytes);
        self.upd.store.put_manifest(&digest, &bytes).unwrap();
        let inst = Installed {
            release: n,
            version: m.version.to_string(),
            manifest: digest,
            slot: self.upd.store.dir().join(format!("slots/hello-{n}")),
            accel: None,
        };
        (m, inst)
    }

    /// Release `n` as the router hands it over: announced, signed by the timestamp key.
    fn heard(&self, m: &Manifest, inst: &Installed) -> Heard {
        let now = crate::time::now();
        let ann = proto::announcement::Announcement {
            fleet: m.fleet.clone(),
            app: m.app.clone(),
            channel: m.channel.clone(),
            platform: m.platform,
            release: m.release,
            version: m.version.clone(),
            manifest: inst.manifest,
            issued_at: now,
            expires_at: now + 3600,
        };
        let mut env = ann.seal().unwrap();
        env.sign(&key(3)).unwrap();
        Heard {
            ann,
            bytes: env.encode().unwrap(),
            verified_ms: 0,
        }
    }

    /// The image of release `n` (one chunk), stored: nothing is left to fetch.
    fn store_chunks(&self, m: &Manifest) {
        let image = m.release.to_le_bytes();
        self.upd
            .store
            .put_chunk(&m.chunks[0].digest, &image)
            .unwrap();
    }

    fn running(&self) -> Vec<String> {
        self.table.lock().unwrap().running.keys().cloned().collect()
    }

    fn app(&self) -> crate::store::AppState {
        let state = self.upd.store.load_state().unwrap();
        state.apps.get("hello").cloned().unwrap_or_default()
    }

    /// Release `n` made current (and running), as after its activation.
    async fn current(&self, n: u64) -> Installed {
        let (m, inst) = self.release(n);
        self.upd.activate(&m, inst.clone()).await.unwrap();
        inst
    }
}

const R1: &str = "uf-d1-hello-r1";
const R2: &str = "uf-d1-hello-r2";

#[tokio::test]
async fn activation_retires_the_old_release_and_keeps_it_for_rollback() {
    let h = Harness::new().await;
    h.current(1).await;
    assert_eq!(h.running(), [R1]);
    let (m2, r2) = h.release(2);
    h.upd.activate(&m2, r2).await.unwrap();
    assert_eq!(h.running(), [R2], "the new one runs, the old one stopped");
    let app = h.app();
    assert_eq!(app.current.map(|c| c.release), Some(2));
    assert_eq!(app.previous.map(|c| c.release), Some(1));
    assert!(app.pending.is_none() && app.failed.is_empty());
}

#[tokio::test]
async fn a_release_that_fails_its_probe_is_rolled_back_and_marked_failed() {
    let h = Harness::new().await;
    h.current(1).await;
    h.table.lock().unwrap().dies.insert(R2.into());
    let (m2, r2) = h.release(2);
    h.upd.activate(&m2, r2).await.unwrap();
    assert_eq!(h.running(), [R1], "the old release still runs");
    let app = h.app();
    assert_eq!(app.current.map(|c| c.release), Some(1));
    assert!(
        app.failed.contains(&2),
        "never tried again: {:?}",
        app.failed
    );
    assert!(app.pending.is_none());
}

#[tokio::test]
async fn an_install_interrupted_before_activation_is_finished_at_start() {
    let h = Harness::new().await;
    let r1 = h.current(1).await;
    let (_, r2) = h.release(2);
    // As a kill -9 between "installed" and the activation leaves it.
    let mut state = h.upd.store.load_state().unwrap();
    state.apps.get_mut("hello").unwrap().pending = Some(r2);
    h.upd.store.save_state(&state).unwrap();
    h.table.lock().unwrap().running.clear();
    h.upd.resume().await.unwrap();
    assert_eq!(h.running(), [R2]);
    let app = h.app();
    assert_eq!(app.current.map(|c| c.release), Some(2));
    assert_eq!(app.previous, Some(r1));
}

#[tokio::test]
async fn a_release_that_keeps_dying_is_given_up_for_the_previous_one() {
    let h = Harness::new().await;
    h.current(1).await;
    h.current(2).await;
    let mut dog = Watchdog::new(Duration::from_secs(3600));
    for death in 1..=4 {
        assert!(h.running().contains(&R2.to_string()), "death {death}");
        h.table.lock().unwrap().running.remove(R2);
        h.upd.watch(&mut dog).await;
    }
    assert_eq!(
        h.running(),
        [R1],
        "back on release 1 after the fourth death"
    );
    let app = h.app();
    assert_eq!(app.current.map(|c| c.release), Some(1));
    assert!(app.failed.contains(&2));
    let started = h.table.lock().unwrap().started.clone();
    let r2_boots = started.iter().filter(|n| *n == R2).count();
    assert_eq!(r2_boots, 1 + 3, "the activation and three restarts");
}

/// A hypervisor that could not be reached is not the release's fault: it stays pending
/// and is tried again (it was marked failed for good).
#[tokio::test]
async fn a_hypervisor_failure_is_not_held_against_the_release() {
    let h = Harness::new().await;
    h.current(1).await;
    h.table.lock().unwrap().unreachable.insert(R2.into());
    let (m2, r2) = h.release(2);
    let mut state = h.upd.store.load_state().unwrap();
    state.apps.get_mut("hello").unwrap().pending = Some(r2.clone());
    h.upd.store.save_state(&state).unwrap();
    let err = h.upd.activate(&m2, r2.clone()).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("not counted against it"),
        "{err:#}"
    );
    let app = h.app();
    assert!(app.failed.is_empty(), "{:?}", app.failed);
    assert_eq!(app.pending, Some(r2.clone()), "still to be activated");
    assert_eq!(h.running(), [R1]);
    h.table.lock().unwrap().unreachable.clear();
    h.upd.activate(&m2, r2).await.unwrap();
    assert_eq!(h.running(), [R2]);
}

/// A release the store's file system has no room for is refused before anything of it
/// is fetched, and reported as the disk being full; the release that runs keeps running,
/// and the refused one installs once there is room.
#[tokio::test]
async fn a_release_the_disk_has_no_room_for_is_refused_and_the_old_one_runs_on() {
    let mut h = Harness::new().await;
    h.current(1).await;
    let (m2, r2) = h.release(2);
    let heard = h.heard(&m2, &r2);
    h.upd.free_bytes = |_| Some(4);
    assert_eq!(h.upd.attempt(&heard).await, Outcome::Failed);
    assert_eq!(h.running(), [R1], "the old release still runs");
    let app = h.app();
    assert_eq!(app.current.map(|c| c.release), Some(1));
    assert!(app.pending.is_none());
    assert!(
        app.failed.is_empty(),
        "tried again later, not given up: {:?}",
        app.failed
    );
    let status = std::fs::read_to_string(h.upd.store.dir().join("status.json")).unwrap();
    assert!(
        status.contains("update to release 2") && status.contains("No space left"),
        "{status}"
    );
    assert!(
        !h.upd.store.has_chunk(&m2.chunks[0].digest),
        "nothing of it was fetched"
    );

    // The disk was freed: the retry installs it.
    h.upd.free_bytes = |_| Some(u64::MAX);
    h.release(2);
    h.store_chunks(&m2);
    assert_eq!(h.upd.attempt(&heard).await, Outcome::Done);
    assert_eq!(h.running(), [R2]);
    assert_eq!(h.app().current.map(|c| c.release), Some(2));
}
