//! One test per refusal: every attack a verifier must stop, each with its own typed error.

mod common;

use common::*;
use proto::announcement::verify_announcement;
use proto::codec::{CodecError, Kind};
use proto::envelope::Envelope;
use proto::manifest::{verify_chunk, verify_manifest, ImageVerifier, Platform};
use proto::{Digest, VerifyError};

fn signed_manifest(release: u64) -> (Vec<u8>, Vec<u8>) {
    let data = image(300_000, 1);
    let m = manifest_for(&data, release);
    (data, signed(m.seal().unwrap(), &[&key(10)]))
}

#[test]
fn valid_manifest_and_image_verify() {
    let root = trusted_v1();
    let (data, bytes) = signed_manifest(3);
    let v = verify_manifest(&bytes, &root, &expect(Some(2)), NOW).unwrap();
    assert_eq!(v.digest(), Digest::of(&bytes));
    let mut iv = ImageVerifier::new(v.manifest());
    let mut off = 0;
    for c in &v.manifest().chunks {
        iv.push(&data[off..off + c.size as usize]).unwrap();
        off += c.size as usize;
    }
    iv.finish().unwrap();
}

#[test]
fn bad_signature() {
    let (_, mut bytes) = signed_manifest(3);
    let last = bytes.len() - 1; // the last byte belongs to the signature
    bytes[last] ^= 0x01;
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &expect(None), NOW),
        Err(VerifyError::BadSignature {
            kind: Kind::Manifest,
            ..
        })
    ));
}

#[test]
fn tampered_payload_is_a_bad_signature() {
    let data = image(300_000, 1);
    let m = manifest_for(&data, 3);
    let mut env = m.seal().unwrap();
    env.sign(&key(10)).unwrap();
    // Change the release number inside the signed bytes (varint 3 -> 9).
    let pos = env.payload.iter().rposition(|b| *b == 3).unwrap();
    env.payload[pos] = 9;
    let bytes = env.encode().unwrap();
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &expect(None), NOW),
        Err(VerifyError::BadSignature { .. })
    ));
}

#[test]
fn unknown_key() {
    let data = image(100_000, 1);
    let bytes = signed(manifest_for(&data, 1).seal().unwrap(), &[&key(99)]);
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &expect(None), NOW),
        Err(VerifyError::UnknownKey { kind: Kind::Manifest, key_id }) if key_id == key(99).id()
    ));
}

#[test]
fn unknown_key_beside_valid_ones_is_refused() {
    let data = image(100_000, 1);
    let bytes = signed(
        manifest_for(&data, 1).seal().unwrap(),
        &[&key(10), &key(99)],
    );
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &expect(None), NOW),
        Err(VerifyError::UnknownKey { .. })
    ));
}

#[test]
fn root_key_cannot_sign_releases() {
    let data = image(100_000, 1);
    let bytes = signed(manifest_for(&data, 1).seal().unwrap(), &[&key(1)]);
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &expect(None), NOW),
        Err(VerifyError::UnknownKey { .. })
    ));
}

#[test]
fn missing_signature() {
    let data = image(100_000, 1);
    let bytes = signed(manifest_for(&data, 1).seal().unwrap(), &[]);
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &expect(None), NOW),
        Err(VerifyError::MissingSignature {
            kind: Kind::Manifest
        })
    ));
}

#[test]
fn below_threshold() {
    let mut r = root_v1();
    r.release.threshold = 2;
    let root =
        proto::root::TrustedRoot::bootstrap(&signed(r.seal().unwrap(), &[&key(1), &key(2)]), NOW)
            .unwrap();
    let data = image(100_000, 1);
    let bytes = signed(manifest_for(&data, 1).seal().unwrap(), &[&key(10)]);
    assert!(matches!(
        verify_manifest(&bytes, &root, &expect(None), NOW),
        Err(VerifyError::BelowThreshold {
            role: "release",
            have: 1,
            need: 2,
            ..
        })
    ));
    let both = signed(
        manifest_for(&data, 1).seal().unwrap(),
        &[&key(10), &key(11)],
    );
    verify_manifest(&both, &root, &expect(None), NOW).unwrap();
}

