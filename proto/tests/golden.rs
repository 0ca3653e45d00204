//! Golden byte vectors: the exact bytes of every message type are checked in. A failing
//! test here means the wire format changed; if that is intended, bump
//! `codec::FORMAT_VERSION` or document the change, then re-bless with
//! `UNIFLEET_BLESS=1 cargo test -p unifleet-proto --test golden`.

mod common;

use common::*;
use proto::codec::Kind;
use proto::envelope::Envelope;
use std::path::PathBuf;

fn check(name: &str, bytes: &[u8]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UNIFLEET_BLESS").is_some() {
        std::fs::write(&path, bytes).unwrap();
    }
    let golden = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; bless with UNIFLEET_BLESS=1", path.display()));
    assert!(
        golden == bytes,
        "{name}: encoding differs from the golden vector ({} vs {} bytes)",
        bytes.len(),
        golden.len()
    );
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name),
    )
    .unwrap()
}

fn root_bytes() -> Vec<u8> {
    signed(root_v1().seal().unwrap(), &[&key(1), &key(2)])
}

/// A release built from source: every field of the manifest is pinned, provenance too.
fn golden_manifest() -> proto::manifest::Manifest {
    let mut m = manifest_for(&image(300_000, 1), 3);
    m.provenance = Some(proto::manifest::Provenance {
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        builder: "unifleet-hub 0.1.0".into(),
        toolchain: "rustc 1.95.0".into(),
        command: "./build.sh".into(),
        log: proto::Digest::of(b"log"),
        sbom: Some(proto::Digest::of(b"sbom")),
    });
    m
}

fn manifest_bytes() -> Vec<u8> {
    signed(golden_manifest().seal().unwrap(), &[&key(10)])
}

fn announcement_bytes() -> Vec<u8> {
    let m = manifest_bytes();
    signed(
        announcement(3, proto::Digest::of(&m)).seal().unwrap(),
        &[&key(20)],
    )
}

#[test]
fn root_golden() {
    check("root.bin", &root_bytes());
    let env = Envelope::decode(&read("root.bin"), Kind::Root).unwrap();
    let r: proto::root::Root = proto::codec::decode(Kind::Root, &env.payload).unwrap();
    assert_eq!(r, root_v1());
}

#[test]
fn manifest_golden() {
    check("manifest.bin", &manifest_bytes());
    let v =
        proto::manifest::verify_manifest(&read("manifest.bin"), &trusted_v1(), &expect(None), NOW)
            .unwrap();
    assert_eq!(v.manifest(), &golden_manifest());
}

#[test]
fn announcement_golden() {
    check("announcement.bin", &announcement_bytes());
    let a = proto::announcement::verify_announcement(&read("announcement.bin"), &trusted_v1(), NOW)
        .unwrap();
    assert_eq!(a.release, 3);
}

#[test]
fn envelope_header_golden() {
    // The frame itself: magic, version, kind, then the body.
    let bytes = announcement_bytes();
    assert_eq!(&bytes[..6], b"UFLT\x01\x01");
    let env = Envelope::decode(&bytes, Kind::Announcement).unwrap();
    assert_eq!(&env.payload[..6], b"UFLT\x01\x04");
    assert_eq!(env.signatures[0].key_id, key(20).id());
}

fn status_report() -> proto::status::StatusReport {
    proto::status::StatusReport {
        fleet: "home".into(),
        device: "d1".into(),
        seq: 42,
        at: NOW,
        app: "hello".into(),
        channel: "stable".into(),
        release: Some(3),
        version: Some("1.0.3".into()),
        manifest: Some(proto::Digest::of(b"m")),
        state: proto::status::DeviceState::RolledBack {
            failed_release: 4,
            reason: "probe".into(),
        },
        bytes_from_peers: 1000,
        bytes_from_hub: 10,
        console_tail: "BOOT".into(),
        ondemand: Some(proto::status::OnDemandCounts {
            local: 2,
            remote: 1,
            boots: 7,
            boot_ms_total: 840,
            decisions: 11,
        }),
        network: Some(proto::status::NetworkCounts {
            reachability: proto::status::Reachability::Relayed,
            bytes_lan: 700,
            bytes_direct: 300,
            bytes_relayed: 0,
            bytes_hub: 10,
            hole_punches: 1,
            hole_punch_failures: 2,
        }),
        guest: Some([198, 51, 100, 7].into()),
        hosted: Some(proto::status::HostedUse {
            instance_ms: 200_500,
            connections: 57,
            down: Some("no route to host".into()),
        }),
        tags: vec!["kitchen".into(), "beta".into()],
        platform: proto::manifest::Platform::QemuAarch64,
    }
}

