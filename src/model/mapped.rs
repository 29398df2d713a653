//! A file mapped into memory copy-on-write: its pages are read from the page cache only where
//! touched (no copy of the whole file first), and a write changes this process's copy, never
//! the file.
use std::path::Path;

use crate::error::{Error, Result};

pub struct MappedFile {
    address: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; readers share it as they would a
// `Vec<u8>`, and it is unmapped only on drop.
unsafe impl Send for MappedFile {}
unsafe impl Sync for MappedFile {}

impl MappedFile {
    pub fn open(path: &Path) -> Result<MappedFile> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len() as usize;
        if len == 0 {
            return Ok(MappedFile { address: std::ptr::null_mut(), len });
        }
        // SAFETY: a fresh private mapping of an open file; the kernel picks the address.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(Error::io(path, std::io::Error::last_os_error()));
        }
        Ok(MappedFile { address, len })
    }

    /// Where the file's first byte is.
    pub fn address(&self) -> usize {
        self.address as usize
    }

    /// The file's bytes, for a reader that does not write through views of the mapping.
    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `len` bytes are mapped at `address` for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.address as *const u8, self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping made in `open`, once.
            unsafe { libc::munmap(self.address, self.len) };
        }
    }
}