#[test]
fn duplicate_signatures_count_once() {
    let mut r = root_v1();
    r.release.threshold = 2;
    let root =
        proto::root::TrustedRoot::bootstrap(&signed(r.seal().unwrap(), &[&key(1), &key(2)]), NOW)
            .unwrap();
    let data = image(100_000, 1);
    let mut env = manifest_for(&data, 1).seal().unwrap();
    env.sign(&key(10)).unwrap();
    let dup = env.signatures[0].clone();
    env.signatures.push(dup);
    assert!(matches!(
        verify_manifest(&env.encode().unwrap(), &root, &expect(None), NOW),
        Err(VerifyError::BelowThreshold { have: 1, .. })
    ));
}

#[test]
fn a_manifest_does_not_expire_its_root_does() {
    // Content is long-lived: two years on, the release keys' signature still verifies ...
    let (_, bytes) = signed_manifest(3);
    let mut root = root_v1();
    root.expires_at = NOW + 5 * 365 * DAY;
    let long = trusted(root);
    verify_manifest(&bytes, &long, &expect(None), NOW + 2 * 365 * DAY).unwrap();
    // ... while an expired root refuses everything (a freeze after revoked keys).
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &expect(None), NOW + 400 * DAY),
        Err(VerifyError::Expired {
            kind: Kind::Root,
            ..
        })
    ));
}

#[test]
fn rollback_and_replay() {
    let (_, bytes) = signed_manifest(3);
    for installed in [3, 4] {
        assert!(matches!(
            verify_manifest(&bytes, &trusted_v1(), &expect(Some(installed)), NOW),
            Err(VerifyError::Rollback { offered: 3, .. })
        ));
    }
}

#[test]
fn wrong_channel() {
    let (_, bytes) = signed_manifest(3);
    let mut e = expect(None);
    e.channel = "beta";
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &e, NOW),
        Err(VerifyError::WrongChannel { .. })
    ));
}

#[test]
fn wrong_platform() {
    let (_, bytes) = signed_manifest(3);
    let mut e = expect(None);
    e.platform = Platform::XenArm32;
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &e, NOW),
        Err(VerifyError::WrongPlatform { .. })
    ));
}

#[test]
fn wrong_app() {
    let (_, bytes) = signed_manifest(3);
    let mut e = expect(None);
    e.app = Some("other");
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &e, NOW),
        Err(VerifyError::WrongApp { .. })
    ));
}

#[test]
fn wrong_fleet() {
    let data = image(100_000, 1);
    let mut m = manifest_for(&data, 1);
    m.fleet = "neighbours".into();
    let bytes = signed(m.seal().unwrap(), &[&key(10)]);
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &expect(None), NOW),
        Err(VerifyError::WrongFleet { .. })
    ));
}

#[test]
fn chunk_digest_mismatch() {
    let data = image(300_000, 1);
    let m = manifest_for(&data, 1);
    let c = m.chunks[0];
    let mut bad = data[..c.size as usize].to_vec();
    bad[10] ^= 0xFF;
    assert!(matches!(
        verify_chunk(0, &c, &bad),
        Err(VerifyError::ChunkDigestMismatch { index: 0, .. })
    ));
}

#[test]
fn image_digest_mismatch() {
    let data = image(300_000, 1);
    let mut m = manifest_for(&data, 1);
    m.image_digest = Digest::of(b"something else");
    let mut iv = ImageVerifier::new(&m);
    let mut off = 0;
    for c in &m.chunks {
        iv.push(&data[off..off + c.size as usize]).unwrap();
        off += c.size as usize;
    }
    assert!(matches!(
        iv.finish(),
        Err(VerifyError::ImageDigestMismatch { .. })
    ));
}

#[test]
fn endless_data_chunk() {
    let data = image(300_000, 1);
    let m = manifest_for(&data, 1);
    let c = m.chunks[0];
    let mut long = data[..c.size as usize].to_vec();
    long.push(0);
    assert!(matches!(
        verify_chunk(0, &c, &long),
        Err(VerifyError::TooManyBytes { declared, received, .. }) if declared == c.size && received == c.size + 1
    ));
}

