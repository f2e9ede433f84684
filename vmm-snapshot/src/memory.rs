//! Sparse memory images: guest memory written to a file of the region's
//! size in which only the non-zero pages hold data; zero pages are holes
//! (never written, no disk space), except runs of at most
//! [`IMAGE_BRIDGE`] zero pages between data, written as zeros.
//!
//! The checksum of an image is CRC-32 (IEEE) over, for every non-zero page
//! in address order, the page's offset (u64, little endian) followed by its
//! 4,096 bytes. It does not depend on how the file system allocated the
//! file, so the reader recomputes it from what it reads.
//!
//! Both directions go through `pread`/`pwrite` on descriptors: the source
//! of a snapshot is a memfd the plugin (a hostile peer) shares, and the
//! kernel's copy is the one way to read it that no concurrent write can turn
//! into undefined behaviour here. Holes are skipped with `SEEK_DATA`
//! (memfds and the usual file systems support it), so never-touched guest
//! memory is not even read.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};

use nix::errno::Errno;
use nix::sys::uio::{pread, pwrite};
use nix::unistd::{ftruncate, lseek, Whence};

/// The page size images are organized in.
pub const PAGE: usize = 4096;
/// Bytes read per system call.
const CHUNK: usize = 1 << 20;
/// Zero pages between two runs of data pages that an image writes as
/// zeros rather than leave a hole, to write both runs with one call: a
/// scattered guest memory (every other page non-zero) would otherwise cost
/// one `pwrite` per page. The reader skips zero pages either way, and the
/// checksum covers non-zero pages only.
const IMAGE_BRIDGE: usize = 4;
/// How far past the chunk being copied the source is asked to be read
/// ahead (`POSIX_FADV_WILLNEED`).
const READ_AHEAD: u64 = 8 << 20;

/// Why an image could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("the region's size {0:#x} is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("cannot size the image file")]
    Truncate(#[source] Errno),
    #[error("cannot find the data in the source")]
    Seek(#[source] Errno),
    #[error("reading at offset {offset:#x} failed")]
    Read {
        offset: u64,
        #[source]
        source: Errno,
    },
    #[error("writing at offset {offset:#x} failed")]
    Write {
        offset: u64,
        #[source]
        source: Errno,
    },
    #[error("the source ended at offset {0:#x}, before the region's end")]
    ShortSource(u64),
    #[error("the image file holds {actual} bytes; the manifest says {expected}")]
    Length { expected: u64, actual: u64 },
    #[error(
        "checksum mismatch: the image reads as {actual:#010x}, the manifest says {expected:#010x}"
    )]
    Checksum { expected: u32, actual: u32 },
    #[error("cannot inspect the image file")]
    Stat(#[source] std::io::Error),
}

/// What an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub size: u64,
    /// Non-zero pages (the ones written).
    pub data_pages: u64,
    pub crc32: u32,
}

pub fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
}

/// The data extents of `fd` within `[start, end)`, as (start, end) pairs.
/// Without `SEEK_DATA` support the whole range is one extent.
pub fn extents(fd: BorrowedFd<'_>, start: u64, end: u64) -> Result<Vec<(u64, u64)>, MemoryError> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = start;
    while at < end {
        let data = match lseek(fd, at as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL) if out.is_empty() && at == start => return Ok(vec![(start, end)]),
            Err(e) => return Err(MemoryError::Seek(e)),
        };
        if data >= end {
            break;
        }
        let hole = match lseek(fd, data as i64, Whence::SeekHole) {
            Ok(h) => (h as u64).min(end),
            Err(Errno::ENXIO) => end,
            Err(e) => return Err(MemoryError::Seek(e)),
        };
        // Extents are page-granular for the checksum's sake.
        let page = PAGE as u64;
        let s = start + (data - start) / page * page;
        let e = (start + (hole - start).div_ceil(page) * page).min(end);
        match out.last_mut() {
            Some((_, last_end)) if *last_end >= s => *last_end = (*last_end).max(e),
            _ => out.push((s, e)),
        }
        at = e.max(at + 1);
    }
    Ok(out)
}

