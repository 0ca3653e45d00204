//! `hub rebuild APP VERSION`: a released commit built again from scratch and each
//! platform's image compared with the one released (issue 29, "Reproducible").
//!
//! The rebuild gets a fresh checkout and a fresh, empty cache: its dependencies are
//! fetched anew (cargo checks each against Cargo.lock's checksum) and everything is
//! compiled again, in the same sandbox paths (`/src`, `/cache`) the release was built
//! in, so a reproducible build gives the same bytes. A difference says the build is not
//! reproducible, or that the app's cache (`HUB/builds/APP/cache`) gave the release
//! something its source does not: a tampered cache. The unit tests are not run again.

use crate::build::source::{build, BuildError, Job};
use crate::deploy::{build_of, DeployError};
use crate::history::{find, HistoryError};
use crate::home::Home;
use proto::manifest::Platform;
use proto::Digest;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Why a release could not be rebuilt (a rebuild that differs is not an error: see
/// [`Rebuilt::same`]).
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(
        "{app} {version} was published from a prebuilt image, not built by the hub from a \
         push: there is no source to rebuild"
    )]
    NotBuilt { app: String, version: String },
    #[error(
        "commit {commit} is not in {} (the deploy repository was rewritten or replaced)",
        path.display()
    )]
    NoCommit {
        commit: String,
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("commit {0}'s unifleet.toml has no [build] section any more")]
    NoBuildSection(String),
    #[error("reading the commit's build settings")]
    Deploy(#[from] DeployError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("making a fresh build cache")]
    Cache(#[source] std::io::Error),
    #[error("reading the rebuilt image {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One platform's image: released and rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compared {
    pub platform: Platform,
    pub released: Digest,
    /// `None`: the rebuild's `[build] images` has no image for this platform.
    pub rebuilt: Option<Digest>,
}

impl Compared {
    pub fn same(&self) -> bool {
        self.rebuilt == Some(self.released)
    }
}

/// What [`rebuild`] found.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    pub commit: String,
    pub compared: Vec<Compared>,
    /// The toolchain the release was built with, and the one that rebuilt it.
    pub toolchain: (String, String),
    /// The rebuild's SBOM is the one the release names (both from the commit's lock).
    pub sbom_same: bool,
    pub took: Duration,
}

impl Rebuilt {
    /// Every platform's image rebuilt to the released digest.
    pub fn same(&self) -> bool {
        self.compared.iter().all(Compared::same)
    }
}

/// Rebuilds the release of `app` at `version` (on `channel`, see [`find`]) from its
/// commit, saying each step.
pub fn rebuild(
    home: &Home,
    (app, version, channel): (&str, &str, Option<&str>),
    say: &mut dyn FnMut(&str),
) -> Result<Rebuilt, RebuildError> {
    let began = Instant::now();
    let store = home.store().map_err(HistoryError::from)?;
    let release = find(home, &store, app, version, channel)?;
    let Some(provenance) = release[0].provenance.clone() else {
        return Err(RebuildError::NotBuilt {
            app: app.into(),
            version: version.into(),
        });
    };
    let path = home.dir.join("deploy.git");
    let no_commit = |source| RebuildError::NoCommit {
        commit: provenance.commit.clone(),
        path: path.clone(),
        source,
    };
    let repo = git2::Repository::open_bare(&path).map_err(no_commit)?;
    let commit = git2::Oid::from_str(&provenance.commit)
        .and_then(|id| repo.find_commit(id))
        .map_err(no_commit)?;
    let (semver, spec, _) = build_of(&repo, &commit)?;
    let spec = spec.ok_or_else(|| RebuildError::NoBuildSection(provenance.commit.clone()))?;
    let cache = tempfile::Builder::new()
        .prefix("unifleet-rebuild-")
        .tempdir()
        .map_err(RebuildError::Cache)?;
    say(&format!(
        "-----> rebuilding {app} {version} (release {}) from commit {} with an empty cache",
        release[0].info.release, provenance.commit
    ));
    let built = build(
        Job {
            repo: &repo,
            commit: &commit,
            app,
            version: &semver,
            build: &spec,
            test: &Default::default(),
            cache: cache.path(),
        },
        say,
    )?;
    let mut compared = vec![];
    for released in &release {
        let platform = released.platform();
        let image = built.images.iter().find(|i| i.platform == Some(platform));
        let rebuilt = match image {
            Some(i) => Some(digest_of(&i.path)?),
            None => None,
        };
        compared.push(Compared {
            platform,
            released: released.image_digest,
            rebuilt,
        });
    }
    Ok(Rebuilt {
        commit: provenance.commit,
        compared,
        toolchain: (provenance.toolchain, built.toolchain.clone()),
        sbom_same: provenance.sbom == built.sbom.as_deref().map(Digest::of),
        took: began.elapsed(),
    })
}

/// An image's digest as a manifest names it (BLAKE3 of the whole file), streamed.
fn digest_of(path: &std::path::Path) -> Result<Digest, RebuildError> {
    use std::io::Read;
    let read = |source| RebuildError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read)?;
    let mut hasher = proto::digest::Hasher::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        match file.read(&mut buf).map_err(read)? {
            0 => return Ok(hasher.finalize()),
            n => hasher.update(&buf[..n]),
        }
    }
}