fn status_bytes() -> Vec<u8> {
    signed(status_report().seal().unwrap(), &[&key(20)])
}

/// The manifest and the report as builds before their appended fields wrote them (the
/// golden vectors of then, kept): this build reads them, the field `None`, and writes a
/// value without the field byte for byte as they did — so a hub upgraded first still
/// reads older devices' reports and they its releases without provenance.
#[test]
fn messages_from_before_the_appended_fields_read_and_are_written_as_then() {
    let old = read("manifest-before-provenance.bin");
    let v = proto::manifest::verify_manifest(&old, &trusted_v1(), &expect(None), NOW).unwrap();
    assert_eq!(v.manifest(), &manifest_for(&image(300_000, 1), 3));
    assert_eq!(v.manifest().provenance, None);
    assert_eq!(signed(v.manifest().seal().unwrap(), &[&key(10)]), old);

    let old = read("status-before-guest.bin");
    let device = key(20).public();
    let (_, r) =
        proto::status::verify_status(&old, |id| (*id == device.id()).then_some(device)).unwrap();
    let then = proto::status::StatusReport {
        guest: None,
        hosted: None,
        ..status_report()
    };
    assert_eq!(r, then);
    assert_eq!(signed(r.seal().unwrap(), &[&key(20)]), old);
    // A truncated one is still refused.
    let short = &old[..old.len() - 1];
    assert!(proto::status::verify_status(short, |_| Some(device)).is_err());

    // A report with a guest address, from before hosted use: read, and written again
    // byte for byte.
    let old = read("status-before-hosted.bin");
    let (_, r) =
        proto::status::verify_status(&old, |id| (*id == device.id()).then_some(device)).unwrap();
    let then = proto::status::StatusReport {
        hosted: None,
        ..status_report()
    };
    assert_eq!(r, then);
    assert_eq!(signed(r.seal().unwrap(), &[&key(20)]), old);
}

#[test]
fn status_report_golden() {
    check("status.bin", &status_bytes());
    let device = key(20).public();
    let (k, r) = proto::status::verify_status(&read("status.bin"), |id| {
        (*id == device.id()).then_some(device)
    })
    .unwrap();
    assert_eq!(k, device);
    assert_eq!(r.seq, 42);
    // Any other key is unknown.
    assert!(matches!(
        proto::status::verify_status(&read("status.bin"), |_| None),
        Err(proto::VerifyError::UnknownKey { .. })
    ));
}

#[test]
fn blob_messages_golden() {
    let req = proto::blob::BlobRequest {
        digest: proto::Digest::of(b"chunk"),
        want: proto::blob::Want::BlobOrPeers,
    }
    .encode()
    .unwrap();
    // The vector predates `Want`: it was written with the boolean `redirect_ok = true`.
    check("blob-request.bin", &req);
    let stored = proto::blob::BlobRequest {
        digest: proto::Digest::of(b"chunk"),
        want: proto::blob::Want::Stored,
    }
    .encode()
    .unwrap();
    check("blob-stored.bin", &stored);
    let carried = proto::blob::BlobRequest {
        digest: proto::Digest::of(b"next chunk"),
        want: proto::blob::Want::BlobOrPeersAndStored(proto::Digest::of(b"chunk")),
    }
    .encode()
    .unwrap();
    check("blob-ask-and-stored.bin", &carried);
    let missed = proto::blob::BlobRequest {
        digest: proto::Digest::of(b"next chunk"),
        want: proto::blob::Want::BlobOrPeersMissed,
    }
    .encode()
    .unwrap();
    check("blob-ask-missed.bin", &missed);
    let latest = proto::blob::BlobRequest {
        digest: proto::blob::announcement_key(&proto::announcement::Track::new(
            "hello",
            "stable",
            proto::manifest::Platform::QemuX86_64,
        )),
        want: proto::blob::Want::Announcement,
    }
    .encode()
    .unwrap();
    check("blob-announcement.bin", &latest);
    check(
        "blob-noted.bin",
        &proto::blob::BlobResponse::Noted.encode().unwrap(),
    );
    let resp = proto::blob::BlobResponse::Found(b"chunk".to_vec())
        .encode()
        .unwrap();
    check("blob-response.bin", &resp);
    assert_eq!(
        proto::blob::BlobRequest::decode(&read("blob-request.bin"))
            .unwrap()
            .digest,
        proto::Digest::of(b"chunk")
    );
    assert_eq!(
        proto::blob::BlobResponse::decode(&read("blob-response.bin")).unwrap(),
        proto::blob::BlobResponse::Found(b"chunk".to_vec())
    );
    let elsewhere = proto::blob::BlobResponse::Elsewhere(vec![proto::blob::PeerRef {
        peer: vec![0, 36, 8, 1],
        addr: "/ip4/127.0.0.1/tcp/4001".into(),
    }]);
    check("blob-elsewhere.bin", &elsewhere.encode().unwrap());
    assert_eq!(
        proto::blob::BlobResponse::decode(&read("blob-elsewhere.bin")).unwrap(),
        elsewhere
    );
}