/// The first byte at or after `at` (and before `end`) that may hold data
/// (`SEEK_DATA`; `None`: only holes are left). Without `SEEK_DATA` support
/// everything may.
fn next_data(fd: BorrowedFd<'_>, at: u64, end: u64) -> Result<Option<u64>, MemoryError> {
    match lseek(fd, at as i64, Whence::SeekData) {
        Ok(d) if (d as u64) < end => Ok(Some(d as u64)),
        Ok(_) | Err(Errno::ENXIO) => Ok(None),
        Err(Errno::EINVAL) => Ok(Some(at)),
        Err(e) => Err(MemoryError::Seek(e)),
    }
}

pub fn read_full(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<(), MemoryError> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        match pread(fd, &mut buf[done..], at as i64) {
            Ok(0) => return Err(MemoryError::ShortSource(at)),
            Ok(n) => done += n,
            Err(Errno::EINTR) => continue,
            Err(source) => return Err(MemoryError::Read { offset: at, source }),
        }
    }
    Ok(())
}

pub fn write_full(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> Result<(), MemoryError> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        match pwrite(fd, &buf[done..], at as i64) {
            Ok(0) => {
                return Err(MemoryError::Write {
                    offset: at,
                    source: Errno::ENOSPC,
                })
            }
            Ok(n) => done += n,
            Err(Errno::EINTR) => continue,
            Err(source) => return Err(MemoryError::Write { offset: at, source }),
        }
    }
    Ok(())
}

