//! An image read once: its header inspected, FastCDC-chunked and hashed as it streams,
//! each new chunk written to git as it is read, a manifest template made.

use super::*;

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
            bail!(
                "two images for {}: {} and another given before it (image digest {}); give one \
                 image per platform",
                template.platform,
                image.path.display(),
                twin.image_digest
            );
        }
        templates.push(template);
    }
    anyhow::ensure!(!templates.is_empty(), "give an image to publish");
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
        .with_context(|| format!("reading image {}", path.display()))?;
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
            probe: HealthProbe::parse(&args.probe, &args.app, &args.version).context("--probe")?,
            probe_timeout_ms: args.probe_timeout_secs * 1000,
            network: args.network,
        },
        staging: Staging::Skipped,
        created_at: 0,
        previous: None,
        rollout: args.rollout.clone(),
    };
    // What a device would refuse, refused here, before anything is signed or staged.
    Manifest {
        release: 1,
        channel: args.channel.clone(),
        ..template.clone()
    }
    .validate()
    .with_context(|| format!("the release of {} is not valid", path.display()))?;
    Ok(template)
}

/// The image file and its size, refused if it is a directory or above the hub's limit.
fn open(home: &Home, path: &Path) -> Result<(std::fs::File, u64)> {
    let file =
        std::fs::File::open(path).with_context(|| format!("opening image {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading the size of image {}", path.display()))?;
    if meta.is_dir() {
        bail!(
            "{} is a directory; give the path of the image file",
            path.display()
        );
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

fn too_big(home: &Home, path: &Path, size: u64) -> anyhow::Error {
    anyhow::anyhow!(
        "image {} is {size} bytes, above this hub's limit of {} MiB; raise \
         `max_image_mib` in {} if it is meant to be this large",
        path.display(),
        home.config.max_image_mib,
        home.dir.join("hub.toml").display()
    )
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
        .with_context(|| format!("reading image {}", path.display()))?;
    let header = proto::image::inspect(&prefix, len)
        .with_context(|| format!("inspecting {}", path.display()))?;
    let platform = match image.platform {
        None => header.platforms[0],
        Some(p) if header.platforms.contains(&p) => p,
        Some(p) => {
            let can: Vec<&str> = header.platforms.iter().map(|p| p.name()).collect();
            bail!(
                "{}: its header ({}) boots on {}, not on {p}; give it as {}={}",
                path.display(),
                header.format,
                can.join(" or "),
                can[0],
                path.display()
            )
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
        let c = c.with_context(|| format!("reading image {}", path.display()))?;
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
