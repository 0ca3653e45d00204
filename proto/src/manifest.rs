//! Release manifests and verification of the bytes they describe.

use crate::codec::{CodecError, Kind};
use crate::digest::{Digest, Hasher};
use crate::envelope::Envelope;
use crate::error::{Invalid, VerifyError};
use crate::names;
use crate::root::TrustedRoot;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Largest image a manifest may describe (4 GiB): bounds arithmetic on untrusted sizes.
pub const MAX_IMAGE_SIZE: u64 = 4 << 30;
/// Most chunks one manifest may list.
pub const MAX_CHUNKS: usize = 100_000;
/// Longest kernel command line or banner accepted.
pub const MAX_TEXT_LEN: usize = 1024;

/// How an image boots. The wire encoding is the variant's position (names are for JSON
/// only): only ever append variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Platform {
    /// 32-bit ARM zImage booted as a Xen PV guest (`xenpv`), e.g. a Cubieboard2.
    #[serde(rename = "xen-arm32")]
    XenArm32,
    /// x86_64 ELF with a Xen PVH entry note.
    #[serde(rename = "xen-x86_64-pvh")]
    XenX86_64Pvh,
    /// x86 multiboot ELF booted by QEMU/KVM direct kernel boot.
    #[serde(rename = "qemu-x86_64")]
    QemuX86_64,
    /// arm64 Image booted by QEMU/KVM (`-M virt`) direct kernel boot, PL011 console.
    #[serde(rename = "qemu-aarch64")]
    QemuAarch64,
}