/// Copies the non-zero pages of `[src_offset, src_offset + size)` of `src`
/// to the same offsets (relative to `dst_offset`) of `dst`, hashing each
/// one; zero pages are skipped on both sides. Returns the image facts.
fn copy_pages(
    src: BorrowedFd<'_>,
    src_offset: u64,
    size: u64,
    dst: BorrowedFd<'_>,
    dst_offset: u64,
    bridge: usize,
) -> Result<ImageInfo, MemoryError> {
    if !size.is_multiple_of(PAGE as u64) {
        return Err(MemoryError::Unaligned(size));
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut data_pages = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let end = src_offset + size;
    let mut at = src_offset;
    let mut hinted = at;
    // One `SEEK_DATA` per chunk, not one `SEEK_DATA`/`SEEK_HOLE` pair per
    // extent: holes before the next data are skipped, the holes inside a
    // chunk are read (the kernel fills them with zeros without touching the
    // disk) and skipped as zero pages. A scattered image (a data page here
    // and there) costs a few system calls per MiB instead of a few per page.
    while let Some(data) = next_data(src, at, end)? {
        let page = PAGE as u64;
        let start = (src_offset + (data - src_offset) / page * page).max(at);
        let n = ((end - start) as usize).min(CHUNK);
        // The disk reads ahead while this chunk is hashed and copied (a
        // hint: an error or a source without a disk changes nothing).
        let from = hinted.max(start + n as u64);
        let to = (start + n as u64 + READ_AHEAD).min(end);
        if from < to {
            let _ = nix::fcntl::posix_fadvise(
                src,
                from as i64,
                (to - from) as i64,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
            hinted = to;
        }
        let chunk = &mut buf[..n];
        read_full(src, chunk, start)?;
        // Runs of non-zero pages are written with one call each; with
        // `bridge`, runs separated by at most that many zero pages are
        // written as one, the zeros included.
        let rel = start - src_offset;
        // The open run: its first page and the end of its last data page.
        let mut run: Option<(usize, usize)> = None;
        for (i, page) in chunk.chunks(PAGE).enumerate() {
            if is_zero(page) {
                continue;
            }
            hasher.update(&(rel + (i * PAGE) as u64).to_le_bytes());
            hasher.update(page);
            data_pages += 1;
            run = match run {
                Some((r, last)) if i - last <= bridge => Some((r, i + 1)),
                Some((r, last)) => {
                    let off = rel + (r * PAGE) as u64;
                    write_full(dst, &chunk[r * PAGE..last * PAGE], dst_offset + off)?;
                    Some((i, i + 1))
                }
                None => Some((i, i + 1)),
            };
        }
        if let Some((r, last)) = run {
            let off = rel + (r * PAGE) as u64;
            write_full(dst, &chunk[r * PAGE..last * PAGE], dst_offset + off)?;
        }
        at = start + n as u64;
    }
    Ok(ImageInfo {
        size,
        data_pages,
        crc32: hasher.finalize(),
    })
}

/// Writes `size` bytes of `src` from `src_offset` (guest memory: a memfd)
/// as a sparse image into the empty file `dst`.
pub fn write_image(
    src: BorrowedFd<'_>,
    src_offset: u64,
    size: u64,
    dst: &File,
) -> Result<ImageInfo, MemoryError> {
    if !size.is_multiple_of(PAGE as u64) {
        return Err(MemoryError::Unaligned(size));
    }
    ftruncate(dst, size as i64).map_err(MemoryError::Truncate)?;
    copy_pages(src, src_offset, size, dst.as_fd(), 0, IMAGE_BRIDGE)
}

/// Loads an image (`expected` from the manifest) into `dst` at
/// `dst_offset`. `dst` must read as zero there (a fresh memfd): only the
/// image's data pages are written. The checksum is verified over what was
/// read; on a mismatch `dst` holds garbage and must be discarded.
pub fn read_image(
    src: &File,
    expected: ImageInfo,
    dst: BorrowedFd<'_>,
    dst_offset: u64,
) -> Result<ImageInfo, MemoryError> {
    let actual_len = src.metadata().map_err(MemoryError::Stat)?.len();
    if actual_len != expected.size {
        return Err(MemoryError::Length {
            expected: expected.size,
            actual: actual_len,
        });
    }
    // Loading writes data pages only: zero pages stay holes in the guest's
    // memfd (no memory for them).
    let info = copy_pages(src.as_fd(), 0, expected.size, dst, dst_offset, 0)?;
    if info.crc32 != expected.crc32 {
        return Err(MemoryError::Checksum {
            expected: expected.crc32,
            actual: info.crc32,
        });
    }
    Ok(info)
}

/// Reads an image only to verify it (no destination).
pub fn verify_image(src: &File, expected: ImageInfo) -> Result<ImageInfo, MemoryError> {
    let sink = nix::sys::memfd::memfd_create(c"vmm-verify", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(MemoryError::Truncate)?;
    ftruncate(&sink, expected.size as i64).map_err(MemoryError::Truncate)?;
    read_image(src, expected, sink.as_fd(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn memfd(size: u64) -> OwnedFd {
        let fd =
            nix::sys::memfd::memfd_create(c"test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        ftruncate(&fd, size as i64).unwrap();
        fd
    }

    fn tmpfile(tag: &str) -> (File, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!("vmm-snap-{tag}-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        (f, p)
    }

    /// The first `size` bytes of both memfds are the same.
    fn assert_same_memory(src: &OwnedFd, dst: &OwnedFd, size: u64) {
        let mut a = vec![0u8; size as usize];
        let mut b = vec![0u8; size as usize];
        read_full(src.as_fd(), &mut a, 0).unwrap();
        read_full(dst.as_fd(), &mut b, 0).unwrap();
        assert!(a == b, "the loaded memory equals the source");
    }

    #[test]
    fn sparse_round_trip() {
        let size = 64 * PAGE as u64 + (3 << 20);
        let src = memfd(size);
        // Pages 0, 1, 7 and one far away; page 9 written but zero.
        for (page, byte) in [(0u64, 1u8), (1, 2), (7, 3), (700, 4)] {
            pwrite(src.as_fd(), &[byte; PAGE], (page * PAGE as u64) as i64).unwrap();
        }
        pwrite(src.as_fd(), &[0; PAGE], 9 * PAGE as i64).unwrap();
        let (img, path) = tmpfile("rt");
        let info = write_image(src.as_fd(), 0, size, &img).unwrap();
        assert_eq!(info.data_pages, 4);
        assert_eq!(img.metadata().unwrap().len(), size);
        // Holes take no space: at most the 4 pages (plus file-system slack).
        use std::os::unix::fs::MetadataExt;
        assert!(img.metadata().unwrap().blocks() * 512 <= 64 * PAGE as u64);

        let dst = memfd(size);
        let back = read_image(&img, info, dst.as_fd(), 0).unwrap();
        assert_eq!(back, info);
        assert_same_memory(&src, &dst, size);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn scattered_pages_round_trip_and_stay_holes_when_loaded() {
        use std::os::unix::fs::MetadataExt;
        // Every other page of 3 MiB holds data, then one page far away
        // after a long hole.
        let size = (3 << 20) + 64 * PAGE as u64;
        let src = memfd(size);
        let mut data = 0;
        for page in (0..(3 << 20) / PAGE as u64).step_by(2) {
            pwrite(
                src.as_fd(),
                &[page as u8 | 1; PAGE],
                (page * PAGE as u64) as i64,
            )
            .unwrap();
            data += 1;
        }
        pwrite(src.as_fd(), &[7; PAGE], (size - PAGE as u64) as i64).unwrap();
        let (img, path) = tmpfile("scatter");
        let info = write_image(src.as_fd(), 0, size, &img).unwrap();
        assert_eq!(info.data_pages, data + 1);
        let dst = memfd(size);
        let back = read_image(&img, info, dst.as_fd(), 0).unwrap();
        assert_eq!(back, info);
        assert_same_memory(&src, &dst, size);
        // The zero pages between the data are no memory in the loaded
        // memfd (the image may hold them as zeros).
        let f = File::from(dst);
        let blocks = f.metadata().unwrap().blocks() * 512;
        assert!(
            blocks <= (data + 1) * PAGE as u64 + (64 << 10),
            "{blocks} bytes allocated for {} data pages",
            data + 1
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn corruption_and_truncation_are_detected() {
        let size = 16 * PAGE as u64;
        let src = memfd(size);
        pwrite(src.as_fd(), &[5; PAGE], PAGE as i64).unwrap();
        let (img, path) = tmpfile("bad");
        let info = write_image(src.as_fd(), 0, size, &img).unwrap();
        // A flipped byte in a data page.
        pwrite(img.as_fd(), &[6], PAGE as i64 + 100).unwrap();
        assert!(matches!(
            verify_image(&img, info),
            Err(MemoryError::Checksum { .. })
        ));
        // Data where a hole was.
        pwrite(img.as_fd(), &[5], PAGE as i64 + 100).unwrap();
        verify_image(&img, info).unwrap();
        pwrite(img.as_fd(), &[1], 10 * PAGE as i64).unwrap();
        assert!(matches!(
            verify_image(&img, info),
            Err(MemoryError::Checksum { .. })
        ));
        // A truncated file.
        ftruncate(&img, (size - PAGE as u64) as i64).unwrap();
        assert!(matches!(
            verify_image(&img, info),
            Err(MemoryError::Length { .. })
        ));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn offsets_within_the_source_are_kept() {
        let src = memfd(8 * PAGE as u64);
        pwrite(src.as_fd(), &[9; PAGE], 5 * PAGE as i64).unwrap();
        let (img, path) = tmpfile("off");
        // The image of pages 4..8 has its data at page 1.
        let info = write_image(src.as_fd(), 4 * PAGE as u64, 4 * PAGE as u64, &img).unwrap();
        assert_eq!(info.data_pages, 1);
        let mut page = [0u8; PAGE];
        read_full(img.as_fd(), &mut page, PAGE as u64).unwrap();
        assert_eq!(page, [9; PAGE]);
        assert!(write_image(src.as_fd(), 0, 100, &img).is_err());
        let _ = std::fs::remove_file(path);
    }
}
