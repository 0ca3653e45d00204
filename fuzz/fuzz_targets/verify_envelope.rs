//! The verifier entry points on arbitrary bytes, against a fixed trust root: every input
//! is refused with a typed error (nothing here is signed by the release key), never a panic.
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
        now: NOW,
    };
    assert!(proto::manifest::verify_manifest(data, root(), &expect).is_err());
    assert!(proto::announcement::verify_announcement(data, root(), &expect).is_err());
    assert!(root().update(data, NOW).is_err());
});
