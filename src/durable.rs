//! Local-disk durability: the one place that knows how to make a file survive a power cut.
//!
//! The rule everywhere in pitr is: write to a temporary file, fsync it, rename it over the final
//! name, then fsync the directory so the rename itself is on disk. Nothing is acknowledged before
//! the last step returns.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Fsyncs the directory holding `path`, making a create or rename of `path` durable.
pub fn sync_parent_directory(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// One `syncfs(2)` of the filesystem holding `path`: every file written there so far is durable
/// when it returns, far faster than an fsync per file when there are thousands of them. It also
/// reports any writeback error since those writes.
pub fn sync_filesystem(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let directory = File::open(path)?;
    // SAFETY: the descriptor stays open for the duration of the call.
    if unsafe { libc::syncfs(directory.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts the kernel writing a file to disk as it grows, without waiting. This is only a head
/// start for a later fsync or syncfs, which remains the durability point: the disk then works
/// while the CPU produces the next data, instead of all at the end.
#[derive(Debug, Default)]
pub struct Writeback {
    written: u64,
    flushed: u64,
}

/// Writeback is started every this many bytes.
const WRITEBACK_STEP: u64 = 4 << 20;

impl Writeback {
    /// Records `count` more bytes written to `file`, starting writeback every few MiB.
    pub fn wrote(&mut self, file: &File, count: usize) {
        self.written += count as u64;
        if self.written - self.flushed >= WRITEBACK_STEP {
            self.start(file);
        }
    }

    /// Starts writeback of whatever is written and not yet started.
    pub fn finish(&mut self, file: &File) {
        if self.written > self.flushed {
            self.start(file);
        }
    }

    fn start(&mut self, file: &File) {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for the duration of the call; the flag only schedules I/O.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                self.flushed as i64,
                (self.written - self.flushed) as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.flushed = self.written;
    }
}

/// A temporary file next to its final destination. Until it is in place, every way out (a
/// failed write, fsync or rename, or a drop without `commit`) removes it, so a failure never
/// leaves a half-written or orphaned file behind.
pub struct PendingFile {
    temporary: PathBuf,
    destination: PathBuf,
    file: Option<File>,
    writeback: Writeback,
    /// Set once the temporary name is gone (renamed or linked into place): nothing to remove.
    placed: bool,
}

/// Which step of making a pending file durable failed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("fsync of the new file failed: {0}")]
    Sync(io::Error),
    #[error("rename into place failed: {0}")]
    Rename(io::Error),
    #[error("fsync of its directory failed: {0}")]
    SyncDirectory(io::Error),
}

impl PendingFile {
    pub fn create(destination: &Path) -> io::Result<Self> {
        let file_name = destination
            .file_name()
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "destination has no file name")
            })?
            .to_string_lossy()
            .into_owned();
        let temporary =
            destination.with_file_name(format!(".{file_name}.pitr-{}.tmp", std::process::id()));
        let file = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temporary)?;
        Ok(PendingFile {
            temporary,
            destination: destination.to_path_buf(),
            file: Some(file),
            writeback: Writeback::default(),
            placed: false,
        })
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("the file is open until commit")
    }

    /// Fsyncs the data, renames it into place and fsyncs the directory. On failure nothing is
    /// left: the temporary file is removed, and so is the renamed file if the directory fsync
    /// failed (its name might not survive a crash, and the caller reports a failure).
    pub fn commit(mut self) -> Result<(), CommitError> {
        let file = self.file.take().expect("the file is open until commit");
        file.sync_all().map_err(CommitError::Sync)?;
        drop(file);
        std::fs::rename(&self.temporary, &self.destination).map_err(CommitError::Rename)?;
        self.placed = true;
        sync_parent_directory(&self.destination).map_err(|error| {
            let _ = std::fs::remove_file(&self.destination);
            CommitError::SyncDirectory(error)
        })
    }

    /// Like `commit`, but fails with `AlreadyExists` rather than replace a file at the
    /// destination: the data is fsynced, hard-linked to the final name, the temporary name is
    /// removed and the directory fsynced. A failed directory fsync removes the new name too.
    pub fn link_into_place(mut self) -> io::Result<()> {
        let file = self.file.take().expect("the file is open until commit");
        file.sync_all()?;
        drop(file);
        std::fs::hard_link(&self.temporary, &self.destination)?;
        let _ = std::fs::remove_file(&self.temporary);
        self.placed = true;
        sync_parent_directory(&self.destination).inspect_err(|_| {
            let _ = std::fs::remove_file(&self.destination);
        })
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

impl std::io::Write for PendingFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let file = self.file.as_mut().expect("the file is open until commit");
        let count = file.write(data)?;
        self.writeback.wrote(file, count);
        Ok(count)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn names_in(directory: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(directory)
            .unwrap()
            .flatten()
            .map(|entry| entry.file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_failed_rename_leaves_no_temporary_file() {
        let directory = tempfile::tempdir().unwrap();
        let destination = directory.path().join("target");
        std::fs::create_dir(&destination).unwrap();
        let mut pending = PendingFile::create(&destination).unwrap();
        pending.write_all(b"data").unwrap();
        assert!(pending.commit().is_err());
        assert_eq!(names_in(directory.path()), ["target"]);
    }

    #[test]
    fn a_refused_link_leaves_no_temporary_file() {
        let directory = tempfile::tempdir().unwrap();
        let destination = directory.path().join("target");
        std::fs::write(&destination, b"first").unwrap();
        let mut pending = PendingFile::create(&destination).unwrap();
        pending.write_all(b"second").unwrap();
        let error = pending.link_into_place().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(names_in(directory.path()), ["target"]);
        assert_eq!(std::fs::read(&destination).unwrap(), b"first");
    }
}
