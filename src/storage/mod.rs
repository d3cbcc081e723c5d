//! The storage contract: what pitr needs from a place that keeps named objects, and nothing
//! more. `repository` (identity, envelopes, the key layout) sits on top of it and is the only
//! caller; nothing above the repository talks to a store.
//!
//! One implementation, [`ObjectStorage`], serves every URL scheme through object_store
//! (`file://`, `s3://`, `gs://`, `az://`, and an in-memory store for unit tests). The
//! conformance suite (`tests/storage_conformance.rs`) runs the whole contract below against
//! every backend that can run on a developer machine.
//!
//! # Contract
//!
//! Keys are `/`-separated relative names (`wal/00000001/000000010000000000000001`); a store
//! adds its own prefix (the path of the repository URL) and never shows it to the caller.
//!
//! * **Create-only put** ([`Storage::put_create`]): the object is stored under its name only
//!   if the name is free. `Created` means this call stored it; `AlreadyExists` means the name
//!   was taken, and the object there is left exactly as it was (the caller compares contents).
//!   With [`Durability::Immediate`] the object under the name, this call's or the one already
//!   there, is durable when the call returns. A name is never visible before its whole body is
//!   stored and durable: a write that fails, times out or is cancelled (its future dropped)
//!   leaves either nothing or the complete object under the name. A lost response may hide a
//!   write that landed; the store then answers `AlreadyExists`, never an error.
//! * **Get** ([`Storage::get`], [`Storage::get_bytes`]): the whole object as stored, as a
//!   local file or a stream of its bytes. `NotFound` when nothing has the name. A stream that
//!   stalls longer than the store's timeout ends with `Unreachable`. Get does not verify: the
//!   envelope above proves every byte.
//! * **Head** ([`Storage::head`]): size and version of one object; `NotFound` when absent.
//! * **List** ([`Storage::list`]): every object whose key lies under the prefix by
//!   whole path segments (`wal/00000001` lists `wal/00000001/…`, never `wal/000000010/…`),
//!   sorted by key, keys relative to the store. Objects being written are never listed.
//! * **Delete** ([`Storage::delete`], [`Storage::delete_many`]): idempotent; deleting a name
//!   that does not exist succeeds, so a retried delete is safe. `delete_many` deletes a list
//!   with as few requests as the store allows (S3 batches a thousand keys per request) and
//!   fails at the first key it could not delete; keys before it may be gone.
//! * **Conditional update** ([`Storage::update`]): replaces the object only if it is still at
//!   the version the caller read with `head` (ETag and, where the store keeps them, version
//!   id). `Precondition` when it changed or is gone. Like every write, the new object is
//!   complete and durable before it is visible, and a reader sees the old or the new one,
//!   never a mix. On `file://` this is a rename over the old file after a version check, both
//!   under an exclusive lock (`tmp/.update.lock`) that every updating pitr takes, so two
//!   updates of one version can never both succeed. The version to expect comes from
//!   [`Storage::get_bytes_versioned`] (or `head`).
//!   The lease to come relies on this.
//! * **Durability** ([`Storage::sync_deferred`], [`Storage::make_durable`]): a
//!   [`Durability::Deferred`] write is durable once `sync_deferred` returns; `make_durable`
//!   makes one existing object durable (a no-op on remote stores, which acknowledge a write
//!   only once it is durable).
//!
//! Every operation finishes within the store's timeout or fails with
//! [`StorageError::TimedOut`]. The error kinds, and what a caller may do about each:
//!
//! | kind | meaning | heals by waiting? |
//! | --- | --- | --- |
//! | `NotFound` | no object has the name | no |
//! | `AlreadyExists` | the name is taken (`put_create` reports this as its outcome, not an error) | no |
//! | `Precondition` | a conditional update found another version | no |
//! | `Denied` | the store refused the credentials or the permission (401, 403; an expired session token, which S3 answers with 400; credentials that could not be obtained; EACCES on `file://`) | no |
//! | `Unreachable` | transport failure, dropped connection, server error (5xx) | yes |
//! | `TimedOut` | no answer within the store's timeout | yes |
//! | `Unsupported` | the store cannot do this, or a bad request or option | no |
//! | `Sync` | a local fsync failed: the object may not be durable | no |

