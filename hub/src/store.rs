//! The hub's state: one bare git repository (git2). Releases are commits and tags, events
//! are appended to a log file in the same history, so `git clone` / `git log` work on it
//! and a mirror is one `git push` away.
//!
//! Tree layout:
//! ```text
//! root.bin                                   the trust root devices are given
//! blobs/<hex>                                 chunks and signed manifests, by BLAKE3 digest
//! apps/<app>/<channel>/<release>.manifest     signed manifest (release zero-padded to 10 digits)
//! apps/<app>/<channel>/<release>.announcement signed announcement of that release
//! apps/<app>/<channel>/<release>.staging      staging evidence (report bytes), if any
//! devices/<name>.pub                          enrolled device keys
//! events.log                                  one JSON event per line
//! ```
//!
//! Every change is one commit built from HEAD's tree in memory and made the new HEAD
//! only when complete: a crash at any point leaves the previous commit as HEAD (plus
//! unreferenced objects). A release's manifest, signatures, chunks and announcement land
//! in one commit, so the store never holds a release without its signatures.

use anyhow::{bail, Context, Result};
use git2::{Index, IndexEntry, IndexTime, Oid, Repository, Signature};
use proto::Digest;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One line of `events.log`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    pub at: u64,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    pub detail: String,
}

/// A release as listed by `hub releases`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReleaseInfo {
    pub app: String,
    pub channel: String,
    pub release: u64,
    pub manifest: Digest,
}

pub struct Store {
    repo: Repository,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.repo.path().display())
    }
}

fn entry(path: &str, id: Oid, len: usize) -> IndexEntry {
    IndexEntry {
        ctime: IndexTime::new(0, 0),
        mtime: IndexTime::new(0, 0),
        dev: 0,
        ino: 0,
        mode: 0o100644,
        uid: 0,
        gid: 0,
        file_size: len as u32,
        id,
        flags: (path.len().min(0xFFF)) as u16,
        flags_extended: 0,
        path: path.as_bytes().to_vec(),
    }
}

pub fn release_path(app: &str, channel: &str, release: u64, ext: &str) -> String {
    format!("apps/{app}/{channel}/{release:010}.{ext}")
}

/// A set of changes to commit together.
#[derive(Debug, Default)]
pub struct Change {
    files: Vec<(String, Vec<u8>)>,
    events: Vec<Event>,
}

impl Change {
    pub fn put(&mut self, path: impl Into<String>, bytes: Vec<u8>) {
        self.files.push((path.into(), bytes));
    }
    pub fn event(&mut self, e: Event) {
        self.events.push(e);
    }
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.events.is_empty()
    }
}

impl Store {
    pub fn init(path: &Path) -> Result<Store> {
        let repo = Repository::init_bare(path)
            .with_context(|| format!("creating git store {}", path.display()))?;
        Ok(Store { repo })
    }

    pub fn open(path: &Path) -> Result<Store> {
        let repo = Repository::open_bare(path)
            .with_context(|| format!("opening git store {}", path.display()))?;
        Ok(Store { repo })
    }

