//! The software bill of materials of a built commit, made from its `Cargo.lock`: the
//! resolved dependency graph the build used (the fetch and build run with `--locked`, so
//! the lock file is exactly what went into the image, not what `Cargo.toml` would allow).
//!
//! The SBOM is CycloneDX 1.5 JSON and deterministic: no timestamp, no random serial
//! number, components and dependencies sorted. A reproducible rebuild of the same commit
//! gives the same bytes, so the SBOM's digest in the release's provenance can be checked
//! by rebuilding.
//!
//! [`check_sources`] is what restricts the fetch step's network use to crates.io: the
//! sandbox gives `cargo fetch` the network, and the lock file decides where it goes. A
//! lock file naming a git repository or another registry is refused before the fetch,
//! as is a crates.io package without a checksum (cargo would not verify its download).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The largest `Cargo.lock` read: far above any real one (tens of KiB), small enough that
/// a pushed file cannot make the hub parse without bound.
pub const MAX_LOCK_BYTES: usize = 4 * 1024 * 1024;

/// The crates.io index, as `Cargo.lock` names it with the git and the sparse protocol.
const CRATES_IO: [&str; 2] = [
    "registry+https://github.com/rust-lang/crates.io-index",
    "sparse+https://index.crates.io/",
];

/// Why a `Cargo.lock` gave no SBOM, or may not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum SbomError {
    #[error(
        "Cargo.lock is {size} bytes, more than the {MAX_LOCK_BYTES} the hub reads: \
         check that the committed file really is cargo's lock file"
    )]
    TooBig { size: usize },
    #[error("Cargo.lock is not valid TOML: regenerate it with `cargo generate-lockfile`")]
    Parse {
        #[source]
        source: toml::de::Error,
    },
    #[error(
        "Cargo.lock is format version {version}, which this hub does not understand \
         (it reads versions 1 to 4): write it with a stable cargo"
    )]
    UnsupportedVersion { version: u32 },
    #[error(
        "Cargo.lock: {name} {version} comes from {origin}, but builds may only fetch from \
         crates.io: vendor it (cargo vendor) and point Cargo.toml at the path, or publish \
         it to crates.io"
    )]
    ForbiddenSource {
        name: String,
        version: String,
        /// The lock's `source` (not named so: thiserror would take it for the cause).
        origin: String,
    },
    #[error(
        "Cargo.lock: {name} {version} from crates.io has no checksum, so cargo would not \
         verify what it downloads: run `cargo update -p {name}` with a current cargo and \
         push the new Cargo.lock"
    )]
    MissingChecksum { name: String, version: String },
    #[error(
        "Cargo.lock: {name} {version} has checksum {checksum:?}, not a SHA-256 in hex: \
         regenerate Cargo.lock with `cargo update -p {name}`"
    )]
    BadChecksum {
        name: String,
        version: String,
        checksum: String,
    },
}

/// A parsed `Cargo.lock`: what the SBOM and the source check need of it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Lock {
    /// The `version = N` at the top; none for the old formats (1 and 2).
    #[serde(default)]
    pub version: Option<u32>,
    #[serde(default, rename = "package")]
    pub packages: Vec<Package>,
}

/// One `[[package]]` of a `Cargo.lock`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    /// Where cargo fetches it from; none for workspace members and path dependencies.
    #[serde(default)]
    pub source: Option<String>,
    /// The SHA-256 of the `.crate` file, for registry packages (lock format 2 and later).
    #[serde(default)]
    pub checksum: Option<String>,
    /// `"name"`, `"name version"` or `"name version (source)"`: as much as names one
    /// package of the lock.
    #[serde(default)]
    pub dependencies: Vec<String>,
}

impl Package {
    /// Fetched from crates.io (rather than a workspace member or path dependency).
    pub fn from_crates_io(&self) -> bool {
        self.source
            .as_deref()
            .is_some_and(|s| CRATES_IO.contains(&s))
    }

