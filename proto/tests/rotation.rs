//! Root rotation: a device holding root N accepts N+1, N+2, … and nothing else.

mod common;

use common::*;
use proto::codec::Kind;
use proto::manifest::verify_manifest;
use proto::root::{Root, TrustedRoot};
use proto::VerifyError;

/// v2 replaces root key 3 with key 4 and the release keys with key 12.
fn root_v2() -> Root {
    let mut r = root_v1();
    r.version = 2;
    r.root = role(&[&key(1), &key(2), &key(4)], 2);
    r.release = role(&[&key(12)], 1);
    r
}

/// v3 hands the root role to keys 5,6,7 entirely.
fn root_v3() -> Root {
    let mut r = root_v2();
    r.version = 3;
    r.root = role(&[&key(5), &key(6), &key(7)], 2);
    r
}

fn v2_bytes() -> Vec<u8> {
    // Old threshold (1,2 of {1,2,3}) and new threshold (2,4 of {1,2,4}).
    signed(root_v2().seal().unwrap(), &[&key(1), &key(2), &key(4)])
}

fn v3_bytes() -> Vec<u8> {
    signed(
        root_v3().seal().unwrap(),
        &[&key(1), &key(4), &key(5), &key(6)],
    )
}

#[test]
fn valid_chain() {
    let v1 = trusted_v1();
    let v3 = v1
        .update_chain([v2_bytes().as_slice(), v3_bytes().as_slice()], NOW)
        .unwrap();
    assert_eq!(v3.root().version, 3);
    // The rotated release key now signs releases; the old one no longer does.
    let data = image(50_000, 3);
    let new = signed(manifest_for(&data, 1).seal().unwrap(), &[&key(12)]);
    verify_manifest(&new, &v3, &expect(None), NOW).unwrap();
    let old = signed(manifest_for(&data, 1).seal().unwrap(), &[&key(10)]);
    assert!(matches!(
        verify_manifest(&old, &v3, &expect(None), NOW),
        Err(VerifyError::UnknownKey { .. })
    ));
}

#[test]
fn gap_is_refused() {
    // v3 signed by keys of v1 as well, so only the version gap is wrong.
    let mut r = root_v3();
    r.root = role(&[&key(1), &key(2), &key(3)], 2);
    let skip = signed(r.seal().unwrap(), &[&key(1), &key(2)]);
    assert_eq!(
        trusted_v1().update(&skip, NOW),
        Err(VerifyError::RootVersionGap {
            trusted: 1,
            offered: 3
        })
    );
}

#[test]
fn downgrade_is_refused() {
    let v2 = trusted_v1().update(&v2_bytes(), NOW).unwrap();
    // Replaying v2 itself, and a v1 re-signed by keys that v2 still trusts.
    assert_eq!(
        v2.update(&v2_bytes(), NOW),
        Err(VerifyError::RootDowngrade {
            trusted: 2,
            offered: 2
        })
    );
    let old = signed(root_v1().seal().unwrap(), &[&key(1), &key(2)]);
    assert_eq!(
        v2.update(&old, NOW),
        Err(VerifyError::RootDowngrade {
            trusted: 2,
            offered: 1
        })
    );
}

#[test]
fn below_old_threshold_is_refused() {
    // Only one old root key (plus the new ones): a single stolen key cannot rotate.
    let bytes = signed(root_v2().seal().unwrap(), &[&key(1), &key(4)]);
    assert!(matches!(
        trusted_v1().update(&bytes, NOW),
        Err(VerifyError::BelowThreshold {
            kind: Kind::Root,
            have: 1,
            need: 2,
            ..
        })
    ));
}

#[test]
fn below_new_threshold_is_refused() {
    // Old keys 1 and 3 sign, but of the new set {1,2,4} only key 1 did.
    let bytes = signed(root_v2().seal().unwrap(), &[&key(1), &key(3)]);
    assert!(matches!(
        trusted_v1().update(&bytes, NOW),
        Err(VerifyError::BelowThreshold {
            kind: Kind::Root,
            have: 1,
            need: 2,
            ..
        })
    ));
}

#[test]
fn stranger_signature_on_new_root_is_refused() {
    let bytes = signed(
        root_v2().seal().unwrap(),
        &[&key(1), &key(2), &key(4), &key(77)],
    );
    assert!(matches!(
        trusted_v1().update(&bytes, NOW),
        Err(VerifyError::UnknownKey { .. })
    ));
}

#[test]
fn expired_new_root_is_refused() {
    let mut r = root_v2();
    r.expires_at = NOW - 1;
    let bytes = signed(r.seal().unwrap(), &[&key(1), &key(2), &key(4)]);
    assert!(matches!(
        trusted_v1().update(&bytes, NOW),
        Err(VerifyError::Expired {
            kind: Kind::Root,
            ..
        })
    ));
}

#[test]
fn expired_intermediate_root_is_fine_if_the_last_is_fresh() {
    let mut r = root_v2();
    r.expires_at = NOW - 1;
    let v2 = signed(r.seal().unwrap(), &[&key(1), &key(2), &key(4)]);
    let v3 = trusted_v1()
        .update_chain([v2.as_slice(), v3_bytes().as_slice()], NOW)
        .unwrap();
    assert_eq!(v3.root().version, 3);
}

#[test]
fn expired_last_root_in_chain_is_refused() {
    let late = NOW + 400 * DAY;
    assert!(matches!(
        trusted_v1().update_chain([v2_bytes().as_slice()], late),
        Err(VerifyError::Expired { .. })
    ));
}

#[test]
fn bootstrap_needs_self_signature() {
    let unsigned = signed(root_v1().seal().unwrap(), &[&key(1)]);
    assert!(matches!(
        TrustedRoot::bootstrap(&unsigned, NOW),
        Err(VerifyError::BelowThreshold { .. })
    ));
    let by_release_key = signed(root_v1().seal().unwrap(), &[&key(10)]);
    assert!(matches!(
        TrustedRoot::bootstrap(&by_release_key, NOW),
        Err(VerifyError::UnknownKey { .. })
    ));
}

#[test]
fn other_fleet_root_is_refused() {
    let mut r = root_v2();
    r.fleet = "elsewhere".into();
    let bytes = signed(r.seal().unwrap(), &[&key(1), &key(2), &key(4)]);
    assert!(matches!(
        trusted_v1().update(&bytes, NOW),
        Err(VerifyError::WrongFleet { .. })
    ));
}

#[test]
fn invalid_threshold_is_refused() {
    let mut r = root_v1();
    r.root.threshold = 4;
    let bytes = signed(r.seal().unwrap(), &[&key(1), &key(2), &key(3)]);
    assert!(matches!(
        TrustedRoot::bootstrap(&bytes, NOW),
        Err(VerifyError::Invalid {
            kind: Kind::Root,
            ..
        })
    ));
}
