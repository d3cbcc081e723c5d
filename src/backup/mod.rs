//! Base backups: what a backup is (its manifest), where it lives, and the catalog of them.
//!
//! A backup's file data lives in content-addressed chunks under `chunks/`, shared by every
//! backup that holds the same bytes, so a second backup uploads only what changed. Its manifest
//! (`backups/<id>/manifest`) lists every file with its size, checksum and chunks, plus the LSNs,
//! timeline and times recovery needs. The manifest is written last, through the envelope like
//! everything else: a backup without one does not exist. The catalog is the list of manifests.

pub mod page_checksum;
pub mod paths;
pub mod take;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::keyring::Keyring;
pub use crate::repository::layout::{BACKUP_PREFIX, BackupId, CHUNK_PREFIX, ChunkId};
use crate::repository::{Repository, layout};
use crate::wal::{Lsn, SystemIdentifier, TimelineId};
pub use paths::{ManifestPath, Tablespace, TablespaceMap};

/// Files are cut into chunks of this size; a changed page re-uploads only its chunk.
pub const CHUNK_SIZE: usize = 1 << 20;

/// The id of a chunk is a keyed BLAKE3 hash of its content, so that chunk names reveal nothing
/// about the data to someone without the keyring.
impl ChunkId {
    pub fn of(content: &[u8], keyring: Option<&Keyring>) -> Self {
        let hash = match keyring {
            Some(keyring) => {
                let key = blake3::derive_key(
                    "pitr chunk id v1",
                    &keyring.newest().check_value_material(),
                );
                blake3::keyed_hash(&key, content)
            }
            None => blake3::hash(content),
        };
        ChunkId(hash.to_hex().to_string())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Relative to the data directory, `/`-separated, checked clean when the manifest is read.
    pub path: ManifestPath,
    pub size: u64,
    pub mode: u32,
    /// BLAKE3 of the whole file as backed up.
    pub checksum: String,
    pub chunks: Vec<ChunkId>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub id: BackupId,
    pub label: String,
    pub system_identifier: SystemIdentifier,
    pub pg_version: u32,
    pub timeline: TimelineId,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    pub start_time: chrono::DateTime<chrono::Utc>,
    pub stop_time: chrono::DateTime<chrono::Utc>,
    pub logical_bytes: u64,
    pub uploaded_bytes: u64,
    pub reused_chunks: u64,
    pub new_chunks: u64,
    /// The backup whose chunks this one reused, if any.
    pub based_on: Option<BackupId>,
    pub directories: Vec<ManifestPath>,
    pub files: Vec<ManifestFile>,
    pub backup_label: String,
    pub tablespace_map: Option<TablespaceMap>,
}

/// A manifest that cannot be used. Typed so that a caller can tell a refused path apart.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "backup {backup} is refused: its manifest {detail}; the manifest is damaged or forged, and nothing was written. Find out who wrote {key} in the repository, then delete it to use the other backups"
    )]
    Refused {
        backup: String,
        key: String,
        detail: String,
    },
    #[error("{key} is not a valid manifest: {detail}")]
    Invalid { key: String, detail: String },
}

impl Manifest {
    pub fn incremental(&self) -> bool {
        self.reused_chunks > 0
    }

    /// Parses the manifest stored under `key`. Every path and tablespace entry is checked here,
    /// so a manifest naming anything outside the data directory is refused as a whole, before a
    /// restore writes anything.
    pub fn from_json(key: &str, bytes: &[u8]) -> Result<Manifest, ManifestError> {
        serde_json::from_slice(bytes).map_err(|error| match refused_entry(bytes) {
            Some(detail) => ManifestError::Refused {
                backup: layout::manifest_backup(key).map_or_else(|| key.to_string(), |id| id.0),
                key: key.to_string(),
                detail,
            },
            None => ManifestError::Invalid {
                key: key.to_string(),
                detail: error.to_string(),
            },
        })
    }
}

/// Why a manifest that failed to parse was refused, if a path or tablespace entry is the cause:
/// the first one refused, described without serde's position in the text.
fn refused_entry(bytes: &[u8]) -> Option<String> {
    let manifest: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let file_paths = manifest["files"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|file| &file["path"]);
    let directories = manifest["directories"].as_array().into_iter().flatten();
    let path_refusal = file_paths
        .chain(directories)
        .filter_map(serde_json::Value::as_str)
        .find_map(|path| ManifestPath::parse(path).err())
        .map(|refused| refused.to_string());
    path_refusal.or_else(|| {
        let map = manifest["tablespace_map"].as_str()?;
        TablespaceMap::parse(map)
            .err()
            .map(|refused| refused.to_string())
    })
}

/// Every complete backup, oldest first. The manifests are read several at a time: on a remote
/// store each read is a round trip, and a repository may hold a thousand backups.
pub async fn catalog(repository: &Repository) -> Result<Vec<Manifest>> {
    use futures::{StreamExt, TryStreamExt};
    let keys: Vec<String> = repository
        .list(BACKUP_PREFIX)
        .await?
        .iter()
        .map(|meta| repository.relative_key(meta).to_string())
        .filter(|key| layout::manifest_backup(key).is_some())
        .collect();
    let mut manifests: Vec<Manifest> = futures::stream::iter(keys)
        .map(|key| async move {
            let bytes = repository
                .read_bytes(&key)
                .await?
                .with_context(|| format!("{key} disappeared while listing backups"))?;
            Ok::<_, anyhow::Error>(Manifest::from_json(&key, &bytes)?)
        })
        .buffered(repository.transfers_in_flight(1))
        .try_collect()
        .await?;
    manifests.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(manifests)
}