    /// The package's reference within the SBOM.
    pub fn bom_ref(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Parses a `Cargo.lock`, refusing one too big to be real before reading it.
pub fn parse_lock(text: &str) -> Result<Lock, SbomError> {
    if text.len() > MAX_LOCK_BYTES {
        return Err(SbomError::TooBig { size: text.len() });
    }
    let lock: Lock = toml::from_str(text).map_err(|source| SbomError::Parse { source })?;
    match lock.version {
        None | Some(1..=4) => Ok(lock),
        Some(version) => Err(SbomError::UnsupportedVersion { version }),
    }
}

/// Refuses a lock file that would make the fetch step reach anything but crates.io, or
/// download a crate cargo cannot verify.
pub fn check_sources(lock: &Lock) -> Result<(), SbomError> {
    lock.packages.iter().try_for_each(check_package)
}

fn check_package(p: &Package) -> Result<(), SbomError> {
    let Some(source) = &p.source else {
        return Ok(());
    };
    let (name, version) = (p.name.clone(), p.version.clone());
    match &p.checksum {
        _ if !p.from_crates_io() => Err(SbomError::ForbiddenSource {
            name,
            version,
            origin: source.clone(),
        }),
        None => Err(SbomError::MissingChecksum { name, version }),
        Some(sum) if !is_sha256_hex(sum) => Err(SbomError::BadChecksum {
            name,
            version,
            checksum: sum.clone(),
        }),
        Some(_) => Ok(()),
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// How many packages the SBOM lists, for a one-line report of a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub components: usize,
    pub from_registry: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SBOM: {} components ({} from crates.io)",
            self.components, self.from_registry
        )
    }
}

/// Counts the lock's packages, and those of them fetched from crates.io.
pub fn summary(lock: &Lock) -> Summary {
    Summary {
        components: lock.packages.len(),
        from_registry: lock.packages.iter().filter(|p| p.from_crates_io()).count(),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Bom {
    bom_format: &'static str,
    spec_version: &'static str,
    version: u32,
    metadata: Metadata,
    components: Vec<Component>,
    dependencies: Vec<Dependency>,
}

#[derive(Serialize)]
struct Metadata {
    tools: Tools,
    component: App,
}

#[derive(Serialize)]
struct Tools {
    components: Vec<Tool>,
}

#[derive(Serialize)]
struct Tool {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'static str,
    version: &'static str,
}

#[derive(Serialize)]
struct App {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "bom-ref")]
    bom_ref: String,
    name: String,
    version: String,
    properties: Vec<Property>,
}

#[derive(Serialize)]
struct Property {
    name: &'static str,
    value: String,
}

#[derive(Serialize)]
struct Component {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "bom-ref")]
    bom_ref: String,
    name: String,
    version: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    hashes: Vec<Hash>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purl: Option<String>,
}

#[derive(Serialize)]
struct Hash {
    alg: &'static str,
    content: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Dependency {
    #[serde(rename = "ref")]
    reference: String,
    depends_on: BTreeSet<String>,
}

/// The CycloneDX 1.5 JSON SBOM of `app` at `version`, built from `commit` with `lock`:
/// pretty-printed, newline-terminated, the same bytes for the same input.
///
/// The app is the BOM's subject and depends on the lock's roots (its workspace members);
/// a dependency entry that names no package of the lock is left out.
pub fn cyclonedx(lock: &Lock, app: &str, version: &str, commit: &str) -> Vec<u8> {
    let app = app_component(app, version, commit);
    let mut components: Vec<Component> = lock.packages.iter().map(component).collect();
    components.sort_by(|a, b| a.bom_ref.cmp(&b.bom_ref));
    let bom = Bom {
        bom_format: "CycloneDX",
        spec_version: "1.5",
        version: 1,
        dependencies: dependencies(lock, &app.bom_ref),
        metadata: Metadata {
            tools: tools(),
            component: app,
        },
        components,
    };
    let mut json =
        serde_json::to_vec_pretty(&bom).expect("plain structs with string keys serialise");
    json.push(b'\n');
    json
}

fn tools() -> Tools {
    Tools {
        components: vec![Tool {
            kind: "application",
            name: "unifleet-hub",
            version: env!("CARGO_PKG_VERSION"),
        }],
    }
}

fn app_component(app: &str, version: &str, commit: &str) -> App {
    App {
        kind: "application",
        // Distinct from a workspace member's `NAME@VERSION` of the same name.
        bom_ref: format!("app:{app}@{version}"),
        name: app.into(),
        version: version.into(),
        properties: vec![Property {
            name: "unifleet:git-commit",
            value: commit.into(),
        }],
    }
}

fn component(package: &Package) -> Component {
    let hashes = package.checksum.iter().map(|sum| Hash {
        alg: "SHA-256",
        content: sum.clone(),
    });
    Component {
        kind: "library",
        bom_ref: package.bom_ref(),
        name: package.name.clone(),
        version: package.version.clone(),
        hashes: hashes.collect(),
        purl: package.from_crates_io().then(|| purl(package)),
    }
}

/// `pkg:cargo/NAME@VERSION`, percent-encoded as the purl spec asks (a version's `+build`
/// becomes `%2Bbuild`).
fn purl(package: &Package) -> String {
    let (name, version) = (&package.name, &package.version);
    format!("pkg:cargo/{}@{}", purl_encode(name), purl_encode(version))
}

fn purl_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every package's resolved dependencies, and the app's on the roots, sorted by ref.
fn dependencies(lock: &Lock, app_ref: &str) -> Vec<Dependency> {
    let index = Index::new(lock);
    let mut deps: BTreeMap<String, BTreeSet<String>> = lock
        .packages
        .iter()
        .map(|p| (p.bom_ref(), index.resolve_all(&p.dependencies)))
        .collect();
    let depended: BTreeSet<&String> = deps.values().flatten().collect();
    let roots = deps
        .keys()
        .filter(|r| !depended.contains(r))
        .cloned()
        .collect();
    deps.insert(app_ref.to_string(), roots);
    deps.into_iter()
        .map(|(reference, depends_on)| Dependency {
            reference,
            depends_on,
        })
        .collect()
}

/// The lock's packages by name, to resolve dependency entries without a scan each.
struct Index<'a> {
    by_name: BTreeMap<&'a str, Vec<&'a Package>>,
}

