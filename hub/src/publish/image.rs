//! An image read once: its header inspected, FastCDC-chunked and hashed as it streams,
//! each new chunk written to git as it is read, a manifest template made.

use super::*;
use std::path::PathBuf;

/// Why an image could not be read into a release.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("opening image {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the size of image {}", path.display())]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is a directory; give the path of the image file", .0.display())]
    Directory(PathBuf),
    #[error("{} is {what}, not an image file; give the path of a file", path.display())]
    NotAFile { path: PathBuf, what: &'static str },
    #[error(
        "image {} is {size} bytes, above this hub's limit of {limit_mib} MiB; raise \
         `max_image_mib` in {} if it is meant to be this large",
        path.display(),
        config.display()
    )]
    TooBig {
        path: PathBuf,
        size: u64,
        limit_mib: u64,
        config: PathBuf,
    },
    #[error("reading image {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("inspecting {}", path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: proto::image::ImageError,
    },
    #[error(
        "{}: its header ({format}) boots on {can}, not on {asked}; give it as {first}={}",
        path.display(),
        path.display()
    )]
    WrongPlatform {
        path: PathBuf,
        format: String,
        /// `qemu-x86_64 or xen-x86_64`: where it boots, the best first.
        can: String,
        first: Platform,
        asked: Platform,
    },
    #[error("--probe")]
    Probe(#[source] proto::manifest::BadProbe),
    #[error("the release of {} is not valid", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: Box<proto::VerifyError>,
    },
    #[error(
        "two images for {platform}: {} and another given before it (image digest {twin}); \
         give one image per platform",
        path.display()
    )]
    TwoImages {
        platform: Platform,
        path: PathBuf,
        twin: Digest,
    },
    #[error("give an image to publish")]
    None,
    /// Looking up or writing a chunk.
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Inspects and chunks each image, streaming: each new chunk goes to the git object
/// database as it is read, so memory stays constant whatever an image's size, and a chunk
/// the images share is stored once. Returns one unsigned manifest template per image and
/// the change naming their chunks.
pub(super) fn prepare(
    home: &Home,
    store: &Store,
    images: &[Image],
    args: &PublishArgs,
    progress: Progress<'_>,
) -> Result<(Vec<Manifest>, Change)> {
    let mut chunked = Chunked::default();
    let mut templates: Vec<Manifest> = vec![];
    for image in images {
        let template = prepare_one(home, store, image, args, &mut chunked, progress)?;
        if let Some(twin) = templates.iter().find(|t| t.platform == template.platform) {
            return Err(ImageError::TwoImages {
                platform: template.platform,
                path: image.path.clone(),
                twin: twin.image_digest,
            });
        }
        templates.push(template);
    }
    if templates.is_empty() {
        return Err(ImageError::None);
    }
    Ok((templates, chunked.change))
}

/// The chunks new to the store, across the images of one publish.
#[derive(Default)]
pub(super) struct Chunked {
    change: Change,
    seen: HashSet<Digest>,
}

fn prepare_one(
    home: &Home,
    store: &Store,
    image: &Image,
    args: &PublishArgs,
    chunked: &mut Chunked,
    progress: Progress<'_>,
) -> Result<Manifest> {
    let path = &image.path;
    let (mut file, len) = open(home, path)?;
    let platform = platform(&mut file, len, image, progress)?;
    file.seek(SeekFrom::Start(0))
        .map_err(|source| read_error(path, source))?;
    let streamed = stream(home, store, file, path, len, chunked, progress)?;
    let template = Manifest {
        fleet: home.config.fleet.clone(),
        app: args.app.clone(),
        version: args.version.clone(),
        release: 0,
        channel: String::new(),
        platform,
        image_digest: streamed.digest,
        image_size: streamed.size,
        chunks: streamed.chunks,
        boot: BootSpec {
            memory_mib: args.memory_mib,
            vcpus: args.vcpus,
            cmdline: args.cmdline.clone(),
            probe: HealthProbe::parse(&args.probe, &args.app, &args.version)
                .map_err(ImageError::Probe)?,
            probe_timeout_ms: args.probe_timeout_secs * 1000,
            network: args.network,
        },
        staging: Staging::Skipped,
        created_at: 0,
        previous: None,
        rollout: args.rollout.clone(),
        provenance: args.from_source.as_ref().map(|s| s.provenance.clone()),
    };
    // What a device would refuse, refused here, before anything is signed or staged.
    Manifest {
        release: 1,
        channel: args.channel.clone(),
        ..template.clone()
    }
    .validate()
    .map_err(|e| ImageError::Invalid {
        path: path.clone(),
        source: Box::new(e),
    })?;
    Ok(template)
}

