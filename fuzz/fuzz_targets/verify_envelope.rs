//! The verifier entry points on arbitrary bytes, against a fixed trust root: a verified
//! value or a typed error, never a panic. The seed corpus holds real messages signed by
//! the root's release, timestamp and rollout keys (proto's golden vectors), so some inputs verify: what verifies
//! is for the root's fleet and within its limits.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::manifest::{Expectations, Platform};
use proto::root::{Role, Root, TrustedRoot};
use proto::SecretKey;
use std::sync::OnceLock;

const NOW: u64 = 1_800_000_000;

fn root() -> &'static TrustedRoot {
    static ROOT: OnceLock<TrustedRoot> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root_key = SecretKey::from_seed([1; 32]);
        let release = SecretKey::from_seed([10; 32]);
        let r = Root {
            fleet: "home".into(),
            version: 1,
            expires_at: NOW + 1000,
            root: Role { keys: vec![root_key.public()], threshold: 1 },
            release: Role { keys: vec![release.public()], threshold: 1 },
            timestamp: Role { keys: vec![SecretKey::from_seed([20; 32]).public()], threshold: 1 },
            rollout: Role { keys: vec![SecretKey::from_seed([30; 32]).public()], threshold: 1 },
        };
        let mut env = r.seal().unwrap();
        env.sign(&root_key).unwrap();
        TrustedRoot::bootstrap(&env.encode().unwrap(), NOW).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let expect = Expectations {
        app: None,
        channel: "stable",
        platform: Platform::QemuX86_64,
        installed_release: None,
    };
    if let Ok(m) = proto::manifest::verify_manifest(data, root(), &expect, NOW) {
        let m = m.manifest();
        assert_eq!(m.fleet, "home");
        assert!(m.validate().is_ok());
    }
    if let Ok(a) = proto::announcement::verify_announcement(data, root(), NOW) {
        assert_eq!(a.fleet, "home");
        assert!(a.expires_at > NOW && a.issued_at < a.expires_at);
        let _ = expect.applies(&a);
    }
    if let Ok(l) = proto::revocation::verify_revocations(data, root(), 0) {
        assert_eq!(l.fleet, "home");
        assert!(l.version >= 1);
    }
    if let Ok(h) = proto::rollout::verify_holds(data, root(), 0) {
        assert_eq!(h.fleet, "home");
        assert!(h.version >= 1 && h.held.len() <= proto::rollout::MAX_HOLDS);
    }
    if let Ok(r) = root().update(data, NOW) {
        assert_eq!(r.fleet(), "home");
        assert_eq!(r.root().version, 2, "only the next version is accepted");
    }
});