#[test]
fn endless_data_image() {
    let data = image(300_000, 1);
    let m = manifest_for(&data, 1);
    let mut iv = ImageVerifier::new(&m);
    let mut off = 0;
    for c in &m.chunks {
        iv.push(&data[off..off + c.size as usize]).unwrap();
        off += c.size as usize;
    }
    assert!(matches!(
        iv.push(b"more"),
        Err(VerifyError::TooManyBytes { .. })
    ));
}

#[test]
fn truncated_image() {
    let data = image(300_000, 1);
    let m = manifest_for(&data, 1);
    let mut iv = ImageVerifier::new(&m);
    iv.push(&data[..m.chunks[0].size as usize]).unwrap();
    assert!(matches!(iv.finish(), Err(VerifyError::TooFewBytes { .. })));
}

#[test]
fn oversized_manifest_envelope() {
    let bytes = vec![0u8; proto::envelope::envelope_limit(Kind::Manifest) + 1];
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &expect(None), NOW),
        Err(VerifyError::Codec(CodecError::Oversized { .. }))
    ));
}

#[test]
fn oversized_announcement() {
    let mut a = announcement(1, Digest::of(b"m"));
    a.version = semver::Version::parse(&format!("1.0.0-{}", "x".repeat(1100))).unwrap();
    // Encoding refuses to produce it ...
    assert!(matches!(a.seal(), Err(CodecError::Oversized { .. })));
    // ... and a hand-built one is refused before decoding.
    let bytes = vec![0u8; proto::envelope::envelope_limit(Kind::Announcement) + 1];
    assert!(matches!(
        verify_announcement(&bytes, &trusted_v1(), NOW),
        Err(VerifyError::Codec(CodecError::Oversized { .. }))
    ));
}

#[test]
fn announcement_is_small_and_verifies() {
    let a = announcement(7, Digest::of(b"m"));
    let bytes = signed(a.seal().unwrap(), &[&key(20)]);
    assert!(bytes.len() < 1024, "announcement is {} bytes", bytes.len());
    let ann = verify_announcement(&bytes, &trusted_v1(), NOW).unwrap();
    assert_eq!(ann, a);
    expect(Some(6)).applies(&ann).unwrap();
    assert!(matches!(
        expect(Some(7)).applies(&ann),
        Err(VerifyError::Rollback { .. })
    ));
    assert!(matches!(
        verify_announcement(&bytes, &trusted_v1(), a.expires_at),
        Err(VerifyError::Expired {
            kind: Kind::Announcement,
            ..
        })
    ));
}

#[test]
fn only_the_timestamp_role_signs_announcements() {
    // A release key signs content, not freshness: its announcement is refused.
    let a = announcement(7, Digest::of(b"m"));
    let bytes = signed(a.seal().unwrap(), &[&key(10)]);
    assert!(matches!(
        verify_announcement(&bytes, &trusted_v1(), NOW),
        Err(VerifyError::UnknownKey { .. })
    ));
    // And the timestamp key signs no release.
    let m = manifest_for(&image(100_000, 1), 1);
    let bytes = signed(m.seal().unwrap(), &[&key(20)]);
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &expect(None), NOW),
        Err(VerifyError::UnknownKey { .. })
    ));
}

#[test]
fn a_root_may_not_share_a_key_between_roles() {
    let mut r = root_v1();
    r.timestamp = role(&[&key(10)], 1);
    assert!(
        matches!(r.validate(), Err(VerifyError::Invalid { kind: Kind::Root, reason }) if reason.to_string().contains("both"))
    );
    let mut r = root_v1();
    r.timestamp = role(&[&key(20), &key(21)], 2);
    assert!(
        matches!(r.validate(), Err(VerifyError::Invalid { kind: Kind::Root, reason }) if reason.to_string().contains("must be 1"))
    );
}

#[test]
fn announcement_is_not_a_manifest() {
    let bytes = signed(
        announcement(1, Digest::of(b"m")).seal().unwrap(),
        &[&key(10)],
    );
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &expect(None), NOW),
        Err(VerifyError::Codec(CodecError::WrongKind {
            expected: Kind::Manifest,
            found: Kind::Announcement
        }))
    ));
}