fn read_error(path: &Path, source: std::io::Error) -> ImageError {
    ImageError::Read {
        path: path.into(),
        source,
    }
}

/// The image file and its size, refused if it is a directory or above the hub's limit.
fn open(home: &Home, path: &Path) -> Result<(std::fs::File, u64)> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    // Non-blocking: opening a named pipe nobody writes to would wait forever; its type
    // is refused below, before anything is read.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| ImageError::Open {
            path: path.into(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| ImageError::Size {
        path: path.into(),
        source,
    })?;
    let kind = meta.file_type();
    if kind.is_dir() {
        return Err(ImageError::Directory(path.into()));
    }
    let what = match () {
        _ if kind.is_fifo() => Some("a named pipe"),
        _ if kind.is_char_device() => Some("a character device"),
        _ if kind.is_block_device() => Some("a block device"),
        _ if kind.is_socket() => Some("a socket"),
        _ => None,
    };
    if let Some(what) = what {
        return Err(ImageError::NotAFile {
            path: path.into(),
            what,
        });
    }
    if meta.len() > limit(home) {
        return Err(too_big(home, path, meta.len()));
    }
    Ok((file, meta.len()))
}

/// The largest image this hub takes (`max_image_mib`).
fn limit(home: &Home) -> u64 {
    home.config.max_image_mib.saturating_mul(MIB)
}

fn too_big(home: &Home, path: &Path, size: u64) -> ImageError {
    ImageError::TooBig {
        path: path.into(),
        size,
        limit_mib: home.config.max_image_mib,
        config: home.dir.join("hub.toml"),
    }
}

/// The platform the image's header boots on: the one given, if it can, else the first.
fn platform(
    file: &mut std::fs::File,
    len: u64,
    image: &Image,
    progress: Progress<'_>,
) -> Result<Platform> {
    let path = &image.path;
    let mut prefix = Vec::new();
    file.take(proto::image::INSPECT_PREFIX as u64)
        .read_to_end(&mut prefix)
        .map_err(|source| read_error(path, source))?;
    let header = proto::image::inspect(&prefix, len).map_err(|source| ImageError::Inspect {
        path: path.clone(),
        source,
    })?;
    let platform = match image.platform {
        None => header.platforms[0],
        Some(p) if header.platforms.contains(&p) => p,
        Some(asked) => {
            let can: Vec<&str> = header.platforms.iter().map(|p| p.name()).collect();
            return Err(ImageError::WrongPlatform {
                path: path.clone(),
                format: header.format.clone(),
                can: can.join(" or "),
                first: header.platforms[0],
                asked,
            });
        }
    };
    progress(&format!(
        "inspected {}: {} for {platform}",
        path.display(),
        header.format
    ));
    Ok(platform)
}

/// An image chunked: its chunk list, digest and size.
struct Streamed {
    chunks: Vec<ChunkRef>,
    digest: Digest,
    size: u64,
}

/// Chunks and hashes the image as it is read, writing each chunk new to the store (and
/// to this publish) to git at once: no image is held in memory.
fn stream(
    home: &Home,
    store: &Store,
    file: std::fs::File,
    path: &Path,
    len: u64,
    chunked: &mut Chunked,
    progress: Progress<'_>,
) -> Result<Streamed> {
    let mut chunks = vec![];
    let mut distinct = HashSet::new();
    let mut hasher = proto::digest::Hasher::new();
    let (mut size, mut new_bytes, mut reported) = (0u64, 0u64, 0u64);
    for c in proto::chunking::chunks(BufReader::with_capacity(1 << 20, file)) {
        let c = c.map_err(|source| read_error(path, source))?;
        hasher.update(&c.data);
        size += c.data.len() as u64;
        if size > limit(home) {
            return Err(too_big(home, path, size));
        }
        chunks.push(ChunkRef {
            digest: c.digest,
            size: c.data.len() as u64,
        });
        distinct.insert(c.digest);
        // A chunk repeated inside the image, or shared with another image of this
        // release, is stored and counted once.
        if chunked.seen.insert(c.digest) && !store.has_blob(&c.digest)? {
            new_bytes += c.data.len() as u64;
            let blob = store.write_blob(&c.data)?;
            chunked
                .change
                .put_written(format!("blobs/{}", c.digest.to_hex()), blob);
        }
        if size - reported >= PROGRESS_EVERY {
            reported = size;
            progress(&format!(
                "chunking: {} MiB of {} MiB",
                size / MIB,
                len / MIB
            ));
        }
    }
    progress(&format!(
        "chunked {size} bytes into {} chunks ({} distinct, {new_bytes} bytes new)",
        chunks.len(),
        distinct.len()
    ));
    Ok(Streamed {
        chunks,
        digest: hasher.finalize(),
        size,
    })
}
