//! The release an x86 kernel image names in its boot header.
//!
//! Linux's x86 boot protocol (Documentation/arch/x86/boot.rst) puts a setup
//! header in the image's first sector: from protocol 2.00 on (the magic
//! `HdrS` at 0x202, the protocol version at 0x206), the 16-bit field
//! `kernel_version` at 0x20E, when not zero, is the offset of a NUL-terminated
//! version string less 0x200, within the setup code (`setup_sects` sectors of
//! 512 bytes after the boot sector; 0 sectors means 4). The string starts with
//! the release (`6.1.0-57-cloud-amd64 (debian-kernel@...) #1 SMP ...`); that
//! first word is what `uname -r` says and what names `lib/modules/RELEASE`.
//! Every field is little-endian.

use std::fs;
use std::io::{self, Read};
use std::path::Path;

const SECTOR: usize = 0x200;
const SETUP_SECTS: usize = 0x1F1;
const HEADER_MAGIC: usize = 0x202;
const PROTOCOL_VERSION: usize = 0x206;
const KERNEL_VERSION: usize = 0x20E;
/// The protocol that brought the `kernel_version` field.
const FIRST_PROTOCOL_WITH_VERSION: u16 = 0x0200;
/// The most a header can span: the boot sector and 255 setup sectors.
const MOST_SETUP: usize = SECTOR * 256;

/// The release `image` names, if it is an x86 bzImage that names one.
pub fn release(image: &Path) -> io::Result<Option<String>> {
    let mut head = Vec::with_capacity(MOST_SETUP);
    fs::File::open(image)?
        .take(MOST_SETUP as u64)
        .read_to_end(&mut head)?;
    Ok(release_of(&head))
}

/// The release in the boot header at the start of `image`.
pub fn release_of(image: &[u8]) -> Option<String> {
    let u16_at = |at: usize| Some(u16::from_le_bytes([*image.get(at)?, *image.get(at + 1)?]));
    if image.get(HEADER_MAGIC..HEADER_MAGIC + 4)? != b"HdrS"
        || u16_at(PROTOCOL_VERSION)? < FIRST_PROTOCOL_WITH_VERSION
    {
        return None;
    }
    let pointer = usize::from(u16_at(KERNEL_VERSION)?);
    let setup_sects = match *image.get(SETUP_SECTS)? {
        0 => 4,
        n => usize::from(n),
    };
    // The string lies within the setup code.
    if pointer == 0 || pointer >= SECTOR * setup_sects {
        return None;
    }
    let text = image.get(pointer + SECTOR..)?;
    let text = &text[..text.iter().position(|&b| b == 0)?];
    let release = std::str::from_utf8(text).ok()?.split_whitespace().next()?;
    release
        .chars()
        .all(|c| c.is_ascii_graphic())
        .then(|| release.to_owned())
}

/// The first bytes of a bzImage that names `release`, for tests: a boot
/// header of protocol 2.15 with 31 setup sectors, the version string at 0x1200.
#[cfg(test)]
pub(crate) fn fake_image(release: &str) -> Vec<u8> {
    let mut image = vec![0u8; SECTOR * 32];
    image[SETUP_SECTS] = 31;
    image[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
    image[PROTOCOL_VERSION..PROTOCOL_VERSION + 2].copy_from_slice(&0x020Fu16.to_le_bytes());
    image[KERNEL_VERSION..KERNEL_VERSION + 2].copy_from_slice(&0x1000u16.to_le_bytes());
    let version = format!("{release} (dev@build) #1 SMP PREEMPT_DYNAMIC\0");
    image[0x1200..0x1200 + version.len()].copy_from_slice(version.as_bytes());
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_release_is_the_first_word_of_the_version_string() {
        assert_eq!(
            release_of(&fake_image("6.13.0-rc1")).as_deref(),
            Some("6.13.0-rc1")
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bzImage");
        fs::write(&path, fake_image("6.12.117+deb12-cloud-amd64")).unwrap();
        assert_eq!(
            release(&path).unwrap().as_deref(),
            Some("6.12.117+deb12-cloud-amd64")
        );
    }

    #[test]
    fn images_without_a_version_string_name_no_release() {
        let good = fake_image("6.13.0");
        let with = |at: usize, bytes: &[u8]| {
            let mut image = good.clone();
            image[at..at + bytes.len()].copy_from_slice(bytes);
            release_of(&image)
        };
        // Not a bzImage: no magic, or a protocol before 2.00.
        assert_eq!(with(HEADER_MAGIC, b"ELF\x7f"), None);
        assert_eq!(with(PROTOCOL_VERSION, &0x0104u16.to_le_bytes()), None);
        // No pointer, or one past the setup code (4 sectors when setup_sects is 0).
        assert_eq!(with(KERNEL_VERSION, &[0, 0]), None);
        assert_eq!(with(SETUP_SECTS, &[0]), None);
        assert_eq!(with(KERNEL_VERSION, &0x7FFFu16.to_le_bytes()), None);
        // An empty or unterminated string, and a file too short for a header.
        assert_eq!(with(0x1200, b"\0"), None);
        assert_eq!(release_of(&good[..0x1204]), None);
        assert_eq!(release_of(&good[..0x100]), None);
        assert_eq!(release_of(b""), None);
    }

    #[test]
    fn the_cached_debian_kernels_name_their_release() {
        // Checked against the real images when scripts/setup fetched them.
        let kernels = super::super::cache_dir().join("kernels");
        for name in super::super::DEFAULT_KERNELS {
            let dir = kernels.join(name);
            let Ok(env) = fs::read_to_string(dir.join("kernel.env")) else {
                continue;
            };
            let want = env.lines().find_map(|l| l.strip_prefix("RELEASE="));
            let got = release(&dir.join("vmlinuz")).unwrap();
            assert_eq!(got.as_deref(), want, "{name}");
        }
    }
}
