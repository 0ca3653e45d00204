//! Property tests: every message round-trips, and no input makes a decoder panic.

mod common;

use common::*;
use proptest::prelude::*;
use proto::announcement::Announcement;
use proto::codec::{self, Kind};
use proto::envelope::Envelope;
use proto::manifest::{HealthProbe, Manifest, Platform, Staging};
use proto::Digest;

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,20}"
}

fn digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Digest)
}

fn platform() -> impl Strategy<Value = Platform> {
    prop::sample::select(Platform::ALL.to_vec())
}

prop_compose! {
    fn manifest()(
        app in name(), channel in name(), release in 1u64.., platform in platform(),
        sizes in prop::collection::vec(1u64..=262_144, 1..50), digests in prop::collection::vec(digest(), 50),
        major in 0u64..100, minor in 0u64..100, cmdline in ".{0,40}", port in any::<u16>(), banner in any::<bool>(),
        skipped in any::<bool>(), report in digest(), previous in prop::option::of(digest()),
        created in any::<u64>(), mem in 1u32.., vcpus in 1u32..64,
    ) -> Manifest {
        let mut m = manifest_for(&image(20_000, 1), release);
        m.app = app; m.channel = channel; m.platform = platform;
        m.chunks = sizes.iter().zip(&digests).map(|(s, d)| proto::manifest::ChunkRef { digest: *d, size: *s }).collect();
        m.image_size = sizes.iter().sum();
        m.version = semver::Version::new(major, minor, 0);
        m.boot.cmdline = cmdline; m.boot.memory_mib = mem; m.boot.vcpus = vcpus;
        m.boot.probe = if banner { HealthProbe::ConsoleBanner { line: "READY x".into() } } else { HealthProbe::TcpConnect { port } };
        m.staging = if skipped { Staging::Skipped } else { Staging::Passed { report } };
        m.previous = previous; m.created_at = created;
        m
    }
}

proptest! {
    #[test]
    fn manifest_round_trips(m in manifest()) {
        let bytes = codec::encode(Kind::Manifest, &m).unwrap();
        let back: Manifest = codec::decode(Kind::Manifest, &bytes).unwrap();
        prop_assert_eq!(back, m);
    }

    #[test]
    fn signed_manifest_round_trips(m in manifest()) {
        let bytes = signed(m.seal().unwrap(), &[&key(10)]);
        let env = Envelope::decode(&bytes, Kind::Manifest).unwrap();
        let back: Manifest = env.open("release", &root_v1().release).unwrap();
        prop_assert_eq!(back, m);
    }

    #[test]
    fn announcement_round_trips(app in name(), channel in name(), release in any::<u64>(), d in digest(), issued in any::<u64>(), exp in any::<u64>(), p in platform()) {
        let a = Announcement {
            fleet: "home".into(), app, channel, platform: p, release,
            version: semver::Version::new(1, 2, 3), manifest: d, issued_at: issued, expires_at: exp,
        };
        let bytes = signed(a.seal().unwrap(), &[&key(20)]);
        prop_assert!(bytes.len() < 1024);
        let env = Envelope::decode(&bytes, Kind::Announcement).unwrap();
        let back: Announcement = env.open("timestamp", &root_v1().timestamp).unwrap();
        prop_assert_eq!(back, a);
    }

    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let root = trusted_v1();
        let _ = proto::manifest::verify_manifest(&bytes, &root, &expect(None), NOW);
        let _ = proto::announcement::verify_announcement(&bytes, &root, NOW);
        let _ = proto::revocation::verify_revocations(&bytes, &root, 0);
        let _ = root.update(&bytes, NOW);
        let _ = proto::root::TrustedRoot::bootstrap(&bytes, NOW);
        let _ = proto::image::inspect(&bytes, bytes.len() as u64);
    }

    #[test]
    fn framed_garbage_never_panics(kind in 1u8..=4, body in prop::collection::vec(any::<u8>(), 0..2048)) {
        let mut bytes = b"UFLT\x01".to_vec();
        bytes.push(kind);
        bytes.extend_from_slice(&body);
        let _ = codec::decode::<Manifest>(Kind::Manifest, &bytes);
        let _ = codec::decode::<Envelope>(Kind::Envelope, &bytes);
        let _ = codec::decode::<proto::root::Root>(Kind::Root, &bytes);
        let _ = codec::decode::<Announcement>(Kind::Announcement, &bytes);
    }

    #[test]
    fn flipping_any_byte_of_a_signed_manifest_is_refused(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut bytes = signed(manifest_for(&image(100_000, 2), 2).seal().unwrap(), &[&key(10)]);
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        prop_assert!(proto::manifest::verify_manifest(&bytes, &trusted_v1(), &expect(None), NOW).is_err());
    }

    #[test]
    fn elf_like_garbage_never_panics(body in prop::collection::vec(any::<u8>(), 0..4096)) {
        let mut bytes = b"\x7fELF".to_vec();
        bytes.extend_from_slice(&body);
        let _ = proto::image::inspect(&bytes, bytes.len() as u64);
    }
}
