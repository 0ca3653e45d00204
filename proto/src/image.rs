//! Recognising unikernel images by their headers.
//!
//! Only the first [`INSPECT_PREFIX`] bytes are examined, with the file's size beside them:
//! every range a header declares (ELF program and section headers and segments, the
//! multiboot load range, zImage start/end) must lie inside the file, so a truncated image
//! is refused here rather than failing to boot on every device. Nothing here trusts an
//! offset or a count from the header without checking it against the bytes actually
//! present, so any input yields a result or an [`ImageError`], never a panic.

use crate::manifest::Platform;
use serde::Serialize;

/// How many leading bytes of an image [`inspect`] looks at.
pub const INSPECT_PREFIX: usize = 64 * 1024;

const MULTIBOOT_MAGIC: u32 = 0x1BAD_B002;
const MULTIBOOT_SEARCH: usize = 8192;
const ZIMAGE_MAGIC_OFFSET: usize = 0x24;
const ZIMAGE_MAGIC: u32 = 0x016F_2818;
const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// What an image header says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImageHeader {
    /// e.g. `ELF32 i386`, `ARM zImage`.
    pub format: String,
    /// Platforms this image can boot on, best match first. Never empty.
    pub platforms: Vec<Platform>,
    pub entry: Option<u64>,
    /// Human-readable facts (multiboot flags, PVH entry, …).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("image is empty")]
    Empty,
    #[error("unrecognised image: {0}")]
    Unknown(Unrecognised),
    #[error("corrupt {format} header: {reason}")]
    Corrupt {
        format: &'static str,
        reason: Corruption,
    },
    /// A range the header declares ends past the end of the file: a truncated image.
    #[error(
        "{format} {what} needs bytes up to {end}, but the file has {file_size}: \
         the image is truncated or not what its header says"
    )]
    Truncated {
        format: &'static str,
        what: Region,
        end: u64,
        file_size: u64,
    },
}

/// A range of an image file its header declares (see [`ImageError::Truncated`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// The arm64 Image's 64-byte header.
    Arm64Header,
    /// A zImage from its declared start to its declared end.
    ZImage {
        start: u32,
        end: u32,
    },
    ProgramHeaders {
        count: u16,
        offset: u64,
    },
    SectionHeaders {
        count: u16,
        offset: u64,
    },
    Segment {
        index: u64,
        len: u64,
        offset: u64,
    },
    /// What a multiboot header says to load.
    LoadRange {
        start: u32,
        end: u32,
    },
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Region::Arm64Header => f.write_str("64-byte header"),
            Region::ZImage { start, end } => {
                write!(f, "image (start 0x{start:x}, end 0x{end:x})")
            }
            Region::ProgramHeaders { count, offset } => {
                write!(f, "program header table ({count} entries at 0x{offset:x})")
            }
            Region::SectionHeaders { count, offset } => {
                write!(f, "section header table ({count} entries at 0x{offset:x})")
            }
            Region::Segment { index, len, offset } => {
                write!(f, "segment {index} (0x{len:x} bytes at 0x{offset:x})")
            }
            Region::LoadRange { start, end } => write!(f, "load range 0x{start:x}..0x{end:x}"),
        }
    }
}

/// Why bytes are not an image unifleet can boot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unrecognised {
    #[error("this is a unifleet message, not an image")]
    UnifleetMessage,
    #[error("no ELF, multiboot, ARM zImage or arm64 Image header found")]
    NoHeader,
    #[error("big-endian ELF is not supported")]
    BigEndianElf,
    #[error("{format} has neither a multiboot header nor a Xen PVH note")]
    NoBootEntry { format: String },
}

/// What is wrong in a header that was recognised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    #[error("truncated identification")]
    TruncatedIdentification,
    #[error("invalid ELF class {0}")]
    ElfClass(u8),
    #[error("truncated header")]
    TruncatedHeader,
    #[error("program header entries too small")]
    ProgramHeaderTooSmall,
    #[error("program header offset overflows")]
    ProgramHeaderOverflow,
    #[error("big-endian images are not supported")]
    BigEndian,
    #[error("end 0x{end:x} is below start 0x{start:x}")]
    EndBelowStart { end: u32, start: u32 },
    #[error("truncated address fields")]
    TruncatedAddresses,
    #[error("load address 0x{load:x} is above the header's 0x{header:x}")]
    LoadAboveHeader { load: u32, header: u32 },
    #[error("load address 0x{load:x} lies before the start of the file")]
    LoadBeforeFile { load: u32 },
    #[error("load end 0x{end:x} is below the load address 0x{load:x}")]
    LoadEndBelowLoad { end: u32, load: u32 },
}

