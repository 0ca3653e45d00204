//! Throughput of the verification path on one core: chunking, BLAKE3, ed25519 verify, and
//! full verification of a 50 MiB image (signed manifest + every chunk + image digest).
//!
//! Run: `cargo bench -p unifleet-proto --bench verify_throughput`
//!
//! Each figure is the median of repeated runs; the baseline is a plain memory copy of the
//! same buffer measured in the same run, so ratios survive a noisy machine.
#![allow(clippy::disallowed_methods)] // a benchmark program, not the product
#![allow(clippy::print_stdout)]

use proto::chunking;
use proto::manifest::{
    verify_manifest, BootSpec, ChunkRef, Expectations, HealthProbe, ImageVerifier, Manifest,
    Platform, Staging,
};
use proto::root::{Role, Root, TrustedRoot};
use proto::{Digest, SecretKey};
use std::hint::black_box;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const RUNS: usize = 15;
const NOW: u64 = 1_800_000_000;

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn time(runs: usize, mut f: impl FnMut()) -> Duration {
    f(); // warm up
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

fn image(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new_derive_key("unifleet bench image")
        .finalize_xof()
        .fill(&mut out);
    out
}

fn mb_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn main() {
    let data = image(50 * MIB);

    let copy = time(RUNS, || {
        let v = data.clone();
        black_box(&v);
    });
    let chunk = time(RUNS, || {
        black_box(chunking::boundaries(&data).count());
    });
    let hash = time(RUNS, || {
        black_box(Digest::of(&data));
    });

    let key = SecretKey::from_seed([10; 32]);
    let msg = vec![7u8; 1024];
    let sig = key.sign(b"bench\0", &msg);
    let pk = key.public();
    let verify_1000 = time(RUNS, || {
        for _ in 0..1000 {
            black_box(pk.verify(b"bench\0", &msg, &sig));
        }
    });

    // A signed manifest for the 50 MiB image, and the chunks as a device holds them.
    let root_key = SecretKey::from_seed([1; 32]);
    let root = Root {
        fleet: "home".into(),
        version: 1,
        expires_at: NOW + 1000,
        root: Role {
            keys: vec![root_key.public()],
            threshold: 1,
        },
        release: Role {
            keys: vec![key.public()],
            threshold: 1,
        },
        timestamp: Role {
            keys: vec![SecretKey::from_seed([3; 32]).public()],
            threshold: 1,
        },
        rollout: Role {
            keys: vec![SecretKey::from_seed([4; 32]).public()],
            threshold: 1,
        },
    };
    let mut env = root.seal().unwrap();
    env.sign(&root_key).unwrap();
    let trusted = TrustedRoot::bootstrap(&env.encode().unwrap(), NOW).unwrap();
    let bounds: Vec<(u64, u64)> = chunking::boundaries(&data).collect();
    let chunks: Vec<&[u8]> = bounds
        .iter()
        .map(|(o, l)| &data[*o as usize..(*o + *l) as usize])
        .collect();
    let manifest = Manifest {
        fleet: "home".into(),
        app: "bench".into(),
        version: semver::Version::new(1, 0, 0),
        release: 1,
        channel: "stable".into(),
        platform: Platform::QemuX86_64,
        image_digest: Digest::of(&data),
        image_size: data.len() as u64,
        chunks: chunks
            .iter()
            .map(|c| ChunkRef {
                digest: Digest::of(c),
                size: c.len() as u64,
            })
            .collect(),
        boot: BootSpec {
            memory_mib: 32,
            vcpus: 1,
            cmdline: String::new(),
            probe: HealthProbe::TcpConnect { port: 80 },
            probe_timeout_ms: 1000,
            network: false,
        },
        staging: Staging::Skipped,
        created_at: NOW,
        previous: None,
        rollout: Default::default(),
        provenance: None,
    };
    let mut menv = manifest.seal().unwrap();
    menv.sign(&key).unwrap();
    let signed = menv.encode().unwrap();
    let expect = Expectations {
        app: Some("bench"),
        channel: "stable",
        platform: Platform::QemuX86_64,
        installed_release: None,
    };
    let full = time(RUNS, || {
        let v = verify_manifest(&signed, &trusted, &expect, NOW).unwrap();
        let mut iv = ImageVerifier::new(v.manifest());
        for c in &chunks {
            iv.push(c).unwrap();
        }
        iv.finish().unwrap();
    });
    let manifest_only = time(RUNS, || {
        black_box(verify_manifest(&signed, &trusted, &expect, NOW).unwrap());
    });

    let n = data.len();
    println!(
        "50 MiB buffer, {} chunks (avg {} KiB), median of {RUNS} runs, one core\n",
        chunks.len(),
        n / chunks.len() / 1024
    );
    println!("| measurement | result | vs memcpy baseline |");
    println!("|---|---|---|");
    println!(
        "| memcpy (baseline) | {:.0} MB/s | 1.00 |",
        mb_per_s(n, copy)
    );
    println!(
        "| FastCDC chunking | {:.0} MB/s | {:.2} |",
        mb_per_s(n, chunk),
        copy.as_secs_f64() / chunk.as_secs_f64()
    );
    println!(
        "| BLAKE3 | {:.0} MB/s | {:.2} |",
        mb_per_s(n, hash),
        copy.as_secs_f64() / hash.as_secs_f64()
    );
    println!(
        "| ed25519 verify (1 KiB message) | {:.1} µs | |",
        verify_1000.as_secs_f64() * 1e6 / 1000.0
    );
    println!(
        "| verify signed manifest ({} bytes) | {:.2} ms | |",
        signed.len(),
        manifest_only.as_secs_f64() * 1e3
    );
    println!(
        "| full verification, 50 MiB (manifest + every chunk + image digest) | {:.1} ms ({:.0} MB/s) | {:.2} |",
        full.as_secs_f64() * 1e3,
        mb_per_s(n, full),
        copy.as_secs_f64() / full.as_secs_f64()
    );
}
