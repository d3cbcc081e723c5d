//! Tablespaces on restore: where each one goes, checked before anything is written.
//!
//! A backup records each tablespace's OID and location in `tablespace_map` (from
//! `pg_backup_stop`), and stores its files under `pg_tblspc/<oid>/`. By default a restore puts
//! each tablespace back at its original location, linked from `pg_tblspc/<oid>` as Postgres
//! expects, the way pgBackRest does. `--tablespace-map OID=DIR` moves one elsewhere, and
//! `--tablespace-in-place` keeps them all as directories inside the data directory (what
//! Postgres calls in-place tablespaces), which suits a scratch restore on the original host.
//! A location must be empty (any directory with `--delta`), so a restore never mixes its files
//! into a live cluster's tablespace.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::backup::Manifest;
use crate::backup::take::permissions;

/// Where a restore puts one tablespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablespaceLink {
    pub oid: u32,
    pub location: PathBuf,
}

/// How the user asked for tablespaces to be placed.
#[derive(Debug, Clone, Default)]
pub struct TablespacePlacement {
    pub remapped: BTreeMap<u32, PathBuf>,
    pub in_place: bool,
}

/// Parses `--tablespace-map OID=DIR`.
pub fn parse_mapping(text: &str) -> Result<(u32, PathBuf)> {
    let invalid = || {
        anyhow::anyhow!(
            "--tablespace-map '{text}' is not OID=DIR; give the tablespace's OID (see `pitr list --output json` or pg_tablespace) and an absolute directory"
        )
    };
    let (oid, directory) = text.split_once('=').ok_or_else(invalid)?;
    let oid = oid.trim().parse().map_err(|_| invalid())?;
    let directory = PathBuf::from(directory.trim());
    if !directory.is_absolute() {
        return Err(invalid());
    }
    Ok((oid, directory))
}

/// The tablespaces of `backup` as `tablespace_map` lists them, each line checked when the
/// manifest was read: the only links a restore creates, and so the only ones it writes through.
pub fn tablespaces_of(backup: &Manifest) -> Vec<TablespaceLink> {
    backup
        .tablespace_map
        .iter()
        .flat_map(|map| map.entries())
        .map(|tablespace| TablespaceLink {
            oid: tablespace.oid,
            location: tablespace.location.clone(),
        })
        .collect()
}

/// Decides every tablespace's location and checks that each can receive it; returns the links
/// to create (none for in-place tablespaces).
pub fn plan(
    backup: &Manifest,
    placement: &TablespacePlacement,
    pgdata: &Path,
    delta: bool,
) -> Result<Vec<TablespaceLink>> {
    let tablespaces = tablespaces_of(backup);
    for oid in placement.remapped.keys() {
        if !tablespaces.iter().any(|tablespace| tablespace.oid == *oid) {
            let known: Vec<String> = tablespaces
                .iter()
                .map(|tablespace| format!("{} ({})", tablespace.oid, tablespace.location.display()))
                .collect();
            bail!(
                "backup {} has no tablespace with OID {oid}; its tablespaces are: {}",
                backup.id,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
        }
    }
    if placement.in_place {
        return Ok(Vec::new());
    }
    let mut links = Vec::new();
    for tablespace in tablespaces {
        let location = placement
            .remapped
            .get(&tablespace.oid)
            .cloned()
            .unwrap_or(tablespace.location);
        check_location(tablespace.oid, &location, pgdata, delta)?;
        links.push(TablespaceLink {
            oid: tablespace.oid,
            location,
        });
    }
    Ok(links)
}

fn check_location(oid: u32, location: &Path, pgdata: &Path, delta: bool) -> Result<()> {
    if location.starts_with(pgdata) {
        bail!(
            "tablespace {oid} would be restored to {}, inside the data directory; use --tablespace-in-place for that, or --tablespace-map {oid}=DIR outside it",
            location.display()
        );
    }
    let entries = match std::fs::read_dir(location) {
        Ok(entries) => entries.count(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => {
            return Err(error).with_context(|| format!("reading {}", location.display()));
        }
    };
    if entries > 0 && !delta {
        bail!(
            "tablespace {oid} belongs at {}, which is not empty; restore it elsewhere with --tablespace-map {oid}=DIR, inside the data directory with --tablespace-in-place, or over it with --delta",
            location.display()
        );
    }
    Ok(())
}

/// Creates each location (mode 0700) and links `pg_tblspc/<oid>` to it, replacing whatever a
/// previous restore left there.
pub fn link(pgdata: &Path, links: &[TablespaceLink]) -> Result<()> {
    if links.is_empty() {
        return Ok(());
    }
    let directory = pgdata.join("pg_tblspc");
    std::fs::create_dir_all(&directory)?;
    for link in links {
        std::fs::create_dir_all(&link.location).with_context(|| {
            format!("creating tablespace directory {}", link.location.display())
        })?;
        std::fs::set_permissions(&link.location, permissions(0o700))?;
        let path = directory.join(link.oid.to_string());
        match std::fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.is_dir() => std::fs::remove_dir_all(&path)?,
            Ok(_) => std::fs::remove_file(&path)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error.into()),
        }
        std::os::unix::fs::symlink(&link.location, &path).with_context(|| {
            format!("linking {} to {}", path.display(), link.location.display())
        })?;
    }
    Ok(())
}
