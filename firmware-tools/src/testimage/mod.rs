//! `fwtool testimage`: a real bootable unikernel, written byte by byte: an x86 multiboot
//! ELF (`--arch x86`, the default) or an arm64 Image (`--arch aarch64`, booted by
//! `qemu-system-aarch64 -M virt`; `kernel-aarch64.S`: the image header, the code, then
//! the two messages).
//!
//! x86 file layout (everything before the padding is one PT_LOAD segment at 1 MiB):
//!
//! ```text
//! 0x00  ELF32 header (i386, EXEC, entry = CODE_ADDR)
//! 0x34  one program header: PT_LOAD offset 0 -> 0x100000, RWX
//! 0x54  multiboot header (magic 0x1BADB002, flags 0, checksum)
//! 0x60  kernel code (kernel.S, see blob.rs), then its data table
//!       first message, NUL; answer message, NUL
//! ...   optional padding: N MiB of BLAKE3-XOF output keyed by the app name, not loaded
//! ```
//!
//! The padding depends only on the app name, so two versions of one app differ only in
//! the first few hundred bytes and share every padding chunk.

mod blob;
mod blob_aarch64;

use anyhow::{ensure, Context, Result};
use std::io::Write;

const MULTIBOOT_MAGIC: u32 = 0x1BAD_B002;
const PAD_BLOCK: usize = 1 << 20;

/// Which machine the image is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Arch {
    /// 32-bit x86 multiboot ELF (platform qemu-x86_64).
    #[default]
    X86,
    /// arm64 Image with a PL011 console (platform qemu-aarch64).
    Aarch64,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct Spec {
    pub arch: Arch,
    pub app: String,
    pub version: semver::Version,
    /// Boots and prints a line, but never `READY`.
    pub fail: bool,
    pub pad_mib: u32,
}

impl Spec {
    pub fn ready_line(&self) -> String {
        proto::manifest::Manifest::ready_banner(&self.app, &self.version)
    }

    /// The line the image prints for every line it receives.
    pub fn answer_line(&self) -> String {
        format!("HELLO {} {}", self.app, self.version)
    }

    fn first_line(&self) -> String {
        if self.fail {
            format!(
                "BOOT {} {}: built with --fail, this image never becomes ready",
                self.app, self.version
            )
        } else {
            self.ready_line()
        }
    }
}

/// The loaded part of the image: headers, code, table and messages.
pub fn loaded_bytes(spec: &Spec) -> Result<Vec<u8>> {
    proto::names::check("app", &spec.app).map_err(anyhow::Error::msg)?;
    let first = format!("{}\r\n\0", spec.first_line());
    let answer = format!("{}\r\n\0", spec.answer_line());
    match spec.arch {
        Arch::X86 => multiboot(spec, &first, &answer),
        Arch::Aarch64 => arm64_image(spec, &first, &answer),
    }
}

/// The arm64 Image: code (position independent), then the messages; `table` holds their
/// offsets from the start and the mode, the header the whole size.
fn arm64_image(spec: &Spec, first: &str, answer: &str) -> Result<Vec<u8>> {
    let mut out = blob_aarch64::KERNEL.to_vec();
    let first_at = u32::try_from(out.len()).context("image too large")?;
    let answer_at = first_at + first.len() as u32;
    let table = blob_aarch64::TABLE_OFFSET;
    out[table..table + 4].copy_from_slice(&first_at.to_le_bytes());
    out[table + 4..table + 8].copy_from_slice(&answer_at.to_le_bytes());
    out[table + 8..table + 12].copy_from_slice(&u32::from(spec.fail).to_le_bytes());
    out.extend_from_slice(first.as_bytes());
    out.extend_from_slice(answer.as_bytes());
    let size = (out.len() as u64).to_le_bytes();
    let at = blob_aarch64::IMAGE_SIZE_OFFSET;
    out[at..at + 8].copy_from_slice(&size);
    Ok(out)
}

fn multiboot(spec: &Spec, first: &str, answer: &str) -> Result<Vec<u8>> {
    let mut kernel = blob::KERNEL.to_vec();
    let strings_addr = blob::CODE_ADDR + kernel.len() as u32;
    let answer_addr = strings_addr + first.len() as u32;
    let table = blob::TABLE_OFFSET;
    kernel[table..table + 4].copy_from_slice(&strings_addr.to_le_bytes());
    kernel[table + 4..table + 8].copy_from_slice(&answer_addr.to_le_bytes());
    kernel[table + 8..table + 12].copy_from_slice(&u32::from(spec.fail).to_le_bytes());

    let total = blob::CODE_OFFSET as usize + kernel.len() + first.len() + answer.len();
    let total32 = u32::try_from(total).context("image too large")?;
    let mut out = Vec::with_capacity(total);
    // ELF header
    out.extend_from_slice(b"\x7fELF\x01\x01\x01\x00");
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&3u16.to_le_bytes()); // EM_386
    out.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    out.extend_from_slice(&blob::CODE_ADDR.to_le_bytes()); // e_entry
    out.extend_from_slice(&52u32.to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&52u16.to_le_bytes()); // e_ehsize
    out.extend_from_slice(&32u16.to_le_bytes()); // e_phentsize
    out.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    out.extend_from_slice(&40u16.to_le_bytes()); // e_shentsize
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                                // Program header: the whole loaded part at LOAD_ADDR
    out.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    out.extend_from_slice(&0u32.to_le_bytes()); // p_offset
    out.extend_from_slice(&blob::LOAD_ADDR.to_le_bytes()); // p_vaddr
    out.extend_from_slice(&blob::LOAD_ADDR.to_le_bytes()); // p_paddr
    out.extend_from_slice(&total32.to_le_bytes()); // p_filesz
    out.extend_from_slice(&total32.to_le_bytes()); // p_memsz
    out.extend_from_slice(&7u32.to_le_bytes()); // RWX
    out.extend_from_slice(&0x1000u32.to_le_bytes()); // p_align
                                                     // Multiboot header
    let flags = 0u32;
    out.extend_from_slice(&MULTIBOOT_MAGIC.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(0u32.wrapping_sub(MULTIBOOT_MAGIC).wrapping_sub(flags)).to_le_bytes());
    ensure!(
        out.len() == blob::CODE_OFFSET as usize,
        "header layout drifted"
    );
    out.extend_from_slice(&kernel);
    out.extend_from_slice(first.as_bytes());
    out.extend_from_slice(answer.as_bytes());
    Ok(out)
}

