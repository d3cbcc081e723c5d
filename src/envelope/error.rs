//! `EnvelopeError`: every way an object can fail to encode or decode, each message naming the
//! object and what to do, and `is_damaged_object`, which tells a damaged or forged object from
//! one this reader merely cannot use.

use std::io;

use crate::keyring::KeyId;

impl EnvelopeError {
    /// Whether the object itself is damaged or forged, so that storing a verified copy in its
    /// place loses nothing: a torn write, a flipped bit, a planted or moved object. An object
    /// under a key this keyring lacks, or of a newer format, may be valid and is never one; nor
    /// is one whose data key does not unwrap, since a keyring holding the right id with the
    /// wrong bytes (a mistyped copy) would otherwise replace valid objects.
    pub fn is_damaged_object(&self) -> bool {
        matches!(
            self,
            EnvelopeError::NotAnObject(_)
                | EnvelopeError::CorruptHeader(_)
                | EnvelopeError::NameMismatch { .. }
                | EnvelopeError::Unencrypted(_)
                | EnvelopeError::AuthenticationFailed { chunk: Some(_), .. }
                | EnvelopeError::Truncated(_)
                | EnvelopeError::ChecksumMismatch(_)
                | EnvelopeError::CorruptCompressedData(_)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error(
        "object {0} is not a pitr object (bad magic); something other than pitr wrote it, so it was not used"
    )]
    NotAnObject(String),
    #[error(
        "object {object} uses format version {version}, which this pitr does not read; upgrade pitr"
    )]
    UnsupportedVersion { object: String, version: u8 },
    #[error("object {0} has a corrupt header; it was not used (check the repository's storage)")]
    CorruptHeader(String),
    #[error(
        "object {object} holds data for {found}; it was renamed or copied from elsewhere and was not used"
    )]
    NameMismatch { object: String, found: String },
    #[error(
        "object {0} is encrypted but no keyring is configured; set PITR_KEY_FILE or --key-file"
    )]
    KeyringRequired(String),
    #[error(
        "object {0} is not encrypted, but this repository is; it was refused as forged (anyone who can write to the storage can plant such an object): delete it, archive it again from its source, and check who can write to the repository"
    )]
    Unencrypted(String),
    #[error(
        "object {object} is encrypted with key {key_id}, which the keyring does not hold; use the keyring the repository was written with"
    )]
    UnknownKey { object: String, key_id: KeyId },
    #[error("object {object} failed authentication{}; it is corrupt, truncated or was tampered with, and was not used", chunk.map(|c| format!(" at chunk {c}")).unwrap_or_default())]
    AuthenticationFailed { object: String, chunk: Option<u32> },
    #[error(
        "object {0} is truncated; it was not used (the upload was cut short or the storage lost data)"
    )]
    Truncated(String),
    #[error("object {0} failed its plaintext checksum; it is corrupt and was not used")]
    ChecksumMismatch(String),
    #[error("object {0} holds corrupt compressed data; it was not used")]
    CorruptCompressedData(String),
    #[error(
        "{object} changed while it was being encoded ({expected} bytes expected, {found} read); retry"
    )]
    SourceChanged {
        object: String,
        expected: u64,
        found: u64,
    },
    #[error("reading the source failed: {0}")]
    Source(io::Error),
    #[error("{0}")]
    Sink(io::Error),
}

/// Recovers an `EnvelopeError` that crossed an `io::Read`/`io::Write` boundary.
pub(super) fn unwrap_io(error: io::Error) -> EnvelopeError {
    match error.downcast::<EnvelopeError>() {
        Ok(inner) => inner,
        Err(other) => EnvelopeError::Source(other),
    }
}

/// During decoding, an io error that is not ours came from zstd: the compressed data is bad.
pub(super) fn corrupt_unless_wrapped(error: io::Error, object: &str) -> EnvelopeError {
    match error.downcast::<EnvelopeError>() {
        Ok(inner) => inner,
        Err(_) => EnvelopeError::CorruptCompressedData(object.to_string()),
    }
}
