//! Builds a synthetic encrypted repository for `bench/expire_bench.sh`: `WAL` segment objects on
//! timeline 1 (one every 36 s, ending now), and `BACKUPS` backups spread evenly over them, each
//! with a manifest of one file in two chunks (one shared by every backup, one its own). The
//! objects are real envelopes under the given keyring, so pitr reads them as its own; the WAL
//! objects hold a few bytes, not segments, which listing and expire never read.
//!
//! usage: cargo run --release --example synthetic_repository -- DIR KEYRING WAL BACKUPS
//! writes a `file://` repository at DIR (an s3s-fs bucket directory serves it as S3).

use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use pitr::backup::{ChunkId, Manifest, ManifestFile, ManifestPath};
use pitr::config::{GlobalOptions, Settings};
use pitr::envelope::EncodeOptions;
use pitr::repository::layout::{self, BackupId};
use pitr::repository::{Durability, Identity, Repository};
use pitr::wal::{
    Lsn, PgVersion, SegmentName, SystemIdentifier, TimelineId, WalFileName, WalSegmentSize,
};

const SIZE: WalSegmentSize = WalSegmentSize(16 << 20);
const SECONDS_PER_SEGMENT: i64 = 36;
const IN_FLIGHT: usize = 64;

#[tokio::main]
async fn main() -> Result<()> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let [directory, keyring, wal, backups] = arguments.as_slice() else {
        anyhow::bail!("usage: synthetic_repository DIR KEYRING WAL BACKUPS");
    };
    let wal: u64 = wal.parse().context("WAL is a count")?;
    let backups: u64 = backups.parse().context("BACKUPS is a count")?;
    let settings = Settings::resolve(&GlobalOptions {
        repo: Some(format!("file://{directory}")),
        key_file: Some(keyring.into()),
        ..GlobalOptions::default()
    })?;
    let repository = Arc::new(Repository::open(&settings)?);
    let identity = Identity::new(
        SystemIdentifier(7_400_000_000_000_000_001),
        PgVersion(15),
        SIZE,
        repository.keyring(),
    );
    repository.ensure_identity(&identity).await?;
    let now = chrono::Utc::now();
    let time_of =
        |number: u64| now - chrono::Duration::seconds((wal - number) as i64 * SECONDS_PER_SEGMENT);
    let options = EncodeOptions::default();

    let segments = (1..=wal).map(|number| {
        let name = WalFileName::Segment(SegmentName::from_segment_number(
            TimelineId(1),
            number,
            SIZE,
        ));
        (
            layout::wal(&name),
            Bytes::from(format!("synthetic segment {number}")),
        )
    });
    let shared = ChunkId::of(b"shared chunk", repository.keyring());
    let mut manifests = Vec::new();
    let mut chunks = vec![(shared.key(), Bytes::from_static(b"shared chunk"))];
    let spacing = (wal / backups.max(1)).max(3);
    for index in 0..backups {
        let start = 1 + index * spacing;
        let own = format!("chunk of backup {index}");
        let own_id = ChunkId::of(own.as_bytes(), repository.keyring());
        chunks.push((own_id.key(), Bytes::from(own.clone())));
        let stop_time = time_of(start + 1);
        let manifest = Manifest {
            format_version: 1,
            id: BackupId(format!("{}{index:06}", stop_time.format("%Y%m%dT%H%M%S"))),
            label: format!("synthetic {index}"),
            system_identifier: identity.system_identifier,
            pg_version: 15,
            timeline: TimelineId(1),
            start_lsn: Lsn(start * u64::from(SIZE.0) + 0x28),
            stop_lsn: Lsn((start + 1) * u64::from(SIZE.0) + 0x100),
            start_time: time_of(start),
            stop_time,
            logical_bytes: 2 << 20,
            uploaded_bytes: 1 << 20,
            reused_chunks: 1,
            new_chunks: 1,
            based_on: None,
            directories: vec![ManifestPath::parse("base").unwrap()],
            files: vec![ManifestFile {
                path: ManifestPath::parse("base/synthetic").unwrap(),
                size: 2 << 20,
                mode: 0o600,
                checksum: "0".repeat(64),
                chunks: vec![shared.clone(), own_id],
            }],
            backup_label: String::new(),
            tablespace_map: None,
        };
        manifests.push((
            manifest.id.manifest_key(),
            Bytes::from(serde_json::to_vec(&manifest)?),
        ));
    }
    let objects = segments.chain(chunks).chain(manifests);
    futures::stream::iter(objects)
        .map(|(key, bytes)| {
            let repository = Arc::clone(&repository);
            let options = options.clone();
            async move {
                repository
                    .put_bytes_with(&key, bytes, &options, Durability::Deferred)
                    .await
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await?;
    repository.sync_deferred().await?;
    println!("{wal} WAL objects, {backups} backups, one every {spacing} segments, in {directory}");
    Ok(())
}