/// Writes the whole image (loaded part, then padding) to `out`, one MiB at a time.
pub fn write(spec: &Spec, out: &mut impl Write) -> Result<u64> {
    let head = loaded_bytes(spec)?;
    out.write_all(&head)?;
    let mut written = head.len() as u64;
    if spec.pad_mib > 0 {
        let mut xof = blake3::Hasher::new_derive_key("unifleet fwtool testimage padding v1")
            .update(spec.app.as_bytes())
            .finalize_xof();
        let mut block = vec![0u8; PAD_BLOCK];
        for _ in 0..spec.pad_mib {
            xof.fill(&mut block);
            out.write_all(&block)?;
            written += block.len() as u64;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(version: &str, fail: bool) -> Spec {
        Spec {
            arch: Arch::X86,
            app: "hello".into(),
            version: version.parse().unwrap(),
            fail,
            pad_mib: 0,
        }
    }

    #[test]
    fn image_is_recognised_as_multiboot() {
        let bytes = loaded_bytes(&spec("1.0.0", false)).unwrap();
        let header = proto::image::inspect(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(
            header.platforms,
            vec![proto::manifest::Platform::QemuX86_64]
        );
        assert_eq!(header.entry, Some(u64::from(blob::CODE_ADDR)));
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("READY hello 1.0.0\r\n"));
        assert!(text.contains("HELLO hello 1.0.0\r\n"));
    }

    #[test]
    fn fail_image_has_no_ready_line() {
        let bytes = loaded_bytes(&spec("1.0.0", true)).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("READY"));
    }

    /// Runs each `(command, args)` in a temporary directory and returns the bytes of
    /// `k.bin` it leaves: the checked-in machine code must be exactly what its source
    /// assembles to. Where the binutils are missing this fails naming the package.
    fn assemble(steps: &[(&str, &[&str])], package: &str) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        for (cmd, args) in steps {
            let status = std::process::Command::new(cmd)
                .args(*args)
                .current_dir(dir.path())
                .status();
            match status {
                Ok(s) => assert!(s.success(), "{cmd} {args:?} failed"),
                Err(e) => panic!("{cmd} not runnable ({e}); install {package}"),
            }
        }
        std::fs::read(dir.path().join("k.bin")).unwrap()
    }

    #[test]
    fn blob_matches_source() {
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src/testimage/kernel.S");
        let assembled = assemble(
            &[
                ("as", &["--32", "-o", "k.o", src]),
                (
                    "ld",
                    &["-m", "elf_i386", "-Ttext=0x100060", "-o", "k.elf", "k.o"],
                ),
                (
                    "objcopy",
                    &["-O", "binary", "-j", ".text", "k.elf", "k.bin"],
                ),
            ],
            "binutils",
        );
        assert_eq!(
            assembled,
            blob::KERNEL.to_vec(),
            "re-generate blob.rs from kernel.S"
        );
    }

    #[test]
    fn aarch64_image_is_recognised_as_an_arm64_image() {
        let spec = Spec {
            arch: Arch::Aarch64,
            ..spec("1.0.0", false)
        };
        let bytes = loaded_bytes(&spec).unwrap();
        let header = proto::image::inspect(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(
            header.platforms,
            vec![proto::manifest::Platform::QemuAarch64]
        );
        let size = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
        assert_eq!(size, bytes.len() as u64);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("READY hello 1.0.0\r\n"));
        assert!(text.contains("HELLO hello 1.0.0\r\n"));
        let failing = loaded_bytes(&Spec { fail: true, ..spec }).unwrap();
        assert!(!String::from_utf8_lossy(&failing).contains("READY"));
    }

    /// As `blob_matches_source`, for `kernel-aarch64.S` with the aarch64 binutils
    /// (installed by scripts/setup.sh).
    #[test]
    fn aarch64_blob_matches_source() {
        let src = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/testimage/kernel-aarch64.S"
        );
        let assembled = assemble(
            &[
                ("aarch64-linux-gnu-as", &["-o", "k.o", src]),
                ("aarch64-linux-gnu-ld", &["-Ttext=0", "-o", "k.elf", "k.o"]),
                (
                    "aarch64-linux-gnu-objcopy",
                    &["-O", "binary", "-j", ".text", "k.elf", "k.bin"],
                ),
            ],
            "binutils-aarch64-linux-gnu",
        );
        assert_eq!(
            assembled,
            blob_aarch64::KERNEL.to_vec(),
            "re-generate blob_aarch64.rs from kernel-aarch64.S"
        );
    }
}
