//! Recognising unikernel images by their headers.
//!
//! Only the first [`INSPECT_PREFIX`] bytes are examined; nothing here trusts an offset or
//! a count from the header without checking it against the bytes actually present, so
//! any input yields a result or an [`ImageError`], never a panic.

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
    Unknown(String),
    #[error("corrupt {format} header: {reason}")]
    Corrupt {
        format: &'static str,
        reason: String,
    },
}

/// Identifies an image from its first bytes (pass at least [`INSPECT_PREFIX`] bytes when
/// the file is that large).
pub fn inspect(prefix: &[u8]) -> Result<ImageHeader, ImageError> {
    if prefix.is_empty() {
        return Err(ImageError::Empty);
    }
    if prefix.starts_with(b"\x7fELF") {
        return inspect_elf(prefix);
    }
    if read_u32(prefix, ZIMAGE_MAGIC_OFFSET) == Some(ZIMAGE_MAGIC) {
        return Ok(ImageHeader {
            format: "ARM zImage".into(),
            platforms: vec![Platform::XenArm32],
            entry: None,
            notes: vec![format!(
                "zImage start/end 0x{:x}/0x{:x}",
                read_u32(prefix, 0x28).unwrap_or(0),
                read_u32(prefix, 0x2c).unwrap_or(0)
            )],
        });
    }
    if prefix.starts_with(crate::codec::MAGIC.as_slice()) {
        return Err(ImageError::Unknown(
            "this is a unifleet message, not an image".into(),
        ));
    }
    Err(ImageError::Unknown(
        "no ELF, multiboot or ARM zImage header found".into(),
    ))
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

fn inspect_elf(b: &[u8]) -> Result<ImageHeader, ImageError> {
    let corrupt = |reason: &str| ImageError::Corrupt {
        format: "ELF",
        reason: reason.into(),
    };
    let class = *b
        .get(4)
        .ok_or_else(|| corrupt("truncated identification"))?;
    let data = *b
        .get(5)
        .ok_or_else(|| corrupt("truncated identification"))?;
    if data != 1 {
        return Err(ImageError::Unknown(
            "big-endian ELF is not supported".into(),
        ));
    }
    let is64 = match class {
        1 => false,
        2 => true,
        c => return Err(corrupt(&format!("invalid ELF class {c}"))),
    };
    let machine = read_u16(b, 18).ok_or_else(|| corrupt("truncated header"))?;
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
    let (Some(entry), Some(phoff), Some(phentsize), Some(phnum)) = (entry, phoff, phentsize, phnum)
    else {
        return Err(corrupt("truncated header"));
    };
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
        return Err(corrupt("program header entries too small"));
    }
    for i in 0..u64::from(phnum) {
        let Some(off) = phoff
            .checked_add(i * u64::from(phentsize))
            .and_then(|o| usize::try_from(o).ok())
        else {
            return Err(corrupt("program header offset overflows"));
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
        return Err(ImageError::Unknown(format!(
            "{} has neither a multiboot header nor a Xen PVH note",
            header.format
        )));
    }
    Ok(header)
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
