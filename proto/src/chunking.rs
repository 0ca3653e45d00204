//! Content-defined chunking (FastCDC 2020) and chunk digests.
//!
//! Sizes: **min 16 KiB, average 64 KiB, max 256 KiB.** Why:
//! - Deltas. Unikernel images are a few MiB; a version bump touches a few hundred bytes of
//!   code and data. With a 64 KiB average an unchanged image region re-synchronises within
//!   one or two chunks of an edit, so a small change costs ~1–2 chunks (well under 3% of a
//!   16 MiB image), where 1 MiB chunks would cost whole megabytes.
//! - Overhead. Each chunk is one request to a peer and one ~40-byte manifest entry; at 64 KiB
//!   that is ~0.06% of the image in manifest and a 1 GiB image stays under 1 MiB of
//!   manifest. Smaller averages (8–16 KiB) would multiply requests on slow boards for little
//!   extra dedup.
//! - Bounds. A 256 KiB maximum caps every chunk response on the wire and the memory a
//!   device spends per in-flight chunk; the 16 KiB minimum stops pathological inputs from
//!   producing floods of tiny chunks.

use crate::digest::Digest;
use std::io::Read;

pub const MIN_CHUNK: u32 = 16 * 1024;
pub const AVG_CHUNK: u32 = 64 * 1024;
pub const MAX_CHUNK: u32 = 256 * 1024;

/// One chunk of an image, with its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub digest: Digest,
    pub data: Vec<u8>,
}

/// Chunk boundaries `(offset, length)` of an in-memory buffer.
pub fn boundaries(data: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    fastcdc::v2020::FastCDC::new(data, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
        .map(|c| (c.offset as u64, c.length as u64))
}

/// Splits a stream into chunks without holding more than one maximum-size chunk (plus the
/// chunker's buffer) in memory. The reader is the caller's; this does no I/O of its own.
pub fn chunks<R: Read>(reader: R) -> impl Iterator<Item = std::io::Result<Chunk>> {
    fastcdc::v2020::StreamCDC::new(reader, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK).map(|r| {
        let c = r.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(io) => io,
            other => std::io::Error::other(other.to_string()),
        })?;
        Ok(Chunk {
            offset: c.offset,
            digest: Digest::of(&c.data),
            data: c.data,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_and_in_memory_agree() {
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let streamed: Vec<(u64, u64)> = chunks(&data[..])
            .map(|c| c.map(|c| (c.offset, c.data.len() as u64)).unwrap())
            .collect();
        let mem: Vec<(u64, u64)> = boundaries(&data).collect();
        assert_eq!(streamed, mem);
        assert_eq!(mem.iter().map(|(_, l)| l).sum::<u64>(), data.len() as u64);
        assert!(mem.iter().all(|(_, l)| *l <= u64::from(MAX_CHUNK)));
    }
}