#[test]
fn unknown_format_version_is_typed() {
    let (_, mut bytes) = signed_manifest(1);
    bytes[4] = 9;
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &expect(None), NOW),
        Err(VerifyError::Codec(CodecError::UnsupportedVersion {
            found: 9
        }))
    ));
}

#[test]
fn inconsistent_manifest_is_invalid() {
    let data = image(300_000, 1);
    let mut m = manifest_for(&data, 1);
    m.image_size += 1;
    let bytes = signed(m.seal().unwrap(), &[&key(10)]);
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &expect(None), NOW),
        Err(VerifyError::Invalid {
            kind: Kind::Manifest,
            ..
        })
    ));
}

#[test]
fn too_many_signatures() {
    let data = image(100_000, 1);
    let mut env: Envelope = manifest_for(&data, 1).seal().unwrap();
    env.sign(&key(10)).unwrap();
    let s = env.signatures[0].clone();
    env.signatures = vec![s; proto::envelope::MAX_SIGNATURES + 1];
    let bytes = proto::codec::encode(Kind::Envelope, &env).unwrap();
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &expect(None), NOW),
        Err(VerifyError::TooManySignatures { .. })
    ));
}

#[test]
fn announcement_for_another_channel_or_platform_is_authentic_but_not_for_me() {
    let mut a = announcement(7, Digest::of(b"m"));
    a.channel = "beta".into();
    let bytes = signed(a.seal().unwrap(), &[&key(20)]);
    let ann = verify_announcement(&bytes, &trusted_v1(), NOW).unwrap();
    assert!(matches!(
        expect(None).applies(&ann),
        Err(VerifyError::WrongChannel { .. })
    ));
    let mut a = announcement(7, Digest::of(b"m"));
    a.platform = Platform::XenArm32;
    let bytes = signed(a.seal().unwrap(), &[&key(20)]);
    let ann = verify_announcement(&bytes, &trusted_v1(), NOW).unwrap();
    assert!(matches!(
        expect(None).applies(&ann),
        Err(VerifyError::WrongPlatform { .. })
    ));
}

/// The old single check judged channel and platform before expiry, so an expired, validly
/// signed announcement of another channel came out "wrong channel" — which routers relay —
/// and every node relayed it again after each duplicate window.
#[test]
fn an_expired_announcement_of_another_channel_is_stale_not_relayable() {
    let mut a = announcement(7, Digest::of(b"m"));
    a.channel = "beta".into();
    let bytes = signed(a.seal().unwrap(), &[&key(20)]);
    assert!(matches!(
        verify_announcement(&bytes, &trusted_v1(), a.expires_at + 1),
        Err(VerifyError::Expired {
            kind: Kind::Announcement,
            ..
        })
    ));
}

fn revocation_list(version: u64) -> proto::revocation::Revocations {
    proto::revocation::Revocations {
        fleet: "home".into(),
        version,
        issued_at: NOW,
        devices: vec![proto::revocation::Revoked {
            name: "lost".into(),
            key: key(30).public(),
            at: NOW,
        }],
        members: None,
    }
}

#[test]
fn an_old_revocation_list_cannot_be_replayed_to_unrevoke() {
    use proto::revocation::verify_revocations;
    let bytes = signed(revocation_list(3).seal().unwrap(), &[&key(20)]);
    verify_revocations(&bytes, &trusted_v1(), 2).unwrap();
    assert!(matches!(
        verify_revocations(&bytes, &trusted_v1(), 3),
        Err(VerifyError::Stale {
            kind: Kind::Revocations,
            offered: 3,
            known: 3
        })
    ));
}

#[test]
fn only_the_timestamp_role_signs_revocations() {
    use proto::revocation::verify_revocations;
    for k in [key(10), key(1), key(99)] {
        let bytes = signed(revocation_list(1).seal().unwrap(), &[&k]);
        assert!(matches!(
            verify_revocations(&bytes, &trusted_v1(), 0),
            Err(VerifyError::UnknownKey { .. })
        ));
    }
    let mut other = revocation_list(1);
    other.fleet = "neighbours".into();
    let bytes = signed(other.seal().unwrap(), &[&key(20)]);
    assert!(matches!(
        verify_revocations(&bytes, &trusted_v1(), 0),
        Err(VerifyError::WrongFleet { .. })
    ));
}

