//! Deterministic fixtures: keys from fixed seeds, fixed times, so signatures (ed25519 is
//! deterministic) and therefore whole messages are byte-for-byte reproducible.
#![allow(dead_code)]

use proto::announcement::Announcement;
use proto::chunking;
use proto::envelope::Envelope;
use proto::manifest::{BootSpec, ChunkRef, Expectations, HealthProbe, Manifest, Platform, Staging};
use proto::root::{Role, Root, TrustedRoot};
use proto::{Digest, SecretKey};

pub const NOW: u64 = 1_800_000_000;
pub const DAY: u64 = 86_400;

pub fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

pub fn role(keys: &[&SecretKey], threshold: u32) -> Role {
    Role {
        keys: keys.iter().map(|k| k.public()).collect(),
        threshold,
    }
}

/// Root keys 1,2,3 (2-of-3), release keys 10,11 (1-of-2 unless changed), timestamp key 20,
/// rollout key 30.
pub fn root_v1() -> Root {
    Root {
        fleet: "home".into(),
        version: 1,
        expires_at: NOW + 365 * DAY,
        root: role(&[&key(1), &key(2), &key(3)], 2),
        release: role(&[&key(10), &key(11)], 1),
        timestamp: role(&[&key(20)], 1),
        rollout: role(&[&key(30)], 1),
    }
}

pub fn signed(env: Envelope, keys: &[&SecretKey]) -> Vec<u8> {
    let mut env = env;
    for k in keys {
        env.sign(k).unwrap();
    }
    env.encode().unwrap()
}

pub fn trusted_v1() -> TrustedRoot {
    trusted(root_v1())
}

/// `root` signed by root keys 1 and 2 and bootstrapped at [`NOW`].
pub fn trusted(root: Root) -> TrustedRoot {
    TrustedRoot::bootstrap(&signed(root.seal().unwrap(), &[&key(1), &key(2)]), NOW).unwrap()
}

/// A small deterministic image and its chunk list.
pub fn image(len: usize, seed: u8) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn manifest_for(data: &[u8], release: u64) -> Manifest {
    let chunks: Vec<ChunkRef> = chunking::chunks(data)
        .map(|c| {
            let c = c.unwrap();
            ChunkRef {
                digest: c.digest,
                size: c.data.len() as u64,
            }
        })
        .collect();
    Manifest {
        fleet: "home".into(),
        app: "hello".into(),
        version: semver::Version::new(1, 0, release),
        release,
        channel: "stable".into(),
        platform: Platform::QemuX86_64,
        image_digest: Digest::of(data),
        image_size: data.len() as u64,
        chunks,
        boot: BootSpec {
            memory_mib: 32,
            vcpus: 1,
            cmdline: String::new(),
            probe: HealthProbe::ConsoleBanner {
                line: "READY hello 1.0.0".into(),
            },
            probe_timeout_ms: 10_000,
            network: false,
        },
        staging: Staging::Passed {
            report: Digest::of(b"staging report"),
        },
        created_at: NOW,
        previous: None,
        rollout: Default::default(),
        provenance: None,
    }
}

pub fn announcement(release: u64, manifest: Digest) -> Announcement {
    Announcement {
        fleet: "home".into(),
        app: "hello".into(),
        channel: "stable".into(),
        platform: Platform::QemuX86_64,
        release,
        version: semver::Version::new(1, 0, release),
        manifest,
        issued_at: NOW - 3600,
        expires_at: NOW + 7 * DAY,
    }
}

pub fn expect(installed: Option<u64>) -> Expectations<'static> {
    Expectations {
        app: Some("hello"),
        channel: "stable",
        platform: Platform::QemuX86_64,
        installed_release: installed,
    }
}