/// Identifies an image from its first bytes and the size of the whole file (pass at least
/// [`INSPECT_PREFIX`] bytes when the file is that large).
pub fn inspect(prefix: &[u8], file_size: u64) -> Result<ImageHeader, ImageError> {
    if prefix.is_empty() || file_size == 0 {
        return Err(ImageError::Empty);
    }
    // The bytes at hand exist, whatever the caller said.
    let file_size = file_size.max(prefix.len() as u64);
    if prefix.starts_with(b"\x7fELF") {
        return inspect_elf(prefix, file_size);
    }
    if read_u32(prefix, ZIMAGE_MAGIC_OFFSET) == Some(ZIMAGE_MAGIC) {
        return inspect_zimage(prefix, file_size);
    }
    if prefix.get(ARM64_MAGIC_OFFSET..ARM64_MAGIC_OFFSET + 4) == Some(ARM64_MAGIC.as_slice()) {
        return inspect_arm64(prefix, file_size);
    }
    if prefix.starts_with(crate::codec::MAGIC.as_slice()) {
        return Err(ImageError::Unknown(Unrecognised::UnifleetMessage));
    }
    Err(ImageError::Unknown(Unrecognised::NoHeader))
}

fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off.checked_add(4)?)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

fn read_u16(b: &[u8], off: usize) -> Option<u16> {
    b.get(off..off.checked_add(2)?)
        .map(|s| u16::from_le_bytes(s.try_into().expect("2 bytes")))
}

