//! Where restore writes: below the data directory, and through no symbolic link but the
//! tablespace links it creates itself.
//!
//! Manifest paths are clean when the manifest is read (`backup::ManifestPath`), so joined to the
//! data directory they stay below it, unless a component on the way is a symbolic link. A fresh
//! data directory holds none; one reused with `--delta` may. Every component on the way to a
//! file is therefore checked with `symlink_metadata`, a file is created under a temporary name
//! with `O_NOFOLLOW` and renamed into place only once its checksum matched (a rename replaces a
//! link at the final name rather than following it), and `--delta` refuses a link where the
//! manifest lists a file or directory before it removes anything.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::tablespaces::TablespaceLink;
use crate::backup::ManifestPath;

/// The data directory being restored into, with the tablespace links this restore creates.
pub struct DataDirectory {
    root: PathBuf,
    /// `pg_tblspc/<oid>` for each tablespace link, with the location it points to.
    links: HashMap<String, PathBuf>,
}

impl DataDirectory {
    pub fn new(root: &Path, links: &[TablespaceLink]) -> Self {
        DataDirectory {
            root: root.to_path_buf(),
            links: links
                .iter()
                .map(|link| (format!("pg_tblspc/{}", link.oid), link.location.clone()))
                .collect(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `path` is on disk, once no existing component before its last is a symbolic link
    /// other than a tablespace link of this restore. The last component is not checked: it is
    /// replaced by a rename, never opened through.
    pub fn resolve(&self, path: &ManifestPath) -> Result<PathBuf> {
        let components: Vec<&str> = path.components().collect();
        let mut relative = String::new();
        for component in &components[..components.len() - 1] {
            if !relative.is_empty() {
                relative.push('/');
            }
            relative.push_str(component);
            let on_disk = self.root.join(&relative);
            match std::fs::symlink_metadata(&on_disk) {
                Ok(metadata) if metadata.is_symlink() && !self.links.contains_key(&relative) => {
                    bail!(
                        "{} is a symbolic link this restore did not create, so writing through it could leave the data directory; the restored directory is incomplete and will not start. Restore into an empty directory",
                        on_disk.display()
                    );
                }
                Ok(_) => {}
                // Nothing deeper exists either; creating the file reports it.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => break,
                Err(error) => {
                    return Err(error).with_context(|| format!("reading {}", on_disk.display()));
                }
            }
        }
        Ok(self.root.join(path.as_str()))
    }

    /// Creates the directory `path` (mode 0700), and any missing on the way, never through a
    /// symbolic link other than a tablespace link of this restore.
    pub fn create_directory(&self, path: &ManifestPath) -> Result<()> {
        let mut relative = String::new();
        for component in path.components() {
            if !relative.is_empty() {
                relative.push('/');
            }
            relative.push_str(component);
            let on_disk = self.root.join(&relative);
            match std::fs::symlink_metadata(&on_disk) {
                Ok(metadata) if metadata.is_symlink() && self.links.contains_key(&relative) => {}
                Ok(metadata) if metadata.is_dir() => {}
                Ok(_) => bail!(
                    "{} is in the way of a directory the backup holds (it is a file or a symbolic link this restore did not create); the restored directory is incomplete and will not start. Restore into an empty directory",
                    on_disk.display()
                ),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&on_disk)
                        .with_context(|| format!("creating {}", on_disk.display()))?;
                }
                Err(error) => {
                    return Err(error).with_context(|| format!("reading {}", on_disk.display()));
                }
            }
        }
        let on_disk = self.root.join(path.as_str());
        std::fs::set_permissions(&on_disk, crate::backup::take::permissions(0o700))
            .with_context(|| format!("setting the mode of {}", on_disk.display()))
    }

    /// For `--delta`: everything the backup does not hold, in the data directory and in the
    /// tablespace locations, to be removed so that the result equals a clean restore. It only
    /// reads, so a refusal (a symbolic link where the backup holds a file or directory) changes
    /// nothing. A tablespace link is not looked at: `tablespaces::link` replaces it.
    pub fn unlisted(&self, wanted: &HashSet<&str>) -> Result<Vec<PathBuf>> {
        let mut unlisted = Vec::new();
        self.scan(&self.root, "", wanted, &mut unlisted)?;
        for (relative, location) in &self.links {
            if location.is_dir() {
                self.scan(location, relative, wanted, &mut unlisted)?;
            }
        }
        Ok(unlisted)
    }

    fn scan(
        &self,
        directory: &Path,
        relative: &str,
        wanted: &HashSet<&str>,
        unlisted: &mut Vec<PathBuf>,
    ) -> Result<()> {
        let entries = std::fs::read_dir(directory)
            .with_context(|| format!("reading {}", directory.display()))?;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let child = if relative.is_empty() {
                name
            } else {
                format!("{relative}/{name}")
            };
            if self.links.contains_key(&child) {
                continue;
            }
            // The entry's own type: a symbolic link is never followed.
            let kind = entry.file_type()?;
            let is_wanted = wanted.contains(child.as_str());
            if kind.is_symlink() && is_wanted {
                bail!(
                    "{} is a symbolic link, and a restore writes only below the data directory through links it created itself; nothing was changed. Replace the link with a directory, or restore into an empty directory without --delta",
                    entry.path().display()
                );
            }
            if !is_wanted {
                unlisted.push(entry.path());
            } else if kind.is_dir() {
                self.scan(&entry.path(), &child, wanted, unlisted)?;
            }
        }
        Ok(())
    }
}

