//! The real fwtool binary, end to end in a temp dir: keygen → root init → testimage →
//! pack → sign → verify, and every tampering refused with the failure named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Run {
    dir: tempfile::TempDir,
}

impl Run {
    fn new() -> Run {
        Run {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn fwtool(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_fwtool"))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    /// Runs and insists on success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.fwtool(args);
        assert!(
            out.status.success(),
            "fwtool {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and insists on failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.fwtool(args);
        assert!(
            !out.status.success(),
            "fwtool {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// Keys, a 1-of-1 root, and a signed release of `hello` VERSION as `rel-VERSION`.
    fn setup_release(&self, version: &str, release: &str, pad: &str) -> PathBuf {
        if !self.path("root.bin").exists() {
            self.ok(&["keygen", "--out", "root"]);
            self.ok(&["keygen", "--out", "release"]);
            self.ok(&["keygen", "--out", "timestamp"]);
            self.ok(&["keygen", "--out", "rollout"]);
            self.ok(&[
                "root",
                "init",
                "--root-key",
                "root.pub",
                "--release-key",
                "release.pub",
                "--timestamp-key",
                "timestamp.pub",
                "--rollout-key",
                "rollout.pub",
                "--sign-with",
                "root.key",
                "--out",
                "root.bin",
            ]);
        }
        let img = format!("hello-{version}.elf");
        let dir = format!("rel-{version}");
        self.ok(&[
            "testimage",
            "--app",
            "hello",
            "--version",
            version,
            "--pad-mib",
            pad,
            "--out",
            &img,
        ]);
        self.ok(&[
            "pack",
            &img,
            "--app",
            "hello",
            "--version",
            version,
            "--channel",
            "stable",
            "--release",
            release,
            "--no-staging",
            "--out",
            &dir,
        ]);
        self.ok(&["sign", &dir, "--key", "release.key"]);
        self.path(&dir)
    }
}

fn chunk_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("chunks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn flip(path: &Path, pos: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[pos] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

#[test]
fn round_trip_verifies() {
    let run = Run::new();
    run.setup_release("1.0.0", "1", "1");
    let out = run.ok(&["verify", "rel-1.0.0", "--root", "root.bin"]);
    assert!(
        out.starts_with("OK hello 1.0.0 release 1 channel stable platform qemu-x86_64"),
        "{out}"
    );
    // Expectations given explicitly.
    run.ok(&[
        "verify",
        "rel-1.0.0",
        "--root",
        "root.bin",
        "--app",
        "hello",
        "--channel",
        "stable",
        "--platform",
        "qemu-x86_64",
        "--installed-release",
        "0",
    ]);
}

#[test]
fn secret_key_is_private_and_never_printed() {
    let run = Run::new();
    let out = run.ok(&["keygen", "--out", "k"]);
    let secret = std::fs::read_to_string(run.path("k.key")).unwrap();
    let hex = secret.split_whitespace().nth(1).unwrap();
    assert!(!out.contains(hex));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(run.path("k.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let err = run.fails(&["keygen", "--out", "k"]);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn every_flipped_chunk_byte_position_class_is_refused() {
    let run = Run::new();
    let dir = run.setup_release("1.0.0", "1", "1");
    for (i, chunk) in chunk_files(&dir).iter().enumerate() {
        let len = std::fs::metadata(chunk).unwrap().len() as usize;
        for pos in [0, len / 2, len - 1] {
            flip(chunk, pos);
            let err = run.fails(&["verify", "rel-1.0.0", "--root", "root.bin"]);
            assert!(
                err.contains("digest mismatch"),
                "chunk {i} byte {pos}: {err}"
            );
            flip(chunk, pos);
        }
    }
    run.ok(&["verify", "rel-1.0.0", "--root", "root.bin"]);
}

#[test]
fn every_flipped_manifest_byte_is_refused() {
    let run = Run::new();
    let dir = run.setup_release("1.0.0", "1", "0");
    let manifest = dir.join("manifest");
    let len = std::fs::metadata(&manifest).unwrap().len() as usize;
    let mut named = std::collections::BTreeMap::<String, usize>::new();
    for pos in 0..len {
        flip(&manifest, pos);
        let err = run.fails(&["verify", "rel-1.0.0", "--root", "root.bin"]);
        assert!(err.starts_with("verify failed: "), "byte {pos}: {err}");
        assert_eq!(err.lines().count(), 1, "one line naming the failure: {err}");
        let class = err.split_whitespace().take(4).collect::<Vec<_>>().join(" ");
        *named.entry(class).or_default() += 1;
        flip(&manifest, pos);
    }
    // The signature bytes (the last 64) are named as a bad signature.
    let sig_start = len - 64;
    flip(&manifest, sig_start + 3);
    let err = run.fails(&["verify", "rel-1.0.0", "--root", "root.bin"]);
    assert!(err.contains("bad signature"), "{err}");
    // The key id (32 bytes before the signature) is named as an unknown key.
    flip(&manifest, sig_start);
    flip(&manifest, sig_start + 3);
    flip(&manifest, sig_start - 5);
    let err = run.fails(&["verify", "rel-1.0.0", "--root", "root.bin"]);
    assert!(err.contains("unknown key"), "{err}");
    assert!(named.len() >= 3, "failures named: {named:?}");
}

#[test]
fn appended_chunk_bytes_are_endless_data() {
    let run = Run::new();
    let dir = run.setup_release("1.0.0", "1", "0");
    let chunk = &chunk_files(&dir)[0];
    let mut b = std::fs::read(chunk).unwrap();
    b.extend_from_slice(b"extra");
    std::fs::write(chunk, b).unwrap();
    let err = run.fails(&["verify", "rel-1.0.0", "--root", "root.bin"]);
    assert!(err.contains("more bytes than declared"), "{err}");
}

#[test]
fn mix_and_match_rollback_expiry_and_wrong_root_are_named() {
    let run = Run::new();
    run.setup_release("1.0.0", "5", "0");
    let cases: &[(&[&str], &str)] = &[
        (&["--channel", "beta"], "channel"),
        (&["--platform", "xen-arm32"], "platform"),
        (&["--installed-release", "5"], "rollback or replay"),
        (&["--at", "99999999999"], "expired"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["verify", "rel-1.0.0", "--root", "root.bin"];
        args.extend_from_slice(extra);
        let err = run.fails(&args);
        assert!(err.contains(expected), "{extra:?}: {err}");
    }
    // A release signed by a key the root does not know.
    run.ok(&["keygen", "--out", "rogue"]);
    run.ok(&[
        "testimage",
        "--app",
        "hello",
        "--version",
        "1.0.1",
        "--out",
        "rogue.elf",
    ]);
    run.ok(&[
        "pack",
        "rogue.elf",
        "--app",
        "hello",
        "--version",
        "1.0.1",
        "--release",
        "6",
        "--no-staging",
        "--sign-with",
        "rogue.key",
        "--out",
        "rogue-rel",
    ]);
    let err = run.fails(&["verify", "rogue-rel", "--root", "root.bin"]);
    assert!(err.contains("unknown key"), "{err}");
    // An unsigned release.
    run.ok(&[
        "pack",
        "rogue.elf",
        "--app",
        "hello",
        "--version",
        "1.0.1",
        "--release",
        "6",
        "--no-staging",
        "--out",
        "unsigned",
    ]);
    let err = run.fails(&["verify", "unsigned", "--root", "root.bin"]);
    assert!(err.contains("no signatures"), "{err}");
}

#[test]
fn diff_of_two_padded_versions_is_small() {
    let run = Run::new();
    run.ok(&[
        "testimage",
        "--app",
        "hello",
        "--version",
        "1.0.0",
        "--pad-mib",
        "16",
        "--out",
        "a.elf",
    ]);
    run.ok(&[
        "testimage",
        "--app",
        "hello",
        "--version",
        "1.0.1",
        "--pad-mib",
        "16",
        "--out",
        "b.elf",
    ]);
    let out = run.ok(&["diff", "a.elf", "b.elf", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pct = v["fetch_percent"].as_f64().unwrap();
    assert!(pct <= 3.0, "{pct}% of the image is new: {out}");
    assert!(v["fetch_bytes"].as_u64().unwrap() > 0, "{out}");
    // Release directories diff the same way.
    run.setup_release("2.0.0", "1", "16");
    run.setup_release("2.0.1", "2", "16");
    let out = run.ok(&["diff", "rel-2.0.0", "rel-2.0.1"]);
    assert!(out.contains("shared"), "{out}");
}

#[test]
fn inspect_names_every_kind_and_refuses_garbage() {
    let run = Run::new();
    run.setup_release("1.0.0", "1", "0");
    let img: serde_json::Value =
        serde_json::from_str(&run.ok(&["inspect", "hello-1.0.0.elf", "--json"])).unwrap();
    assert_eq!(img["header"]["platforms"][0], "qemu-x86_64");
    let root: serde_json::Value =
        serde_json::from_str(&run.ok(&["inspect", "root.bin", "--json"])).unwrap();
    assert_eq!(root["type"], "trust root");
    assert_eq!(root["payload"]["version"], 1);
    let man: serde_json::Value =
        serde_json::from_str(&run.ok(&["inspect", "rel-1.0.0/manifest", "--json"])).unwrap();
    assert_eq!(man["type"], "release manifest");
    assert_eq!(man["payload"]["platform"], "qemu-x86_64");
    let text = run.ok(&["inspect", "rel-1.0.0"]);
    assert!(text.contains("app: hello"), "{text}");

    std::fs::write(run.path("garbage"), b"this is not an image at all").unwrap();
    let err = run.fails(&["inspect", "garbage"]);
    assert!(err.contains("unrecognised image"), "{err}");
    assert!(err.contains("garbage"), "the error names the file: {err}");
    // A bad root names the file, not only "bad magic".
    let err = run.fails(&["root", "verify", "garbage"]);
    assert!(err.contains("garbage"), "{err}");
    // `head -c 100` of a real image: refused as truncated, naming the file.
    let whole = std::fs::read(run.path("hello-1.0.0.elf")).unwrap();
    std::fs::write(run.path("cut.elf"), &whole[..100]).unwrap();
    let err = run.fails(&["inspect", "cut.elf"]);
    assert!(
        err.contains("truncated") && err.contains("cut.elf"),
        "{err}"
    );
    std::fs::write(run.path("bad-elf"), b"\x7fELF\x01\x01\x01\x00garbage").unwrap();
    let err = run.fails(&["inspect", "bad-elf"]);
    assert!(err.starts_with("fwtool: "), "{err}");
    std::fs::write(run.path("bad-msg"), b"UFLT\x07\x01").unwrap();
    let err = run.fails(&["inspect", "bad-msg"]);
    assert!(err.contains("unsupported format version"), "{err}");
    std::fs::write(run.path("empty"), b"").unwrap();
    let err = run.fails(&["inspect", "empty"]);
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn pack_refuses_unknown_images_and_wrong_platforms() {
    let run = Run::new();
    std::fs::write(run.path("junk.img"), vec![7u8; 100_000]).unwrap();
    let err = run.fails(&[
        "pack",
        "junk.img",
        "--app",
        "x",
        "--version",
        "1.0.0",
        "--release",
        "1",
        "--no-staging",
        "--out",
        "out",
    ]);
    assert!(err.contains("unrecognised image"), "{err}");
    assert!(
        !run.path("out").exists(),
        "nothing written for a refused image"
    );
    run.ok(&[
        "testimage",
        "--app",
        "hello",
        "--version",
        "1.0.0",
        "--out",
        "h.elf",
    ]);
    let err = run.fails(&[
        "pack",
        "h.elf",
        "--app",
        "hello",
        "--version",
        "1.0.0",
        "--release",
        "1",
        "--no-staging",
        "--platform",
        "xen-arm32",
        "--out",
        "out",
    ]);
    assert!(err.contains("cannot boot as xen-arm32"), "{err}");
    // Staging must be explicit.
    let err = run.fails(&[
        "pack",
        "h.elf",
        "--app",
        "hello",
        "--version",
        "1.0.0",
        "--release",
        "1",
        "--out",
        "out",
    ]);
    assert!(
        err.contains("--no-staging") || err.contains("--staging-report"),
        "{err}"
    );
}

#[test]
fn root_k_of_n_signing_and_rotation() {
    let run = Run::new();
    for k in ["r1", "r2", "r3", "r4", "rel", "ts", "ro"] {
        run.ok(&["keygen", "--out", k]);
    }
    run.ok(&[
        "root",
        "init",
        "--root-key",
        "r1.pub",
        "--root-key",
        "r2.pub",
        "--root-key",
        "r3.pub",
        "--root-threshold",
        "2",
        "--release-key",
        "rel.pub",
        "--timestamp-key",
        "ts.pub",
        "--rollout-key",
        "ro.pub",
        "--out",
        "root1.bin",
    ]);
    // Holders sign one at a time; one signature is not enough.
    run.ok(&["root", "sign", "root1.bin", "--key", "r1.key"]);
    let err = run.fails(&["root", "verify", "root1.bin"]);
    assert!(err.contains("threshold is 2"), "{err}");
    run.ok(&["root", "sign", "root1.bin", "--key", "r2.key"]);
    run.ok(&["root", "verify", "root1.bin"]);

    // Rotate r3 out, r4 in.
    run.ok(&[
        "root",
        "rotate",
        "--from",
        "root1.bin",
        "--root-key",
        "r1.pub",
        "--root-key",
        "r2.pub",
        "--root-key",
        "r4.pub",
        "--root-threshold",
        "2",
        "--out",
        "root2.bin",
    ]);
    run.ok(&["root", "sign", "root2.bin", "--key", "r4.key"]);
    run.ok(&["root", "sign", "root2.bin", "--key", "r3.key"]);
    let err = run.fails(&["root", "verify", "root2.bin", "--trusted", "root1.bin"]);
    assert!(err.contains("threshold"), "{err}");
    run.ok(&["root", "sign", "root2.bin", "--key", "r1.key"]);
    let out = run.ok(&["root", "verify", "root2.bin", "--trusted", "root1.bin"]);
    assert!(out.contains("root v2"), "{out}");
    // Replaying root 1 after root 2 is a downgrade.
    let err = run.fails(&[
        "root",
        "verify",
        "root1.bin",
        "--trusted",
        "root1.bin",
        "--trusted",
        "root2.bin",
    ]);
    assert!(err.contains("downgrade"), "{err}");
}

#[test]
fn help_explains_every_command() {
    let run = Run::new();
    let help = run.ok(&["--help"]);
    for cmd in [
        "keygen",
        "root",
        "testimage",
        "pack",
        "sign",
        "verify",
        "inspect",
        "diff",
    ] {
        assert!(help.contains(cmd), "{cmd} missing from --help");
    }
    let root_help = run.ok(&["root", "--help"]);
    for cmd in ["init", "rotate", "sign", "verify"] {
        assert!(root_help.contains(cmd), "{cmd} missing from root --help");
    }
}

#[test]
fn seed_names_the_smallest_wave_share_that_reaches_a_device() {
    let run = Run::new();
    run.ok(&["keygen", "--out", "dev"]);
    let text = std::fs::read_to_string(run.path("dev.pub")).unwrap();
    let seed = proto::rollout::seed(&proto::PublicKey::from_text(&text).unwrap());
    let out = run.ok(&["seed", "--json", "dev.pub"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["seed"], seed);
    assert_eq!(v["reached_from"], proto::rollout::share_text(seed + 1));
    // That share admits it; one basis point less does not.
    let at = |share: &str| {
        proto::rollout::Rollout {
            waves: proto::rollout::parse_waves(&format!("{share}@0")).unwrap(),
            ..Default::default()
        }
        .opens_at(seed, 0)
    };
    assert_eq!(at(v["reached_from"].as_str().unwrap()), Some(0));
    if seed > 0 {
        assert_eq!(at(&proto::rollout::share_text(seed)), None);
    }
    assert!(run.fails(&["seed", "missing.pub"]).contains("missing.pub"));
}

/// Issue 31: `fwtool root rotate` (and `init`) made a 365-day root by default while the
/// quick start's lasts 3 years, so the first rotation quietly cut a fleet's trust to a
/// third. Both now default to the quick start's 3 years.
#[test]
fn a_rotated_root_lasts_three_years_by_default() {
    let run = Run::new();
    for k in ["r1", "rel", "ts", "ro"] {
        run.ok(&["keygen", "--out", k]);
    }
    let keys = [
        "--root-key",
        "r1.pub",
        "--release-key",
        "rel.pub",
        "--timestamp-key",
        "ts.pub",
        "--rollout-key",
        "ro.pub",
    ];
    let init = [&["root", "init"][..], &keys, &["--out", "root1.bin"]].concat();
    run.ok(&init);
    let out = run.ok(&[
        "root",
        "rotate",
        "--from",
        "root1.bin",
        "--out",
        "root2.bin",
    ]);
    let year = |text: &str| -> u64 {
        let at = text.find("expires ").expect("names its expiry") + "expires ".len();
        text[at..at + 4].parse().expect("a year")
    };
    let now_year = 1970
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 31_556_952;
    assert!(year(&out) >= now_year + 2, "{out}");
}
