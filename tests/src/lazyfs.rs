//! A file system that loses what was not synced, the way a power cut does (after Jepsen's
//! LazyFS): a FUSE pass-through over a backing directory in which file **data** written
//! since the file's last `fsync` lives only in memory; [`Cut::cut`] drops it. Names
//! (create, rename, link, unlink, mkdir) reach the backing directory at once, so this
//! models lost data, not lost directory entries: a renamed file whose data was never
//! synced comes back empty or old, which is what catches a ref or object written without
//! `fsync`.
//!
//! One thread serves the mount (fuser's background session); the tests mount it, run
//! programs on it, kill them, cut, unmount and mount it again over the same directory.

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

/// Nothing cached by the kernel: sizes change under it when data is dropped.
const TTL: Duration = Duration::ZERO;

/// Unsynced contents by backing inode (hard links share one).
type Dirty = Arc<Mutex<HashMap<u64, Vec<u8>>>>;

/// The handle that cuts the power: drops every unsynced byte.
#[derive(Clone, Debug, Default)]
pub struct Cut(Dirty);

impl Cut {
    /// Drops what was written and not synced; returns how many files lost data.
    pub fn cut(&self) -> usize {
        let mut dirty = self.0.lock().expect("not poisoned");
        let n = dirty.len();
        dirty.clear();
        n
    }
}

/// A mounted lazy file system; unmounted when dropped.
#[allow(missing_debug_implementations)]
pub struct Mounted {
    _session: fuser::BackgroundSession,
}

/// Mounts a lazy view of `base` at `at`; `cut` is shared across mounts (a remount after a
/// cut starts with nothing unsynced).
pub fn mount(base: &Path, at: &Path, cut: &Cut) -> std::io::Result<Mounted> {
    let fs = LazyFs {
        base: base.to_path_buf(),
        paths: HashMap::from([(fuser::FUSE_ROOT_ID, PathBuf::new())]),
        dirty: cut.0.clone(),
    };
    let options = [MountOption::FSName("lazyfs".into())];
    let session = fuser::spawn_mount2(fs, at, &options)?;
    Ok(Mounted { _session: session })
}

struct LazyFs {
    base: PathBuf,
    /// FUSE inode (the backing inode, the root excepted) → path under `base`.
    paths: HashMap<u64, PathBuf>,
    dirty: Dirty,
}