#[test]
fn signed_kind_tells_the_announce_topics_messages_apart() {
    let ann = signed(
        announcement(1, Digest::of(b"m")).seal().unwrap(),
        &[&key(20)],
    );
    let rev = signed(revocation_list(1).seal().unwrap(), &[&key(20)]);
    let root = signed(root_v1().seal().unwrap(), &[&key(1), &key(2)]);
    let kinds = [Kind::Announcement, Kind::Root, Kind::Revocations];
    assert_eq!(
        Envelope::signed_kind(&ann, &kinds).unwrap(),
        Kind::Announcement
    );
    assert_eq!(
        Envelope::signed_kind(&rev, &kinds).unwrap(),
        Kind::Revocations
    );
    assert_eq!(Envelope::signed_kind(&root, &kinds).unwrap(), Kind::Root);
    let (_, manifest) = signed_manifest(1);
    assert!(Envelope::signed_kind(&manifest, &kinds).is_err());
    assert!(Envelope::signed_kind(b"garbage", &kinds).is_err());
}

fn hold_list(version: u64) -> proto::rollout::Holds {
    proto::rollout::Holds {
        fleet: "home".into(),
        version,
        issued_at: NOW,
        held: vec![proto::rollout::Hold {
            app: "hello".into(),
            channel: "stable".into(),
            release: 2,
            kind: proto::rollout::HoldKind::Halted,
            reason: "failures".into(),
            at: NOW,
        }],
    }
}

#[test]
fn an_old_hold_list_cannot_be_replayed_to_resume_a_halted_release() {
    use proto::rollout::verify_holds;
    let bytes = signed(hold_list(3).seal().unwrap(), &[&key(30)]);
    verify_holds(&bytes, &trusted_v1(), 2).unwrap();
    assert!(matches!(
        verify_holds(&bytes, &trusted_v1(), 3),
        Err(VerifyError::Stale {
            kind: Kind::Holds,
            offered: 3,
            known: 3
        })
    ));
}

#[test]
fn only_the_rollout_role_signs_holds_and_it_signs_nothing_else() {
    use proto::rollout::verify_holds;
    // The release, timestamp and root keys and a stranger cannot hold a release.
    for k in [key(10), key(20), key(1), key(99)] {
        let bytes = signed(hold_list(1).seal().unwrap(), &[&k]);
        assert!(matches!(
            verify_holds(&bytes, &trusted_v1(), 0),
            Err(VerifyError::UnknownKey { .. })
        ));
    }
    let mut other = hold_list(1);
    other.fleet = "neighbours".into();
    let bytes = signed(other.seal().unwrap(), &[&key(30)]);
    assert!(matches!(
        verify_holds(&bytes, &trusted_v1(), 0),
        Err(VerifyError::WrongFleet { .. })
    ));
    // The rollout key cannot sign a release, an announcement or a revocation list.
    let m = signed(
        manifest_for(&image(50_000, 2), 1).seal().unwrap(),
        &[&key(30)],
    );
    assert!(matches!(
        verify_manifest(&m, &trusted_v1(), &expect(None), NOW),
        Err(VerifyError::UnknownKey { .. })
    ));
    let rev = signed(revocation_list(1).seal().unwrap(), &[&key(30)]);
    assert!(matches!(
        proto::revocation::verify_revocations(&rev, &trusted_v1(), 0),
        Err(VerifyError::UnknownKey { .. })
    ));
}

#[test]
fn a_manifest_with_waves_out_of_order_is_refused() {
    let mut m = manifest_for(&image(50_000, 2), 1);
    m.rollout.waves = vec![
        proto::rollout::Wave {
            basis_points: 5000,
            after_secs: 0,
        },
        proto::rollout::Wave {
            basis_points: 100,
            after_secs: 3600,
        },
    ];
    let bytes = signed(m.seal().unwrap(), &[&key(10)]);
    assert!(matches!(
        verify_manifest(&bytes, &trusted_v1(), &expect(None), NOW),
        Err(VerifyError::Invalid {
            kind: Kind::Manifest,
            reason: proto::Invalid::Waves(proto::rollout::BadWaves::OutOfOrder)
        })
    ));
}