/// Removes what `DataDirectory::unlisted` found; a symbolic link itself, never its target.
pub fn remove_all(paths: &[PathBuf]) -> Result<()> {
    for path in paths {
        let metadata = std::fs::symlink_metadata(path)?;
        let removed = if metadata.is_dir() {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        };
        removed.with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// A restored file under a temporary name beside its destination. Dropped before `rename`
/// (a failed fetch, a checksum that did not match, a cancelled restore), it removes itself,
/// so nothing half-written or unverified is ever left under a name Postgres reads.
pub struct TemporaryFile {
    temporary: PathBuf,
    destination: PathBuf,
    renamed: bool,
}

impl TemporaryFile {
    /// Creates the temporary file, mode 0600; it must not exist, and is never a link followed.
    pub fn create(destination: &Path) -> Result<(Self, std::fs::File)> {
        let name = destination
            .file_name()
            .context("a manifest path always has a file name")?
            .to_string_lossy()
            .into_owned();
        let temporary =
            destination.with_file_name(format!(".{name}.pitr-{}.tmp", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temporary)
            .with_context(|| format!("creating {}", temporary.display()))?;
        let pending = TemporaryFile {
            temporary,
            destination: destination.to_path_buf(),
            renamed: false,
        };
        Ok((pending, file))
    }

    /// Renames the file to its destination, replacing whatever is there (a link included).
    pub fn rename(mut self) -> Result<()> {
        std::fs::rename(&self.temporary, &self.destination).with_context(|| {
            format!(
                "renaming {} to {}",
                self.temporary.display(),
                self.destination.display()
            )
        })?;
        self.renamed = true;
        Ok(())
    }
}

impl Drop for TemporaryFile {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> ManifestPath {
        ManifestPath::parse(text).unwrap()
    }

    #[test]
    fn a_symbolic_link_on_the_way_is_refused_unless_it_is_a_tablespace_link() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("base")).unwrap();
        std::fs::create_dir(root.path().join("pg_tblspc")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("pg_tblspc/16390")).unwrap();
        let links = [TablespaceLink {
            oid: 16390,
            location: outside.path().to_path_buf(),
        }];
        let directory = DataDirectory::new(root.path(), &links);
        let refused = directory.resolve(&path("base/1/1259")).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("is a symbolic link this restore did not create"),
            "{refused}"
        );
        assert!(directory.create_directory(&path("base/1")).is_err());
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        assert_eq!(
            directory.resolve(&path("pg_tblspc/16390/PG_15/1")).unwrap(),
            root.path().join("pg_tblspc/16390/PG_15/1")
        );
        directory
            .create_directory(&path("pg_tblspc/16390/PG_15"))
            .unwrap();
        assert!(outside.path().join("PG_15").is_dir());
    }

    #[test]
    fn a_temporary_file_dropped_before_its_rename_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let destination = root.path().join("PG_VERSION");
        let (pending, file) = TemporaryFile::create(&destination).unwrap();
        drop(file);
        drop(pending);
        assert!(std::fs::read_dir(root.path()).unwrap().next().is_none());
        let (pending, mut file) = TemporaryFile::create(&destination).unwrap();
        std::io::Write::write_all(&mut file, b"15\n").unwrap();
        pending.rename().unwrap();
        assert_eq!(std::fs::read(&destination).unwrap(), b"15\n");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }
}