    fn head_tree(&self) -> Result<Option<git2::Tree<'_>>> {
        match self.repo.head() {
            Ok(h) => Ok(Some(h.peel_to_tree()?)),
            Err(e)
                if e.code() == git2::ErrorCode::UnbornBranch
                    || e.code() == git2::ErrorCode::NotFound =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Bytes of `path` at HEAD, if present.
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let Some(tree) = self.head_tree()? else {
            return Ok(None);
        };
        match tree.get_path(Path::new(path)) {
            Ok(e) => Ok(Some(self.repo.find_blob(e.id())?.content().to_vec())),
            Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn blob(&self, d: &Digest) -> Result<Option<Vec<u8>>> {
        self.read(&format!("blobs/{}", d.to_hex()))
    }

    pub fn has_blob(&self, d: &Digest) -> Result<bool> {
        let Some(tree) = self.head_tree()? else {
            return Ok(false);
        };
        Ok(tree
            .get_path(Path::new(&format!("blobs/{}", d.to_hex())))
            .is_ok())
    }

    /// Names directly under a directory at HEAD.
    pub fn list(&self, dir: &str) -> Result<Vec<String>> {
        let Some(tree) = self.head_tree()? else {
            return Ok(vec![]);
        };
        let sub = match tree.get_path(Path::new(dir)) {
            Ok(e) => self.repo.find_tree(e.id())?,
            Err(_) => return Ok(vec![]),
        };
        Ok(sub
            .iter()
            .filter_map(|e| e.name().ok().map(str::to_string))
            .collect())
    }

    /// Every release of every app and channel, oldest first.
    pub fn releases(&self) -> Result<Vec<ReleaseInfo>> {
        let mut out = vec![];
        for app in self.list("apps")? {
            for channel in self.list(&format!("apps/{app}"))? {
                for file in self.list(&format!("apps/{app}/{channel}"))? {
                    let Some(num) = file.strip_suffix(".manifest") else {
                        continue;
                    };
                    let Ok(release) = num.parse() else { continue };
                    let bytes = self
                        .read(&format!("apps/{app}/{channel}/{file}"))?
                        .context("listed manifest vanished")?;
                    out.push(ReleaseInfo {
                        app: app.clone(),
                        channel: channel.clone(),
                        release,
                        manifest: Digest::of(&bytes),
                    });
                }
            }
        }
        out.sort_by(|a, b| (&a.app, &a.channel, a.release).cmp(&(&b.app, &b.channel, b.release)));
        Ok(out)
    }

    /// The newest release of (app, channel).
    pub fn latest(&self, app: &str, channel: &str) -> Result<Option<ReleaseInfo>> {
        Ok(self
            .releases()?
            .into_iter()
            .filter(|r| r.app == app && r.channel == channel)
            .max_by_key(|r| r.release))
    }

    pub fn events(&self) -> Result<Vec<Event>> {
        let text = self.read("events.log")?.unwrap_or_default();
        Ok(String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Commits `change` on top of HEAD. Retries if another writer moved HEAD meanwhile.
    pub fn commit(&self, message: &str, change: &Change, tag: Option<&str>) -> Result<Oid> {
        for _ in 0..10 {
            match self.try_commit(message, change, tag) {
                Ok(oid) => return Ok(oid),
                Err(e)
                    if e.code() == git2::ErrorCode::Modified
                        || e.message().contains("current tip") =>
                {
                    continue
                }
                Err(e) => return Err(e).context("committing to the git store"),
            }
        }
        bail!("git store HEAD kept moving; giving up on commit {message:?}")
    }

    fn try_commit(
        &self,
        message: &str,
        change: &Change,
        tag: Option<&str>,
    ) -> Result<Oid, git2::Error> {
        let parent = match self.repo.head() {
            Ok(h) => Some(h.peel_to_commit()?),
            Err(_) => None,
        };
        let mut index = Index::new()?;
        if let Some(p) = &parent {
            index.read_tree(&p.tree()?)?;
        }
        for (path, bytes) in &change.files {
            let id = self.repo.blob(bytes)?;
            index.add(&entry(path, id, bytes.len()))?;
        }
        if !change.events.is_empty() {
            let mut log = parent
                .as_ref()
                .and_then(|p| p.tree().ok())
                .and_then(|t| t.get_path(Path::new("events.log")).ok())
                .and_then(|e| self.repo.find_blob(e.id()).ok())
                .map(|b| b.content().to_vec())
                .unwrap_or_default();
            for e in &change.events {
                log.extend_from_slice(serde_json::to_string(e).unwrap_or_default().as_bytes());
                log.push(b'\n');
            }
            let id = self.repo.blob(&log)?;
            index.add(&entry("events.log", id, log.len()))?;
        }
        let tree_id = index.write_tree_to(&self.repo)?;
        let tree = self.repo.find_tree(tree_id)?;
        let sig = Signature::now("unifleet hub", "hub@unifleet.invalid")?;
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        let oid = self
            .repo
            .commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)?;
        if let Some(tag) = tag {
            let obj = self.repo.find_object(oid, None)?;
            if self
                .repo
                .find_reference(&format!("refs/tags/{tag}"))
                .is_err()
            {
                self.repo.tag_lightweight(tag, &obj, false)?;
            }
        }
        Ok(oid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_build_on_each_other_and_tag() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("s.git")).unwrap();
        let mut c = Change::default();
        c.put("blobs/aa", b"one".to_vec());
        c.event(Event {
            at: 1,
            kind: "publish".into(),
            app: Some("x".into()),
            channel: None,
            release: Some(1),
            device: None,
            detail: "d".into(),
        });
        store.commit("first", &c, Some("x/v1.0.0")).unwrap();
        let mut c = Change::default();
        c.put(release_path("x", "stable", 1, "manifest"), b"m".to_vec());
        store.commit("second", &c, None).unwrap();
        assert_eq!(store.read("blobs/aa").unwrap().unwrap(), b"one");
        assert_eq!(store.releases().unwrap().len(), 1);
        assert_eq!(store.events().unwrap().len(), 1);
        assert!(store.repo.find_reference("refs/tags/x/v1.0.0").is_ok());
    }
}