mod object;

use std::io;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

pub use object::{ObjectStorage, OpenError, StoreConfig};

/// When a create-only write becomes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Before the write returns (on `file://`: the object and every directory on its path).
    Immediate,
    /// At the next `sync_deferred`, which the caller must await before it acknowledges
    /// anything that refers to the object.
    Deferred,
}

/// The result of a create-only write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    AlreadyExists,
}

/// Which stored version of an object a conditional update expects to replace.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObjectVersion {
    pub e_tag: Option<String>,
    pub version: Option<String>,
}

/// One stored object, as `head` and `list` describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Relative to the store's prefix.
    pub key: String,
    pub size: u64,
    pub version: ObjectVersion,
}

/// The body of an object: an open local file, or a stream from a remote store.
pub enum Body {
    File(std::fs::File),
    Stream(BoxStream<'static, Result<Bytes, StorageError>>),
}

/// What went wrong, by kind; see the table in the module's `# Contract`.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object not found")]
    NotFound,
    #[error("the object already exists")]
    AlreadyExists,
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("did not finish within {} s", .0.as_secs())]
    TimedOut(Duration),
    #[error("{0}")]
    Unsupported(String),
    #[error("fsync of {key} failed: {source}")]
    Sync { key: String, source: io::Error },
}

impl StorageError {
    /// Whether the same request may succeed later: the store could not be reached or did not
    /// answer in time. Every other kind is final.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StorageError::Unreachable(_) | StorageError::TimedOut(_)
        )
    }
}

pub type StorageResult<T> = Result<T, StorageError>;

/// A place that keeps named objects; see the module's `# Contract` for what every method
/// promises. Object-safe, so a repository holds `Arc<dyn Storage>`.
pub trait Storage: Send + Sync + 'static {
    /// Stores `parts` (one object's bytes, in order) under `key` if the name is free.
    fn put_create<'a>(
        &'a self,
        key: &'a str,
        parts: Vec<Bytes>,
        durability: Durability,
    ) -> BoxFuture<'a, StorageResult<PutOutcome>>;

    /// Replaces the object at `key` with `parts` if it is still at version `expected`.
    fn update<'a>(
        &'a self,
        key: &'a str,
        parts: Vec<Bytes>,
        expected: &'a ObjectVersion,
    ) -> BoxFuture<'a, StorageResult<()>>;

    /// The object at `key`, as a local file or a stream.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StorageResult<Body>>;

    /// The whole object at `key` in memory.
    fn get_bytes<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StorageResult<Bytes>>;

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StorageResult<ObjectInfo>>;
    /// The whole object and the version these bytes are, from one read: what a conditional
    /// update must expect, so that it replaces exactly what was read.
    fn get_bytes_versioned<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, StorageResult<(Bytes, ObjectVersion)>>;

    /// Every object under `prefix` (whole path segments; `""` for all), sorted by key.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, StorageResult<Vec<ObjectInfo>>>;

    /// Removes the object at `key`; succeeds when there is none.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StorageResult<()>>;

    /// Removes every object in `keys`, as `delete` does each; a store that deletes many in
    /// one request (S3's DeleteObjects, a thousand at a time) does so.
    fn delete_many(&self, keys: Vec<String>) -> BoxFuture<'_, StorageResult<()>>;

    /// Makes every `Durability::Deferred` write so far durable.
    fn sync_deferred(&self) -> BoxFuture<'_, StorageResult<()>>;

    /// Makes the existing object at `key` durable.
    fn make_durable<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StorageResult<()>>;

    /// Whether the objects are files on a local filesystem, where a stat or a read costs no
    /// round trip.
    fn is_local(&self) -> bool;

    /// Whether `key` exists, asked only where that costs nothing (a local stat); always false
    /// on a remote store.
    fn exists_locally(&self, key: &str) -> bool;
}

/// object_store errors nest their causes; keep the message on one line, as hooks log it.
pub fn one_line(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}