/// Answers an operation that returns nothing.
fn answer(reply: ReplyEmpty, done: Result<(), i32>) {
    match done {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn kind(m: &fs::Metadata) -> FileType {
    let t = m.file_type();
    if t.is_dir() {
        FileType::Directory
    } else if t.is_symlink() {
        FileType::Symlink
    } else if std::os::unix::fs::FileTypeExt::is_socket(&t) {
        FileType::Socket
    } else {
        FileType::RegularFile
    }
}

impl LazyFs {
    fn path(&self, ino: u64) -> Result<PathBuf, i32> {
        let rel = self.paths.get(&ino).ok_or(libc::ENOENT)?;
        Ok(self.base.join(rel))
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<(PathBuf, PathBuf), i32> {
        let rel = self.paths.get(&parent).ok_or(libc::ENOENT)?.join(name);
        Ok((self.base.join(&rel), rel))
    }

    /// The attributes of `path` as this file system shows them (unsynced data counted),
    /// remembering its inode's path.
    fn attr(&mut self, path: &Path, rel: Option<PathBuf>) -> Result<FileAttr, i32> {
        let m = fs::symlink_metadata(path).map_err(|e| errno(&e))?;
        let ino = if rel.as_ref().is_some_and(|r| r.as_os_str().is_empty()) {
            fuser::FUSE_ROOT_ID
        } else {
            m.ino()
        };
        if let Some(rel) = rel {
            self.paths.insert(ino, rel);
        }
        let size = match self.dirty.lock().expect("not poisoned").get(&m.ino()) {
            Some(data) => data.len() as u64,
            None => m.len(),
        };
        let time = |s: i64| UNIX_EPOCH + Duration::from_secs(s.max(0) as u64);
        Ok(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: time(m.atime()),
            mtime: time(m.mtime()),
            ctime: time(m.ctime()),
            crtime: time(m.ctime()),
            kind: kind(&m),
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Makes `name` in `parent` with `create` (given its path in the base directory) and
    /// answers with its entry.
    fn make(
        &mut self,
        parent: u64,
        name: &OsStr,
        reply: ReplyEntry,
        create: impl FnOnce(&Path) -> std::io::Result<()>,
    ) {
        let made = self
            .child(parent, name)
            .and_then(|(p, _)| create(&p).map_err(|e| errno(&e)));
        match made {
            Ok(()) => self.entry(parent, name, reply),
            Err(e) => reply.error(e),
        }
    }

    fn entry(&mut self, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match self
            .child(parent, name)
            .and_then(|(p, r)| self.attr(&p, Some(r)))
        {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    /// The file's content in memory from now on (read from the backing file the first
    /// time), changed by `f`.
    fn change(&self, path: &Path, f: impl FnOnce(&mut Vec<u8>)) -> Result<(), i32> {
        let ino = fs::metadata(path).map_err(|e| errno(&e))?.ino();
        let mut dirty = self.dirty.lock().expect("not poisoned");
        let data = match dirty.entry(ino) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(fs::read(path).map_err(|e| errno(&e))?)
            }
        };
        f(data);
        Ok(())
    }

    /// Writes the file's unsynced content to the backing file and syncs it.
    fn sync(&self, path: &Path) -> Result<(), i32> {
        let Ok(m) = fs::metadata(path) else {
            return Ok(());
        };
        let data = self.dirty.lock().expect("not poisoned").remove(&m.ino());
        let Some(data) = data else {
            return Ok(());
        };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(|e| errno(&e))?;
        f.write_all(&data)
            .and_then(|()| f.sync_all())
            .map_err(|e| errno(&e))
    }

    /// After a rename, every remembered path under `from` is under `to`.
    fn moved(&mut self, from: &Path, to: &Path) {
        for rel in self.paths.values_mut() {
            if let Ok(rest) = rel.strip_prefix(from) {
                *rel = to.join(rest);
            }
        }
    }
}

impl Filesystem for LazyFs {
    fn lookup(&mut self, _: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        self.entry(parent, name, reply);
    }

    fn getattr(&mut self, _: &Request<'_>, ino: u64, _: Option<u64>, reply: ReplyAttr) {
        let rel = self.paths.get(&ino).cloned();
        match self.path(ino).and_then(|p| self.attr(&p, rel)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        _: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let done = self.path(ino).and_then(|p| {
            if let Some(mode) = mode {
                fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(|e| errno(&e))?;
            }
            if let Some(size) = size {
                self.change(&p, |d| d.resize(size as usize, 0))?;
            }
            let rel = self.paths.get(&ino).cloned();
            self.attr(&p, rel)
        });
        match done {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&mut self, _: &Request<'_>, ino: u64, reply: ReplyData) {
        match self
            .path(ino)
            .and_then(|p| fs::read_link(p).map_err(|e| errno(&e)))
        {
            Ok(t) => reply.data(t.as_os_str().as_encoded_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &mut self,
        _: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.make(parent, name, reply, |p| {
            fs::create_dir(p)?;
            fs::set_permissions(p, fs::Permissions::from_mode(mode & !umask))
        });
    }

    /// Unix sockets only (`hub serve` binds its control socket in its home): the node is
    /// made in the base directory by binding there; the kernel keeps the socket itself.
    fn mknod(
        &mut self,
        _: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFSOCK {
            return reply.error(libc::ENOSYS);
        }
        self.make(parent, name, reply, |p| {
            std::os::unix::net::UnixListener::bind(p)?;
            fs::set_permissions(p, fs::Permissions::from_mode(mode & 0o7777 & !umask))
        });
    }

    fn unlink(&mut self, _: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let done = self.child(parent, name).and_then(|(p, _)| {
            let m = fs::symlink_metadata(&p).map_err(|e| errno(&e))?;
            fs::remove_file(&p).map_err(|e| errno(&e))?;
            if m.nlink() <= 1 {
                self.dirty.lock().expect("not poisoned").remove(&m.ino());
            }
            Ok(())
        });
        answer(reply, done)
    }

    fn rmdir(&mut self, _: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        answer(
            reply,
            self.child(parent, name)
                .and_then(|(p, _)| fs::remove_dir(p).map_err(|e| errno(&e))),
        )
    }

    fn symlink(
        &mut self,
        _: &Request<'_>,
        parent: u64,
        name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match self
            .child(parent, name)
            .and_then(|(p, _)| std::os::unix::fs::symlink(target, p).map_err(|e| errno(&e)))
        {
            Ok(()) => self.entry(parent, name, reply),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &mut self,
        _: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let done = self.child(parent, name).and_then(|(from, from_rel)| {
            let (to, to_rel) = self.child(newparent, newname)?;
            if flags & libc::RENAME_NOREPLACE != 0 && fs::symlink_metadata(&to).is_ok() {
                return Err(libc::EEXIST);
            }
            if flags & !libc::RENAME_NOREPLACE != 0 {
                return Err(libc::EINVAL);
            }
            fs::rename(&from, &to).map_err(|e| errno(&e))?;
            self.moved(&from_rel, &to_rel);
            Ok(())
        });
        answer(reply, done)
    }

    fn link(
        &mut self,
        _: &Request<'_>,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let done = self.path(ino).and_then(|from| {
            let (to, _) = self.child(newparent, newname)?;
            fs::hard_link(from, to).map_err(|e| errno(&e))
        });
        match done {
            Ok(()) => self.entry(newparent, newname, reply),
            Err(e) => reply.error(e),
        }
    }

    fn open(&mut self, _: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let done = self.path(ino).and_then(|p| {
            if flags & libc::O_TRUNC != 0 {
                self.change(&p, Vec::clear)?;
            }
            Ok(())
        });
        match done {
            Ok(()) => reply.opened(0, 0),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &mut self,
        _: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let made = self.child(parent, name).and_then(|(p, rel)| {
            let mut o = fs::OpenOptions::new();
            o.write(true).mode(mode & !umask);
            if flags & libc::O_EXCL != 0 {
                o.create_new(true);
            } else {
                o.create(true);
            }
            o.open(&p).map_err(|e| errno(&e))?;
            if flags & libc::O_TRUNC != 0 {
                self.change(&p, Vec::clear)?;
            }
            self.attr(&p, Some(rel))
        });
        match made {
            Ok(a) => reply.created(&TTL, &a, 0, 0, 0),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        let read = self.path(ino).and_then(|p| {
            let m = fs::metadata(&p).map_err(|e| errno(&e))?;
            let (at, n) = (offset.max(0) as usize, size as usize);
            if let Some(d) = self.dirty.lock().expect("not poisoned").get(&m.ino()) {
                return Ok(d.get(at..d.len().min(at + n)).unwrap_or(&[]).to_vec());
            }
            let f = fs::File::open(&p).map_err(|e| errno(&e))?;
            let mut buf = vec![0; n];
            let got = f.read_at(&mut buf, at as u64).map_err(|e| errno(&e))?;
            buf.truncate(got);
            Ok(buf)
        });
        match read {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &mut self,
        _: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyWrite,
    ) {
        let at = offset.max(0) as usize;
        let done = self.path(ino).and_then(|p| {
            self.change(&p, |d| {
                if d.len() < at + data.len() {
                    d.resize(at + data.len(), 0);
                }
                d[at..at + data.len()].copy_from_slice(data);
            })
        });
        match done {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&mut self, _: &Request<'_>, _: u64, _: u64, _: u64, reply: ReplyEmpty) {
        reply.ok(); // closing syncs nothing, as on a real disk
    }

    fn fsync(&mut self, _: &Request<'_>, ino: u64, _: u64, _: bool, reply: ReplyEmpty) {
        answer(reply, self.path(ino).and_then(|p| self.sync(&p)))
    }

    fn readdir(
        &mut self,
        _: &Request<'_>,
        ino: u64,
        _: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let listed = self.path(ino).and_then(|p| {
            let mut out = vec![
                (ino, FileType::Directory, ".".into()),
                (ino, FileType::Directory, "..".into()),
            ];
            for e in fs::read_dir(p).map_err(|e| errno(&e))? {
                let e = e.map_err(|e| errno(&e))?;
                let m = e.metadata().map_err(|e| errno(&e))?;
                out.push((m.ino(), kind(&m), e.file_name()));
            }
            Ok(out)
        });
        match listed {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(ino, (i + 1) as i64, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(&mut self, _: &Request<'_>, _: u64, _: u64, _: bool, reply: ReplyEmpty) {
        reply.ok(); // names reach the backing directory at once (see the module doc)
    }

    fn statfs(&mut self, _: &Request<'_>, _: u64, reply: fuser::ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 24, 1 << 24, 1 << 20, 1 << 20, 4096, 255, 4096);
    }

    fn access(&mut self, _: &Request<'_>, _: u64, _: i32, reply: ReplyEmpty) {
        reply.ok();
    }
}