fn read_u64(b: &[u8], off: usize) -> Option<u64> {
    b.get(off..off.checked_add(8)?)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

/// Refuses a declared range `start..start+len` that does not lie inside the file.
fn within(
    format: &'static str,
    what: Region,
    start: u64,
    len: u64,
    file_size: u64,
) -> Result<(), ImageError> {
    match start.checked_add(len) {
        Some(end) if end <= file_size => Ok(()),
        end => Err(ImageError::Truncated {
            format,
            what,
            end: end.unwrap_or(u64::MAX),
            file_size,
        }),
    }
}

/// Where an arm64 Linux-style `Image` keeps its magic, and the magic.
const ARM64_MAGIC_OFFSET: usize = 56;
const ARM64_MAGIC: [u8; 4] = *b"ARM\x64";
/// The arm64 Image header's length.
const ARM64_HEADER: u64 = 64;

/// arm64 Image (Linux's boot protocol): a 64-byte header (branch, text offset, image
/// size, flags, magic) in front of position-independent code. The image size may count
/// memory beyond the file (bss), so it bounds nothing; the header must be whole.
fn inspect_arm64(b: &[u8], file_size: u64) -> Result<ImageHeader, ImageError> {
    within(
        "arm64 Image",
        Region::Arm64Header,
        0,
        ARM64_HEADER,
        file_size,
    )?;
    let (Some(text_offset), Some(image_size), Some(flags)) =
        (read_u64(b, 8), read_u64(b, 16), read_u64(b, 24))
    else {
        return Err(ImageError::Corrupt {
            format: "arm64 Image",
            reason: Corruption::TruncatedHeader,
        });
    };
    if flags & 1 != 0 {
        return Err(ImageError::Corrupt {
            format: "arm64 Image",
            reason: Corruption::BigEndian,
        });
    }
    Ok(ImageHeader {
        format: "arm64 Image".into(),
        platforms: vec![Platform::QemuAarch64],
        entry: None,
        notes: vec![format!(
            "text offset 0x{text_offset:x}, image size {image_size} bytes, flags 0x{flags:x}"
        )],
    })
}

/// ARM zImage: the words at 0x28/0x2c are the image's start and end, so `end - start` is
/// its length.
fn inspect_zimage(b: &[u8], file_size: u64) -> Result<ImageHeader, ImageError> {
    let (Some(start), Some(end)) = (read_u32(b, 0x28), read_u32(b, 0x2c)) else {
        return Err(ImageError::Corrupt {
            format: "ARM zImage",
            reason: Corruption::TruncatedHeader,
        });
    };
    if end < start {
        return Err(ImageError::Corrupt {
            format: "ARM zImage",
            reason: Corruption::EndBelowStart { end, start },
        });
    }
    within(
        "ARM zImage",
        Region::ZImage { start, end },
        0,
        u64::from(end - start),
        file_size,
    )?;
    Ok(ImageHeader {
        format: "ARM zImage".into(),
        platforms: vec![Platform::XenArm32],
        entry: None,
        notes: vec![format!("zImage start/end 0x{start:x}/0x{end:x}")],
    })
}

fn inspect_elf(b: &[u8], file_size: u64) -> Result<ImageHeader, ImageError> {
    let corrupt = |reason: Corruption| ImageError::Corrupt {
        format: "ELF",
        reason,
    };
    let class = *b
        .get(4)
        .ok_or_else(|| corrupt(Corruption::TruncatedIdentification))?;
    let data = *b
        .get(5)
        .ok_or_else(|| corrupt(Corruption::TruncatedIdentification))?;
    if data != 1 {
        return Err(ImageError::Unknown(Unrecognised::BigEndianElf));
    }
    let is64 = match class {
        1 => false,
        2 => true,
        c => return Err(corrupt(Corruption::ElfClass(c))),
    };
    let machine = read_u16(b, 18).ok_or_else(|| corrupt(Corruption::TruncatedHeader))?;
    let (entry, phoff, phentsize, phnum) = if is64 {
        (
            read_u64(b, 24),
            read_u64(b, 32),
            read_u16(b, 54),
            read_u16(b, 56),
        )
    } else {
        (
            read_u32(b, 24).map(u64::from),
            read_u32(b, 28).map(u64::from),
            read_u16(b, 42),
            read_u16(b, 44),
        )
    };
    let (shoff, shentsize, shnum) = if is64 {
        (read_u64(b, 40), read_u16(b, 58), read_u16(b, 60))
    } else {
        (
            read_u32(b, 32).map(u64::from),
            read_u16(b, 46),
            read_u16(b, 48),
        )
    };
    let (Some(entry), Some(phoff), Some(phentsize), Some(phnum)) = (entry, phoff, phentsize, phnum)
    else {
        return Err(corrupt(Corruption::TruncatedHeader));
    };
    let (Some(shoff), Some(shentsize), Some(shnum)) = (shoff, shentsize, shnum) else {
        return Err(corrupt(Corruption::TruncatedHeader));
    };
    within(
        "ELF",
        Region::ProgramHeaders {
            count: phnum,
            offset: phoff,
        },
        phoff,
        u64::from(phnum) * u64::from(phentsize),
        file_size,
    )?;
    if shoff != 0 {
        within(
            "ELF",
            Region::SectionHeaders {
                count: shnum,
                offset: shoff,
            },
            shoff,
            u64::from(shnum) * u64::from(shentsize),
            file_size,
        )?;
    }
    let arch = match machine {
        3 => "i386",
        0x3E => "x86_64",
        0x28 => "arm",
        0xB7 => "aarch64",
        _ => "unknown machine",
    };
    let mut header = ImageHeader {
        format: format!("ELF{} {arch}", if is64 { 64 } else { 32 }),
        platforms: vec![],
        entry: Some(entry),
        notes: vec![],
    };

    // Xen PVH: a PT_NOTE segment holding a "Xen" note of type PHYS32_ENTRY.
    let min_phentsize = if is64 { 56 } else { 32 };
    if phnum > 0 && usize::from(phentsize) < min_phentsize {
        return Err(corrupt(Corruption::ProgramHeaderTooSmall));
    }
    for i in 0..u64::from(phnum) {
        let Some(off) = phoff
            .checked_add(i * u64::from(phentsize))
            .and_then(|o| usize::try_from(o).ok())
        else {
            return Err(corrupt(Corruption::ProgramHeaderOverflow));
        };
        let (p_type, p_offset, p_filesz) = if is64 {
            (
                read_u32(b, off),
                read_u64(b, off + 8),
                read_u64(b, off + 32),
            )
        } else {
            (
                read_u32(b, off),
                read_u32(b, off + 4).map(u64::from),
                read_u32(b, off + 16).map(u64::from),
            )
        };
        let (Some(p_type), Some(p_offset), Some(p_filesz)) = (p_type, p_offset, p_filesz) else {
            // Program headers beyond the inspected prefix: nothing more to learn.
            break;
        };
        within(
            "ELF",
            Region::Segment {
                index: i,
                len: p_filesz,
                offset: p_offset,
            },
            p_offset,
            p_filesz,
            file_size,
        )?;
        if p_type == PT_NOTE {
            if let Some(pvh_entry) = find_pvh_note(b, p_offset, p_filesz) {
                header.notes.push(format!("Xen PVH entry 0x{pvh_entry:x}"));
                header.platforms.push(Platform::XenX86_64Pvh);
            }
        }
    }

    // Multiboot: magic, flags, checksum (summing to zero) 4-aligned in the first 8 KiB.
    let search = &b[..b.len().min(MULTIBOOT_SEARCH)];
    for off in (0..search.len().saturating_sub(11)).step_by(4) {
        let (Some(magic), Some(flags), Some(sum)) = (
            read_u32(search, off),
            read_u32(search, off + 4),
            read_u32(search, off + 8),
        ) else {
            break;
        };
        if magic == MULTIBOOT_MAGIC && magic.wrapping_add(flags).wrapping_add(sum) == 0 {
            check_multiboot_load(search, off, flags, file_size)?;
            header
                .notes
                .push(format!("multiboot header at 0x{off:x}, flags 0x{flags:x}"));
            if machine == 3 || machine == 0x3E {
                header.platforms.push(Platform::QemuX86_64);
            }
            break;
        }
    }

    if header.platforms.is_empty() {
        return Err(ImageError::Unknown(Unrecognised::NoBootEntry {
            format: header.format,
        }));
    }
    Ok(header)
}

/// Multiboot's address fields (flags bit 16, the "a.out kludge"): the loader copies the
/// file from `load_addr`'s offset up to `load_end_addr` (0: to the end of the file), so
/// that range must be in the file.
fn check_multiboot_load(
    b: &[u8],
    off: usize,
    flags: u32,
    file_size: u64,
) -> Result<(), ImageError> {
    const ADDRESS_FIELDS: u32 = 1 << 16;
    if flags & ADDRESS_FIELDS == 0 {
        return Ok(());
    }
    let corrupt = |reason: Corruption| ImageError::Corrupt {
        format: "multiboot",
        reason,
    };
    let (Some(header_addr), Some(load_addr), Some(load_end)) = (
        read_u32(b, off + 12),
        read_u32(b, off + 16),
        read_u32(b, off + 20),
    ) else {
        return Err(corrupt(Corruption::TruncatedAddresses));
    };
    let Some(back) = header_addr.checked_sub(load_addr) else {
        return Err(corrupt(Corruption::LoadAboveHeader {
            load: load_addr,
            header: header_addr,
        }));
    };
    let Some(start) = (off as u64).checked_sub(u64::from(back)) else {
        return Err(corrupt(Corruption::LoadBeforeFile { load: load_addr }));
    };
    if load_end == 0 {
        return Ok(());
    }
    let Some(len) = load_end.checked_sub(load_addr) else {
        return Err(corrupt(Corruption::LoadEndBelowLoad {
            end: load_end,
            load: load_addr,
        }));
    };
    within(
        "multiboot",
        Region::LoadRange {
            start: load_addr,
            end: load_end,
        },
        start,
        u64::from(len),
        file_size,
    )
}

fn find_pvh_note(b: &[u8], offset: u64, size: u64) -> Option<u64> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(size).ok()?)?;
    let notes = b.get(start..end.min(b.len()))?;
    let mut pos = 0usize;
    while pos + 12 <= notes.len() {
        let namesz = read_u32(notes, pos)? as usize;
        let descsz = read_u32(notes, pos + 4)? as usize;
        let ntype = read_u32(notes, pos + 8)?;
        let name_start = pos + 12;
        let desc_start = name_start.checked_add(namesz.checked_add(3)? & !3)?;
        let next = desc_start.checked_add(descsz.checked_add(3)? & !3)?;
        let name = notes.get(name_start..name_start.checked_add(namesz)?)?;
        if name == b"Xen\0" && ntype == XEN_ELFNOTE_PHYS32_ENTRY {
            let desc = notes.get(desc_start..desc_start.checked_add(descsz)?)?;
            return match descsz {
                4 => read_u32(desc, 0).map(u64::from),
                8 => read_u64(desc, 0),
                _ => None,
            };
        }
        pos = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF32 i386 image: header, one LOAD segment over the whole file, a
    /// multiboot header at 0x54 (`flags`), padded to `len` bytes.
    fn elf(len: usize, flags: u32, address_fields: [u32; 3]) -> Vec<u8> {
        let mut b = vec![0u8; len.max(0x80)];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 1; // 32-bit
        b[5] = 1; // little-endian
        b[18..20].copy_from_slice(&3u16.to_le_bytes()); // i386
        b[24..28].copy_from_slice(&0x10_0000u32.to_le_bytes()); // entry
        b[28..32].copy_from_slice(&0x34u32.to_le_bytes()); // phoff
        b[42..44].copy_from_slice(&32u16.to_le_bytes()); // phentsize
        b[44..46].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = 0x34;
        b[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        b[ph + 16..ph + 20].copy_from_slice(&(len as u32).to_le_bytes()); // filesz
        let mb = 0x54;
        b[mb..mb + 4].copy_from_slice(&MULTIBOOT_MAGIC.to_le_bytes());
        b[mb + 4..mb + 8].copy_from_slice(&flags.to_le_bytes());
        let sum = 0u32.wrapping_sub(MULTIBOOT_MAGIC).wrapping_sub(flags);
        b[mb + 8..mb + 12].copy_from_slice(&sum.to_le_bytes());
        for (i, v) in address_fields.iter().enumerate() {
            let at = mb + 12 + 4 * i;
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        b.truncate(len.max(0x80));
        b
    }

    #[test]
    fn a_whole_elf_is_recognised() {
        let b = elf(4096, 0, [0; 3]);
        let h = inspect(&b, b.len() as u64).unwrap();
        assert_eq!(h.platforms, vec![Platform::QemuX86_64]);
    }

    #[test]
    fn truncated_elf_whose_segment_is_larger_than_the_file_is_refused() {
        // `head -c 100` of a real image: the LOAD segment still says 4096 bytes.
        let whole = elf(4096, 0, [0; 3]);
        let cut = &whole[..100];
        let err = inspect(cut, cut.len() as u64).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::Truncated {
                    end: 4096,
                    file_size: 100,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn program_headers_past_the_end_of_the_file_are_refused() {
        let mut b = elf(4096, 0, [0; 3]);
        b[44..46].copy_from_slice(&1000u16.to_le_bytes()); // 1000 program headers
        let err = inspect(&b, b.len() as u64).unwrap_err();
        assert!(matches!(err, ImageError::Truncated { .. }), "{err}");
    }

    #[test]
    fn section_headers_past_the_end_of_the_file_are_refused() {
        let mut b = elf(4096, 0, [0; 3]);
        b[32..36].copy_from_slice(&4000u32.to_le_bytes()); // shoff
        b[46..48].copy_from_slice(&40u16.to_le_bytes()); // shentsize
        b[48..50].copy_from_slice(&10u16.to_le_bytes()); // shnum
        let err = inspect(&b, b.len() as u64).unwrap_err();
        assert!(matches!(err, ImageError::Truncated { .. }), "{err}");
    }

    #[test]
    fn multiboot_load_range_past_the_end_of_the_file_is_refused() {
        // header at 0x54 loaded at 0x100054; load from 0x100000 to 0x100000 + 8192.
        let ok = elf(8192, 1 << 16, [0x10_0054, 0x10_0000, 0x10_2000]);
        inspect(&ok, ok.len() as u64).unwrap();
        let short = elf(8192, 1 << 16, [0x10_0054, 0x10_0000, 0x10_4000]);
        let err = inspect(&short, short.len() as u64).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::Truncated {
                    format: "multiboot",
                    ..
                }
            ),
            "{err}"
        );
        let backwards = elf(8192, 1 << 16, [0x10_0054, 0x20_0000, 0]);
        assert!(matches!(
            inspect(&backwards, 8192),
            Err(ImageError::Corrupt { .. })
        ));
    }

    #[test]
    fn zimage_magic_followed_by_random_bytes_is_refused() {
        let mut b = vec![0x5Au8; 4096];
        b[ZIMAGE_MAGIC_OFFSET..ZIMAGE_MAGIC_OFFSET + 4]
            .copy_from_slice(&ZIMAGE_MAGIC.to_le_bytes());
        // start/end far beyond the file
        b[0x28..0x2c].copy_from_slice(&0u32.to_le_bytes());
        b[0x2c..0x30].copy_from_slice(&0x7A5A_5A5Au32.to_le_bytes());
        assert!(matches!(
            inspect(&b, b.len() as u64),
            Err(ImageError::Truncated { .. })
        ));
        b[0x28..0x2c].copy_from_slice(&0x100u32.to_le_bytes());
        b[0x2c..0x30].copy_from_slice(&0x10u32.to_le_bytes());
        assert!(matches!(
            inspect(&b, b.len() as u64),
            Err(ImageError::Corrupt { .. })
        ));
        // A zImage whose declared length is the file is fine.
        b[0x28..0x2c].copy_from_slice(&0u32.to_le_bytes());
        b[0x2c..0x30].copy_from_slice(&4096u32.to_le_bytes());
        assert_eq!(
            inspect(&b, 4096).unwrap().platforms,
            vec![Platform::XenArm32]
        );
    }

    #[test]
    fn a_prefix_of_a_large_file_is_judged_against_the_file_size() {
        let whole = elf(200_000, 0, [0; 3]);
        let prefix = &whole[..INSPECT_PREFIX];
        inspect(prefix, whole.len() as u64).unwrap();
        assert!(inspect(prefix, 100_000).is_err());
    }
}
