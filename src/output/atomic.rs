//! Atomic file writes: temp file in the same directory, fsync, rename.
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Writes whatever `fill` writes to `path`, atomically.
pub fn write_with(path: &Path, fill: impl FnOnce(&mut std::fs::File) -> Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}{}", temp_suffix()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        fill(&mut f)?;
        f.flush().map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |f| f.write_all(bytes).map_err(|e| Error::io(path, e)))
}

/// Whether `stem` can name a file inside an output directory and nothing else: one plain path
/// component, not hidden (dot-files are tl-run's own), no control characters.
pub fn check_file_stem(stem: &str) -> std::result::Result<(), &'static str> {
    if stem.is_empty() {
        return Err("is empty");
    }
    if stem.contains(['/', '\\']) {
        return Err("contains a path separator");
    }
    if stem.starts_with('.') {
        return Err("starts with '.'");
    }
    if stem.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    if stem.len() > 200 {
        return Err("is longer than 200 bytes");
    }
    Ok(())
}

/// `<dir>/<stem><ext>`, refusing any stem that would land outside `dir`.
pub fn file_in(dir: &Path, stem: &str, ext: &str) -> Result<std::path::PathBuf> {
    check_file_stem(stem).map_err(|why| Error::Config(format!("output name {stem:?} {why}")))?;
    let p = dir.join(format!("{stem}{ext}"));
    debug_assert_eq!(p.parent(), Some(dir));
    Ok(p)
}

/// Proves `dir` can be created and written to (a probe file in it, or in its nearest existing
/// ancestor), so an unwritable output directory is named before any weights are loaded, and a
/// run that fails later leaves no empty directory behind.
pub fn check_writable_dir(dir: &Path) -> Result<()> {
    let mut at = dir;
    while !at.exists() {
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => {
                at = Path::new(".");
                break;
            }
        }
    }
    if !at.is_dir() {
        return Err(Error::Config(format!("output directory {}: {} is not a directory", dir.display(), at.display())));
    }
    let probe = at.join(format!(".tl-run-probe{}", temp_suffix()));
    std::fs::write(&probe, b"").map_err(|e| {
        Error::Config(format!("output directory {} is not writable ({}: {e})", dir.display(), at.display()))
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The suffix of this process's temporary files: `.tmp-<host>-<pid>`, so a later process on
/// the same host can tell a killed writer's leftovers from a live writer's file.
fn temp_suffix() -> String {
    format!(".tmp-{}-{}", hostname(), std::process::id())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = if ok { String::from_utf8_lossy(&buf[..end]).into_owned() } else { String::new() };
    // Hyphens are the separator of the suffix.
    name.replace(['-', '/'], "_")
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) }
}

/// Removes the temporary files in `dir` that a process of this host which no longer runs left
/// behind (a kill -9 between creating and renaming). Returns how many it removed.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let host = hostname();
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((_, tail)) = name.rsplit_once(".tmp-") else { continue };
        let Some((h, pid)) = tail.rsplit_once('-') else { continue };
        let Ok(pid) = pid.parse::<i32>() else { continue };
        if name.starts_with('.')
            && h == host
            && pid != std::process::id() as i32
            && !process_alive(pid)
            && std::fs::remove_file(e.path()).is_ok()
        {
            tracing::info!("removed {}, left by a process that was killed", e.path().display());
            removed += 1;
        }
    }
    removed
}

/// Whether a file name is one of tl-run's temporary files.
pub fn is_temp(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}
