//! Writing the store: blobs ahead of their commit, commits built in memory (only the
//! trees on the way to a changed file written again) under the writer lock, stale ref
//! locks swept, and `git gc --auto`.

use super::*;

impl Store {
    /// Writes `bytes` to the object database now; name it in a [`Change`] with
    /// [`Change::put_written`].
    pub fn write_blob(&self, bytes: &[u8]) -> Result<WrittenBlob> {
        let id = self
            .repo
            .blob(bytes)
            .map_err(|source| StoreError::WriteBlob {
                path: self.repo.path().to_path_buf(),
                source,
            })?;
        Ok(WrittenBlob { id })
    }

    /// Commits `change` on top of HEAD (see [`Store::transaction`]).
    pub fn commit(&self, message: &str, change: &Change, tag: Option<&str>) -> Result<()> {
        self.transaction(|_| -> Result<_> {
            Ok((
                Commit {
                    message: message.into(),
                    change: change.clone(),
                    tag: tag.map(str::to_string),
                },
                (),
            ))
        })
    }

    /// Reads and commits as one transaction: `build` sees the store at HEAD with the
    /// writer lock held and returns what to commit on top of it, so what it read (the
    /// newest release number, say) is still true when the commit lands. `build` runs again
    /// if another git tool moved HEAD meanwhile.
    ///
    /// Writers are serialised by an advisory lock on [`WRITER_LOCK`] in the git directory
    /// (`hub serve` recording a device's report and `hub publish` in another process may
    /// commit at the same moment); the kernel drops it when a writer dies, so a crashed hub
    /// never blocks the next one. A git ref lock (`refs/heads/master.lock`) that a writer
    /// killed mid-update left behind is removed once it is older than [`STALE_REF_LOCK`].
    /// Conflicts with other git tools on the repository (HEAD moved, ref locked) are retried
    /// with backoff.
    ///
    /// `build`'s own errors are the caller's (`E`), and so are the store's, converted.
    pub fn transaction<T, E: From<StoreError>>(
        &self,
        mut build: impl FnMut(&Store) -> Result<(Commit, T), E>,
    ) -> Result<T, E> {
        let _writer = self.writer_lock()?;
        let mut backoff = Duration::from_millis(5);
        let mut swept = false;
        let mut message = String::new();
        for _ in 0..COMMIT_ATTEMPTS {
            let (commit, out) = build(self)?;
            if commit.change.is_empty() && commit.tag.is_none() {
                return Ok(out);
            }
            message = commit.message;
            match self.try_commit(&message, &commit.change, commit.tag.as_deref()) {
                Ok(_) => return Ok(out),
                Err(e)
                    if e.code() == git2::ErrorCode::Modified
                        || e.code() == git2::ErrorCode::Locked
                        || e.message().contains("current tip") =>
                {
                    if e.code() == git2::ErrorCode::Locked && !swept {
                        swept = true;
                        self.remove_stale_ref_locks();
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(source) => {
                    return Err(StoreError::Commit {
                        path: self.repo.path().to_path_buf(),
                        source,
                    }
                    .into())
                }
            }
        }
        Err(StoreError::Contended {
            message,
            path: self.repo.path().to_path_buf(),
            attempts: COMMIT_ATTEMPTS,
        }
        .into())
    }

    /// Packs loose objects once there are many (`git gc --auto`, git's own threshold, 6,700
    /// by default), with the writer lock held so no hub commit races it. Every commit adds
    /// loose objects (device events once a second under load); unpacked, a store that runs
    /// for years fills the disk with small files. Needs the `git` program; returns whether
    /// it ran.
    pub fn gc(&self) -> Result<bool> {
        let _writer = self.writer_lock()?;
        let out = match std::process::Command::new("git")
            .arg("--git-dir")
            .arg(self.repo.path())
            // In the foreground: the writer lock is held for exactly its run.
            .args(["-c", "gc.autoDetach=false", "gc", "--auto", "--quiet"])
            .output()
        {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(
                    "git is not installed: the store's objects are not packed (install git)"
                );
                return Ok(false);
            }
            Err(e) => return Err(StoreError::GcSpawn(e)),
        };
        if !out.status.success() {
            return Err(StoreError::Gc {
                path: self.repo.path().to_path_buf(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(true)
    }

    /// The writer lock, held until the returned file is dropped.
    pub(crate) fn writer_lock(&self) -> Result<std::fs::File> {
        let lock_path = self.repo.path().join(WRITER_LOCK);
        let writer = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| StoreError::OpenLock {
                path: lock_path.clone(),
                source,
            })?;
        let taken = match writer.try_lock() {
            Ok(()) => Ok(()),
            Err(std::fs::TryLockError::WouldBlock) => {
                tracing::info!(
                    "waiting for another hub process committing to {}",
                    self.repo.path().display()
                );
                writer.lock()
            }
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        };
        taken.map_err(|source| StoreError::TakeLock {
            path: lock_path,
            source,
        })?;
        Ok(writer)
    }

    /// Removes ref lock files (`HEAD.lock`, `packed-refs.lock`, `refs/**.lock`) older than
    /// [`STALE_REF_LOCK`]. Called with the writer lock held, so no hub writer owns them; git
    /// holds a ref lock for milliseconds, so an old one was left by a killed process. Only
    /// when a commit found a ref locked: the walk of `refs/` is not for every commit.
    fn remove_stale_ref_locks(&self) {
        let git = self.repo.path();
        let mut found = Vec::new();
        let mut dirs = vec![git.join("refs")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "lock") {
                    found.push(path);
                }
            }
        }
        found.extend([git.join("HEAD.lock"), git.join("packed-refs.lock")]);
        for path in found {
            let age = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if age.is_some_and(|a| a >= STALE_REF_LOCK) && std::fs::remove_file(&path).is_ok() {
                tracing::warn!(
                    "removed {}: a git ref lock {}s old, left by a writer that was killed",
                    path.display(),
                    age.unwrap_or_default().as_secs()
                );
            }
        }
    }

    /// `base` with `files` (paths under it) put in: only the trees on the way to a changed
    /// file are written again, so a commit costs what it changes, not the size of the
    /// store (reading the whole tree into an index and writing it back cost ~50 ms per
    /// commit with 10,000 releases).
    /// A file whose id is `None` is removed (a directory left empty goes with it).
    fn write_tree(
        &self,
        base: Option<&git2::Tree<'_>>,
        files: &[(&str, Option<Oid>)],
    ) -> Result<Oid, git2::Error> {
        let mut builder = self.repo.treebuilder(base)?;
        let mut dirs: std::collections::BTreeMap<&str, Vec<(&str, Option<Oid>)>> =
            Default::default();
        for &(path, id) in files {
            match (path.split_once('/'), id) {
                (Some((dir, rest)), _) => dirs.entry(dir).or_default().push((rest, id)),
                (None, Some(id)) => {
                    builder.insert(path, id, 0o100644)?;
                }
                (None, None) => {
                    if builder.get(path)?.is_some() {
                        builder.remove(path)?;
                    }
                }
            }
        }
        for (dir, inner) in dirs {
            let sub = match base.and_then(|t| t.get_name(dir)) {
                Some(e) if e.kind() == Some(git2::ObjectType::Tree) => {
                    Some(self.repo.find_tree(e.id())?)
                }
                _ => None,
            };
            let removes = inner.iter().any(|(_, id)| id.is_none());
            let id = self.write_tree(sub.as_ref(), &inner)?;
            // Only a removal can leave a directory empty: no extra read on other commits.
            if removes && self.repo.find_tree(id)?.is_empty() {
                if builder.get(dir)?.is_some() {
                    builder.remove(dir)?;
                }
            } else {
                builder.insert(dir, id, 0o040000)?;
            }
        }
        builder.write()
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
        let parent_tree = parent.as_ref().map(|p| p.tree()).transpose()?;
        let mut files: Vec<(&str, Option<Oid>)> = Vec::with_capacity(change.files.len() + 1);
        for (path, content) in &change.files {
            let id = match content {
                Content::Bytes(bytes) => Some(self.repo.blob(bytes)?),
                Content::Written(id) => Some(*id),
                Content::Removed => None,
            };
            files.push((path, id));
        }
        let mut days: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
        for e in &change.events {
            let day = days.entry(event_file(e.at)).or_default();
            day.extend_from_slice(serde_json::to_string(e).unwrap_or_default().as_bytes());
            day.push(b'\n');
        }
        for (path, new) in &days {
            let mut log = parent_tree
                .as_ref()
                .and_then(|t| t.get_path(Path::new(path)).ok())
                .and_then(|e| self.repo.find_blob(e.id()).ok())
                .map(|b| b.content().to_vec())
                .unwrap_or_default();
            log.extend_from_slice(new);
            files.push((path, Some(self.repo.blob(&log)?)));
        }
        let tree_id = self.write_tree(parent_tree.as_ref(), &files)?;
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