impl<'a> Index<'a> {
    fn new(lock: &'a Lock) -> Self {
        let mut by_name: BTreeMap<&str, Vec<&Package>> = BTreeMap::new();
        for package in &lock.packages {
            by_name.entry(&package.name).or_default().push(package);
        }
        Index { by_name }
    }

    fn resolve_all(&self, entries: &[String]) -> BTreeSet<String> {
        entries
            .iter()
            .filter_map(|e| self.resolve(e))
            .map(Package::bom_ref)
            .collect()
    }

    /// The one package an entry names: by name alone when the lock has one of that name,
    /// else by name and version (and source, when the entry gives it).
    fn resolve(&self, entry: &str) -> Option<&'a Package> {
        let mut parts = entry.splitn(3, ' ');
        let candidates = self.by_name.get(parts.next()?)?;
        let version = parts.next();
        let source = parts
            .next()
            .map(|s| s.trim_start_matches('(').trim_end_matches(')'));
        let mut found = candidates.iter().filter(|p| {
            version.is_none_or(|v| p.version == v)
                && source.is_none_or(|s| p.source.as_deref() == Some(s))
        });
        let first = found.next()?;
        found.next().is_none().then_some(*first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const REAL: &str = include_str!("../../../firmware-tools/unikernels/Cargo.lock");

    fn sbom_json(lock: &Lock) -> Value {
        let bytes = cyclonedx(lock, "hello-http", "1.2.0", "0123abcd");
        assert_eq!(bytes.last(), Some(&b'\n'));
        serde_json::from_slice(&bytes).unwrap()
    }

    fn lock_of(packages: &str) -> Lock {
        parse_lock(&format!("version = 3\n\n{packages}")).unwrap()
    }

    const SUM: &str = "b6f8b28ad56c6e35524a37dd492af5d1a47e31e1a4d175cd12f89c075f01980f";

    #[test]
    fn real_lock_parses_and_passes() {
        let lock = parse_lock(REAL).unwrap();
        assert_eq!(lock.version, Some(4));
        check_sources(&lock).unwrap();
        let s = summary(&lock);
        assert_eq!(s.components, lock.packages.len());
        assert_eq!(
            s.from_registry + 1,
            s.components,
            "hello-http is the one member"
        );
        assert!(s.to_string().starts_with("SBOM: "), "{s}");
    }

    #[test]
    fn real_lock_sbom() {
        let lock = parse_lock(REAL).unwrap();
        let bom = sbom_json(&lock);
        assert_eq!(bom["bomFormat"], "CycloneDX");
        assert_eq!(bom["specVersion"], "1.5");
        assert_eq!(bom["version"], 1);
        let app = &bom["metadata"]["component"];
        assert_eq!(app["type"], "application");
        assert_eq!(app["name"], "hello-http");
        assert_eq!(app["version"], "1.2.0");
        assert_eq!(app["properties"][0]["value"], "0123abcd");
        let tool = &bom["metadata"]["tools"]["components"][0];
        assert_eq!(tool["name"], "unifleet-hub");

        let components = bom["components"].as_array().unwrap();
        assert_eq!(components.len(), lock.packages.len());
        let smoltcp = components.iter().find(|c| c["name"] == "smoltcp").unwrap();
        assert_eq!(smoltcp["purl"], "pkg:cargo/smoltcp@0.14.0");
        assert_eq!(smoltcp["bom-ref"], "smoltcp@0.14.0");
        assert_eq!(smoltcp["hashes"][0]["alg"], "SHA-256");
        assert_eq!(smoltcp["hashes"][0]["content"], SUM);
        let member = components
            .iter()
            .find(|c| c["name"] == "hello-http")
            .unwrap();
        assert!(member.get("purl").is_none() && member.get("hashes").is_none());
    }

    #[test]
    fn real_lock_dependencies_resolve() {
        let bom = sbom_json(&parse_lock(REAL).unwrap());
        let refs: BTreeSet<&str> = bom["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["bom-ref"].as_str().unwrap())
            .collect();
        let deps = bom["dependencies"].as_array().unwrap();
        assert_eq!(deps.len(), refs.len() + 1, "every package, and the app");
        for dep in deps {
            for on in dep["dependsOn"].as_array().unwrap() {
                assert!(refs.contains(on.as_str().unwrap()), "{on} in {dep}");
            }
        }
        let app = deps
            .iter()
            .find(|d| d["ref"] == "app:hello-http@1.2.0")
            .unwrap();
        assert_eq!(app["dependsOn"], serde_json::json!(["hello-http@0.1.0"]));
        let smoltcp = deps.iter().find(|d| d["ref"] == "smoltcp@0.14.0").unwrap();
        assert!(smoltcp["dependsOn"]
            .as_array()
            .unwrap()
            .contains(&Value::from("bitflags@1.3.2")));
    }

    #[test]
    fn sbom_is_deterministic() {
        let lock = parse_lock(REAL).unwrap();
        let a = cyclonedx(&lock, "hello-http", "1.2.0", "0123abcd");
        let b = cyclonedx(
            &parse_lock(REAL).unwrap(),
            "hello-http",
            "1.2.0",
            "0123abcd",
        );
        assert_eq!(a, b);
    }

    #[test]
    fn git_source_refused_naming_the_package() {
        let lock = lock_of(
            "[[package]]\nname = \"evil\"\nversion = \"0.1.0\"\n\
             source = \"git+https://example.com/evil.git#abc\"\n",
        );
        let err = check_sources(&lock).unwrap_err();
        assert!(matches!(err, SbomError::ForbiddenSource { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("evil 0.1.0"), "{msg}");
        assert!(
            msg.contains("git+https://example.com/evil.git#abc"),
            "{msg}"
        );
        assert!(msg.contains("cargo vendor"), "{msg}");
    }

    #[test]
    fn crates_io_without_checksum_refused() {
        let lock = lock_of(
            "[[package]]\nname = \"log\"\nversion = \"0.4.35\"\n\
             source = \"sparse+https://index.crates.io/\"\n",
        );
        let err = check_sources(&lock).unwrap_err();
        assert!(matches!(err, SbomError::MissingChecksum { .. }), "{err:?}");
        assert!(err.to_string().contains("log 0.4.35"), "{err}");
    }

    #[test]
    fn garbage_is_a_parse_error() {
        let err = parse_lock("[[package]\nname = ").unwrap_err();
        assert!(matches!(err, SbomError::Parse { .. }), "{err:?}");
        assert!(err.to_string().starts_with("Cargo.lock is not valid TOML"));
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn too_big_refused_before_parsing() {
        let text = "#".repeat(MAX_LOCK_BYTES + 1);
        let err = parse_lock(&text).unwrap_err();
        assert!(matches!(err, SbomError::TooBig { .. }), "{err:?}");
    }

    #[test]
    fn unknown_lock_version_refused() {
        let err = parse_lock("version = 99\n").unwrap_err();
        assert!(matches!(err, SbomError::UnsupportedVersion { version: 99 }));
    }

    #[test]
    fn ambiguous_name_resolves_by_version() {
        let reg = CRATES_IO[0];
        let lock = lock_of(&format!(
            "[[package]]\nname = \"app\"\nversion = \"0.1.0\"\n\
             dependencies = [\"syn 2.0.1\", \"quote\"]\n\n\
             [[package]]\nname = \"quote\"\nversion = \"1.0.0\"\nsource = \"{reg}\"\n\
             checksum = \"{SUM}\"\ndependencies = [\"syn 1.0.9 ({reg})\"]\n\n\
             [[package]]\nname = \"syn\"\nversion = \"1.0.9\"\nsource = \"{reg}\"\n\
             checksum = \"{SUM}\"\n\n\
             [[package]]\nname = \"syn\"\nversion = \"2.0.1\"\nsource = \"{reg}\"\n\
             checksum = \"{SUM}\"\n"
        ));
        check_sources(&lock).unwrap();
        let bom = sbom_json(&lock);
        let deps = bom["dependencies"].as_array().unwrap();
        let of = |r: &str| deps.iter().find(|d| d["ref"] == r).unwrap()["dependsOn"].clone();
        assert_eq!(
            of("app@0.1.0"),
            serde_json::json!(["quote@1.0.0", "syn@2.0.1"])
        );
        assert_eq!(of("quote@1.0.0"), serde_json::json!(["syn@1.0.9"]));
    }

    #[test]
    fn purl_encodes_build_metadata() {
        assert_eq!(purl_encode("0.9.12+spec-1.1.0"), "0.9.12%2Bspec-1.1.0");
        assert_eq!(purl_encode("serde_json"), "serde_json");
    }
}