fn revocations() -> proto::revocation::Revocations {
    proto::revocation::Revocations {
        fleet: "home".into(),
        version: 2,
        issued_at: NOW,
        devices: vec![proto::revocation::Revoked {
            name: "lost-board".into(),
            key: key(30).public(),
            at: NOW - 60,
        }],
        members: None,
    }
}

/// A list with members (the tags the operator assigned) is a new encoding; one without
/// is written byte for byte as before `members` was appended (`revocations.bin`).
#[test]
fn a_revocation_list_with_members_is_pinned_and_gives_each_key_its_tags() {
    let list = proto::revocation::Revocations {
        members: Some(vec![proto::revocation::Member {
            key: key(31).public(),
            tags: vec!["beta".into(), "kitchen".into()],
        }]),
        ..revocations()
    };
    let bytes = signed(list.seal().unwrap(), &[&key(20)]);
    check("revocations-with-members.bin", &bytes);
    let read_back = proto::revocation::verify_revocations(
        &read("revocations-with-members.bin"),
        &trusted_v1(),
        1,
    )
    .unwrap();
    assert_eq!(read_back, list);
    assert_eq!(read_back.tags_of(&key(31).public()), ["beta", "kitchen"]);
    assert!(read_back.tags_of(&key(30).public()).is_empty());
    assert!(revocations().tags_of(&key(31).public()).is_empty());
}

#[test]
fn revocations_golden() {
    let bytes = signed(revocations().seal().unwrap(), &[&key(20)]);
    check("revocations.bin", &bytes);
    let list =
        proto::revocation::verify_revocations(&read("revocations.bin"), &trusted_v1(), 1).unwrap();
    assert_eq!(list, revocations());
    assert!(list.is_revoked(&key(30).public()));
    for (want, digest, name) in [
        (
            proto::blob::Want::Root,
            proto::blob::root_key(2),
            "blob-root.bin",
        ),
        (
            proto::blob::Want::Revocations,
            proto::Digest([0; 32]),
            "blob-revocations.bin",
        ),
    ] {
        let req = proto::blob::BlobRequest { digest, want };
        check(name, &req.encode().unwrap());
        assert_eq!(proto::blob::BlobRequest::decode(&read(name)).unwrap(), req);
    }
}

fn holds() -> proto::rollout::Holds {
    proto::rollout::Holds {
        fleet: "home".into(),
        version: 3,
        issued_at: NOW,
        held: vec![proto::rollout::Hold {
            app: "hello".into(),
            channel: "stable".into(),
            release: 4,
            kind: proto::rollout::HoldKind::Halted,
            reason: "2 of 2 attempts failed".into(),
            at: NOW - 5,
        }],
    }
}

#[test]
fn holds_golden() {
    let bytes = signed(holds().seal().unwrap(), &[&key(30)]);
    check("holds.bin", &bytes);
    let list = proto::rollout::verify_holds(&read("holds.bin"), &trusted_v1(), 2).unwrap();
    assert_eq!(list, holds());
    assert!(list.of("hello", "stable", 4).is_some());
    let req = proto::blob::BlobRequest {
        digest: proto::Digest([0; 32]),
        want: proto::blob::Want::Holds,
    };
    check("blob-holds.bin", &req.encode().unwrap());
    assert_eq!(
        proto::blob::BlobRequest::decode(&read("blob-holds.bin")).unwrap(),
        req
    );
}