impl Platform {
    pub const ALL: [Platform; 4] = [
        Platform::XenArm32,
        Platform::XenX86_64Pvh,
        Platform::QemuX86_64,
        Platform::QemuAarch64,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Platform::XenArm32 => "xen-arm32",
            Platform::XenX86_64Pvh => "xen-x86_64-pvh",
            Platform::QemuX86_64 => "qemu-x86_64",
            Platform::QemuAarch64 => "qemu-aarch64",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A platform name that is not one of [`Platform::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown platform {0:?} (known: xen-arm32, xen-x86_64-pvh, qemu-x86_64, qemu-aarch64)")]
pub struct UnknownPlatform(pub String);

impl FromStr for Platform {
    type Err = UnknownPlatform;
    fn from_str(s: &str) -> Result<Platform, UnknownPlatform> {
        Platform::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPlatform(s.into()))
    }
}

/// An operator's probe spelling that [`HealthProbe::parse`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadProbe {
    #[error("bad probe port {0:?}")]
    Port(String),
    #[error("bad probe path {0:?}: an absolute path such as /health, printable, no spaces")]
    Path(String),
    #[error("unknown probe {0:?}: use banner, banner:TEXT, tcp:PORT or http:[PORT]/PATH")]
    Unknown(String),
}

/// How a device decides a freshly booted instance is healthy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthProbe {
    /// This exact line appears on the first serial console.
    ConsoleBanner { line: String },
    /// A TCP connection to this port of the instance succeeds: the guest's address when
    /// the release has a network interface, else the device's loopback (port 0: the
    /// console's port).
    TcpConnect { port: u16 },
    /// `GET path` on this port of the guest's address answers `200` (needs a network
    /// interface, [`BootSpec::network`]).
    Http { port: u16, path: String },
}

/// The longest probe path a manifest may carry.
pub const MAX_PROBE_PATH: usize = 256;

/// Whether `path` can go into a request line as it is: absolute, printable ASCII, no spaces.
pub fn valid_probe_path(path: &str) -> bool {
    path.starts_with('/')
        && path.len() <= MAX_PROBE_PATH
        && path.bytes().all(|b| b.is_ascii_graphic())
}

impl HealthProbe {
    /// Parses the operator's spelling: `banner` (the line `READY <app> <version>`),
    /// `banner:TEXT`, `tcp:PORT`, or `http:/PATH` (port 80) / `http:PORT/PATH`.
    pub fn parse(
        text: &str,
        app: &str,
        version: &semver::Version,
    ) -> Result<HealthProbe, BadProbe> {
        Ok(match text.split_once(':') {
            None if text == "banner" => HealthProbe::ConsoleBanner {
                line: Manifest::ready_banner(app, version),
            },
            Some(("banner", line)) if !line.is_empty() => {
                HealthProbe::ConsoleBanner { line: line.into() }
            }
            Some(("tcp", port)) => HealthProbe::TcpConnect {
                port: port.parse().map_err(|_| BadProbe::Port(port.into()))?,
            },
            Some(("http", rest)) => {
                let at = rest.find('/').ok_or_else(|| BadProbe::Path(rest.into()))?;
                let (port, path) = rest.split_at(at);
                let port = match port {
                    "" => 80,
                    p => p
                        .parse()
                        .ok()
                        .filter(|&p| p != 0)
                        .ok_or_else(|| BadProbe::Port(p.into()))?,
                };
                if !valid_probe_path(path) {
                    return Err(BadProbe::Path(path.into()));
                }
                HealthProbe::Http {
                    port,
                    path: path.into(),
                }
            }
            _ => return Err(BadProbe::Unknown(text.into())),
        })
    }
}

/// What the device needs to boot the image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSpec {
    pub memory_mib: u32,
    pub vcpus: u32,
    pub cmdline: String,
    pub probe: HealthProbe,
    pub probe_timeout_ms: u64,
    /// The unikernel needs one network interface; where it is attached (a libvirt network
    /// or a bridge) is the device's own setting (`nic` in device.toml).
    pub network: bool,
}

/// One content-defined chunk of the image, in image order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub digest: Digest,
    pub size: u64,
}

/// Whether the image passed the staging gate before it was signed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Staging {
    /// Digest of the staging device's signed report that the image booted healthy.
    Passed { report: Digest },
    /// The operator published with an explicit `--no-staging`.
    Skipped,
}

/// A release: the payload of a [`Kind::Manifest`] message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub fleet: String,
    pub app: String,
    pub version: semver::Version,
    /// Grows by at least one per (app, channel); devices refuse anything not above what
    /// they have installed.
    pub release: u64,
    pub channel: String,
    pub platform: Platform,
    pub image_digest: Digest,
    pub image_size: u64,
    pub chunks: Vec<ChunkRef>,
    pub boot: BootSpec,
    pub staging: Staging,
    /// When it was signed. A manifest does not expire: its content signature stays valid,
    /// and freshness is the announcement's (see [`crate::announcement`]).
    pub created_at: u64,
    /// Digest of the previous release's signed manifest on this (app, channel), if any.
    pub previous: Option<Digest>,
    /// Waves, targets and halt policy (see [`crate::rollout`]); default: everyone now.
    pub rollout: crate::rollout::Rollout,
    /// Where the image came from, when the hub built it from a pushed commit (`None`: a
    /// prebuilt image given to `hub publish`).
    pub provenance: Option<Provenance>,
}

/// Longest text a provenance field may hold (a build command, a toolchain's version).
pub const MAX_PROVENANCE_TEXT: usize = 1024;

/// The channel the hub stages each release on before signing it for its own: staging
/// devices boot the candidate there first.
pub const STAGING_CHANNEL: &str = "staging";

/// How a release built from source was made (issue 29): signed into its manifest so a
/// device, an auditor or `hub rebuild` can tell what it runs and repeat the build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The pushed commit built: its git object id in hex (40 digits, or 64 for SHA-256
    /// repositories).
    pub commit: String,
    /// The hub that built it: `unifleet-hub VERSION`.
    pub builder: String,
    /// The toolchain in the build sandbox (`rustc -V`), empty when it has none.
    pub toolchain: String,
    /// `[build] command` of the commit's `unifleet.toml`.
    pub command: String,
    /// Digest of the build's log, kept in the hub's store under `provenance/`.
    pub log: Digest,
    /// Digest of the SBOM (CycloneDX JSON) kept beside the log, when the build had a
    /// dependency graph to describe (a Cargo.lock).
    pub sbom: Option<Digest>,
}

impl Provenance {
    fn validate(&self) -> Result<(), Invalid> {
        let hex = |s: &str| matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(&self.commit) {
            return Err(Invalid::ProvenanceCommit);
        }
        let texts = [&self.builder, &self.toolchain, &self.command];
        if texts.iter().any(|t| t.len() > MAX_PROVENANCE_TEXT) {
            return Err(Invalid::ProvenanceTooLong {
                max: MAX_PROVENANCE_TEXT,
            });
        }
        Ok(())
    }
}

impl Manifest {
    /// Structural checks that need no context: names, sizes, chunk list consistency.
    pub fn validate(&self) -> Result<(), VerifyError> {
        let invalid = |reason: Invalid| VerifyError::Invalid {
            kind: Kind::Manifest,
            reason,
        };
        names::check("fleet", &self.fleet).map_err(|e| invalid(e.into()))?;
        names::check("app", &self.app).map_err(|e| invalid(e.into()))?;
        names::check("channel", &self.channel).map_err(|e| invalid(e.into()))?;
        if self.release == 0 {
            return Err(invalid(Invalid::ReleaseZero));
        }
        if self.image_size == 0 || self.image_size > MAX_IMAGE_SIZE {
            return Err(invalid(Invalid::ImageSize {
                size: self.image_size,
                max: MAX_IMAGE_SIZE,
            }));
        }
        if self.chunks.is_empty() || self.chunks.len() > MAX_CHUNKS {
            return Err(invalid(Invalid::ChunkCount {
                count: self.chunks.len(),
                max: MAX_CHUNKS,
            }));
        }
        let mut total: u64 = 0;
        for (index, c) in self.chunks.iter().enumerate() {
            if c.size == 0 || c.size > u64::from(crate::chunking::MAX_CHUNK) {
                return Err(invalid(Invalid::ChunkSize {
                    index,
                    size: c.size,
                }));
            }
            total += c.size; // bounded: MAX_CHUNKS * MAX_CHUNK fits easily in u64
        }
        if total != self.image_size {
            return Err(invalid(Invalid::ChunkTotal {
                total,
                size: self.image_size,
            }));
        }
        if self.boot.cmdline.len() > MAX_TEXT_LEN {
            return Err(invalid(Invalid::CmdlineTooLong));
        }
        match &self.boot.probe {
            HealthProbe::ConsoleBanner { line } if line.is_empty() || line.len() > MAX_TEXT_LEN => {
                return Err(invalid(Invalid::BadBanner));
            }
            HealthProbe::Http { port, path } if *port == 0 || !valid_probe_path(path) => {
                return Err(invalid(Invalid::BadProbePath));
            }
            HealthProbe::Http { .. } if !self.boot.network => {
                return Err(invalid(Invalid::ProbeNeedsNetwork));
            }
            HealthProbe::TcpConnect { port: 0 } if self.boot.network => {
                return Err(invalid(Invalid::ConsolePortWithNetwork));
            }
            _ => {}
        }
        if self.boot.memory_mib == 0 || self.boot.vcpus == 0 {
            return Err(invalid(Invalid::NoMemoryOrVcpu));
        }
        self.rollout.validate().map_err(invalid)?;
        if let Some(p) = &self.provenance {
            p.validate().map_err(invalid)?;
        }
        Ok(())
    }

    /// An unsigned envelope holding this manifest, ready for release keys to sign.
    /// Without provenance it is written as manifests were before it (which older devices
    /// read): see [`crate::codec::Kind::appended_options`].
    pub fn seal(&self) -> Result<Envelope, CodecError> {
        let absent = usize::from(self.provenance.is_none());
        Envelope::new(crate::codec::encode_appended(Kind::Manifest, self, absent)?)
    }

    /// The banner a test image prints when ready: `READY <app> <version>`.
    pub fn ready_banner(app: &str, version: &semver::Version) -> String {
        format!("READY {app} {version}")
    }
}

/// What the verifying device expects of a release: *is it for me?* (applicability, never
/// authenticity).
#[derive(Clone, Debug)]
pub struct Expectations<'a> {
    /// `None`: any app is acceptable.
    pub app: Option<&'a str>,
    pub channel: &'a str,
    pub platform: Platform,
    /// Release currently installed for this (app, channel); offers must be above it.
    pub installed_release: Option<u64>,
}

/// What a signed release message claims about itself; checked against [`Expectations`].
#[derive(Debug)]
pub(crate) struct Claims<'a> {
    pub kind: Kind,
    pub app: &'a str,
    pub channel: &'a str,
    pub platform: Platform,
    pub release: u64,
}

impl Expectations<'_> {
    pub(crate) fn check(&self, claims: Claims<'_>) -> Result<(), VerifyError> {
        let Claims {
            kind,
            app,
            channel,
            platform,
            release,
        } = claims;
        if let Some(expected) = self.app {
            if expected != app {
                return Err(VerifyError::WrongApp {
                    kind,
                    expected: expected.into(),
                    found: app.into(),
                });
            }
        }
        if channel != self.channel {
            return Err(VerifyError::WrongChannel {
                kind,
                expected: self.channel.into(),
                found: channel.into(),
            });
        }
        if platform != self.platform {
            return Err(VerifyError::WrongPlatform {
                kind,
                expected: self.platform.to_string(),
                found: platform.to_string(),
            });
        }
        if let Some(installed) = self.installed_release {
            if release <= installed {
                return Err(VerifyError::Rollback {
                    app: app.into(),
                    channel: channel.into(),
                    offered: release,
                    installed,
                });
            }
        }
        Ok(())
    }
}

/// A manifest whose signatures, structure and context all checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedManifest {
    manifest: Manifest,
    digest: Digest,
}

impl VerifiedManifest {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// Digest of the signed envelope bytes: what announcements point at.
    pub fn digest(&self) -> Digest {
        self.digest
    }
    pub fn into_manifest(self) -> Manifest {
        self.manifest
    }
}

/// The one entry point for manifests: signed envelope bytes in, verified manifest out.
///
/// Order: size limit and framing; root freshness at `now`; every signer a release key
/// with a valid signature; release threshold; only then decode; structure; fleet (all
/// authenticity); then app, channel, platform and release number above the installed one
/// (applicability). No expiry of its own: freshness is the announcement's.
pub fn verify_manifest(
    bytes: &[u8],
    root: &TrustedRoot,
    expect: &Expectations<'_>,
    now: u64,
) -> Result<VerifiedManifest, VerifyError> {
    let env = Envelope::decode(bytes, Kind::Manifest)?;
    root.check_fresh(now)?;
    let manifest: Manifest = env.open("release", &root.root().release)?;
    manifest.validate()?;
    root.check_fleet(Kind::Manifest, &manifest.fleet)?;
    expect.check(Claims {
        kind: Kind::Manifest,
        app: &manifest.app,
        channel: &manifest.channel,
        platform: manifest.platform,
        release: manifest.release,
    })?;
    Ok(VerifiedManifest {
        manifest,
        digest: Digest::of(bytes),
    })
}

/// Checks one chunk against its manifest entry. Usable in any order, as chunks arrive
/// from peers. Length is checked before hashing, so endless data costs nothing.
pub fn verify_chunk(index: usize, expected: &ChunkRef, bytes: &[u8]) -> Result<(), VerifyError> {
    let got = bytes.len() as u64;
    if got > expected.size {
        return Err(VerifyError::TooManyBytes {
            what: crate::Declared::Chunk(index),
            declared: expected.size,
            received: got,
        });
    }
    if got < expected.size {
        return Err(VerifyError::TooFewBytes {
            what: crate::Declared::Chunk(index),
            declared: expected.size,
            received: got,
        });
    }
    let actual = Digest::of(bytes);
    if actual != expected.digest {
        return Err(VerifyError::ChunkDigestMismatch {
            index,
            expected: expected.digest,
            actual,
        });
    }
    Ok(())
}

/// Streams a whole image through verification, chunk by chunk in order, without holding
/// it: each chunk is checked against its entry, and the image digest and size at the end.
#[derive(Debug)]
pub struct ImageVerifier<'m> {
    manifest: &'m Manifest,
    next: usize,
    received: u64,
    hasher: Hasher,
}

impl<'m> ImageVerifier<'m> {
    pub fn new(manifest: &'m Manifest) -> ImageVerifier<'m> {
        ImageVerifier {
            manifest,
            next: 0,
            received: 0,
            hasher: Hasher::new(),
        }
    }

    /// Verifies the next chunk in image order.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), VerifyError> {
        let Some(expected) = self.manifest.chunks.get(self.next) else {
            return Err(VerifyError::TooManyBytes {
                what: crate::Declared::Image,
                declared: self.manifest.image_size,
                received: self.received + bytes.len() as u64,
            });
        };
        verify_chunk(self.next, expected, bytes)?;
        self.hasher.update(bytes);
        self.received += bytes.len() as u64;
        self.next += 1;
        Ok(())
    }

    /// Checks that every chunk arrived and the image digest matches.
    pub fn finish(self) -> Result<(), VerifyError> {
        if self.next != self.manifest.chunks.len() {
            return Err(VerifyError::TooFewBytes {
                what: crate::Declared::Image,
                declared: self.manifest.image_size,
                received: self.received,
            });
        }
        let actual = self.hasher.finalize();
        if actual != self.manifest.image_digest {
            return Err(VerifyError::ImageDigestMismatch {
                expected: self.manifest.image_digest,
                actual,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_spellings() {
        let v = semver::Version::new(1, 2, 3);
        let parse = |t: &str| HealthProbe::parse(t, "shop", &v);
        assert_eq!(
            parse("banner"),
            Ok(HealthProbe::ConsoleBanner {
                line: "READY shop 1.2.3".into()
            })
        );
        assert_eq!(parse("tcp:80"), Ok(HealthProbe::TcpConnect { port: 80 }));
        let http = |port, path: &str| {
            Ok(HealthProbe::Http {
                port,
                path: path.into(),
            })
        };
        assert_eq!(parse("http:/health"), http(80, "/health"));
        assert_eq!(
            parse("http:8080/health?deep=1"),
            http(8080, "/health?deep=1")
        );
        assert_eq!(parse("http:/"), http(80, "/"));
        assert_eq!(parse("http:health"), Err(BadProbe::Path("health".into())));
        assert_eq!(parse("http:0/h"), Err(BadProbe::Port("0".into())));
        assert_eq!(parse("http:x/h"), Err(BadProbe::Port("x".into())));
        assert_eq!(parse("http:/a b"), Err(BadProbe::Path("/a b".into())));
        assert_eq!(
            parse("http:/a\r\nX: y"),
            Err(BadProbe::Path("/a\r\nX: y".into()))
        );
        assert!(matches!(parse("udp:53"), Err(BadProbe::Unknown(_))));
    }

    fn sample() -> Manifest {
        Manifest {
            fleet: "home".into(),
            app: "shop".into(),
            version: semver::Version::new(1, 0, 0),
            release: 1,
            channel: "stable".into(),
            platform: Platform::QemuX86_64,
            image_digest: Digest::of(b"image"),
            image_size: 5,
            chunks: vec![ChunkRef {
                digest: Digest::of(b"image"),
                size: 5,
            }],
            boot: BootSpec {
                memory_mib: 16,
                vcpus: 1,
                cmdline: String::new(),
                probe: HealthProbe::TcpConnect { port: 80 },
                probe_timeout_ms: 10_000,
                network: false,
            },
            staging: Staging::Skipped,
            created_at: 1,
            previous: None,
            rollout: Default::default(),
            provenance: None,
        }
    }

    #[test]
    fn an_http_probe_needs_a_network_interface_and_a_clean_path() {
        let mut m = sample();
        m.boot.probe = HealthProbe::Http {
            port: 80,
            path: "/health".into(),
        };
        assert!(matches!(
            m.validate(),
            Err(VerifyError::Invalid {
                reason: Invalid::ProbeNeedsNetwork,
                ..
            })
        ));
        m.boot.network = true;
        m.validate().unwrap();
        m.boot.probe = HealthProbe::TcpConnect { port: 0 };
        assert!(matches!(
            m.validate(),
            Err(VerifyError::Invalid {
                reason: Invalid::ConsolePortWithNetwork,
                ..
            })
        ));
        m.boot.probe = HealthProbe::Http {
            port: 80,
            path: "/health".into(),
        };
        m.boot.probe = HealthProbe::Http {
            port: 80,
            path: "/he alth".into(),
        };
        assert!(matches!(
            m.validate(),
            Err(VerifyError::Invalid {
                reason: Invalid::BadProbePath,
                ..
            })
        ));
    }
}
