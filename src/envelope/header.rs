//! The object header: its byte layout (docs/FORMAT.md section 2), written by `to_bytes` and
//! read back, CRC and version checked, by `read_from`. The header is the associated data of
//! every sealed chunk, so everything here is authenticated along with the body.

use std::io::Read;

use super::checksum::{Checksum, ContentSummary};
use super::{EnvelopeError, read_full};
use crate::keyring::KeyId;

pub const MAGIC: [u8; 4] = *b"PITR";
/// The version pitr writes. It names the plaintext checksum: v1 objects carry BLAKE3-256 and are
/// read as before; v2 objects carry XXH3-128, a third of the CPU on every read and write.
pub const FORMAT_VERSION: u8 = 2;
const BLAKE3_FORMAT_VERSION: u8 = 1;
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
pub(super) const FIXED_HEADER_LEN: usize = 130;
pub(super) const MAX_CHUNK_SIZE: u32 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    None = 0,
    Aes256GcmStream = 1,
}

/// The decoded header of a stored object.
#[derive(Debug, Clone)]
pub struct Header {
    pub compression: Compression,
    pub cipher: Cipher,
    pub chunk_size: u32,
    pub content: ContentSummary,
    pub key_id: Option<KeyId>,
    pub(super) wrap_nonce: [u8; 12],
    pub(super) wrapped_key: [u8; 48],
    pub(super) stream_nonce: [u8; 7],
    pub object_name: String,
}

impl Header {
    pub(super) fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(FIXED_HEADER_LEN + self.object_name.len() + 4);
        bytes.extend_from_slice(&MAGIC);
        bytes.push(format_version_of(&self.content.checksum));
        bytes.push(self.compression as u8);
        bytes.push(self.cipher as u8);
        bytes.push(0);
        bytes.extend_from_slice(&self.chunk_size.to_le_bytes());
        bytes.extend_from_slice(&self.content.length.to_le_bytes());
        bytes.extend_from_slice(&checksum_field(&self.content.checksum));
        bytes.extend_from_slice(&self.key_id.map_or(0, |id| id.0).to_le_bytes());
        bytes.extend_from_slice(&self.wrap_nonce);
        bytes.extend_from_slice(&self.wrapped_key);
        bytes.extend_from_slice(&self.stream_nonce);
        bytes.push(0);
        bytes.extend_from_slice(&(self.object_name.len() as u16).to_le_bytes());
        bytes.extend_from_slice(self.object_name.as_bytes());
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// The header as the data key's wrapping authenticates it: everything but the wrapped key.
    pub(super) fn wrap_context(&self) -> Vec<u8> {
        let mut unwrapped = self.clone();
        unwrapped.wrap_nonce = [0; 12];
        unwrapped.wrapped_key = [0; 48];
        unwrapped.to_bytes()
    }

    pub(super) fn read_from(
        source: &mut impl Read,
        object: &str,
    ) -> Result<(Self, Vec<u8>), EnvelopeError> {
        let mut bytes = vec![0u8; FIXED_HEADER_LEN];
        let filled = read_full(source, &mut bytes).map_err(EnvelopeError::Source)?;
        if filled >= 4 && bytes[..4] != MAGIC {
            return Err(EnvelopeError::NotAnObject(object.to_string()));
        }
        if filled < FIXED_HEADER_LEN {
            return Err(EnvelopeError::Truncated(object.to_string()));
        }
        let name_length = usize::from(u16::from_le_bytes([bytes[128], bytes[129]]));
        bytes.resize(FIXED_HEADER_LEN + name_length + 4, 0);
        if read_full(source, &mut bytes[FIXED_HEADER_LEN..]).map_err(EnvelopeError::Source)?
            < name_length + 4
        {
            return Err(EnvelopeError::Truncated(object.to_string()));
        }
        let (body, crc) = bytes.split_at(FIXED_HEADER_LEN + name_length);
        // A version this reader does not know may lay the header out differently, so a CRC
        // mismatch means "unknown version" only when the version byte is not ours.
        if bytes[4] != FORMAT_VERSION && bytes[4] != BLAKE3_FORMAT_VERSION {
            return Err(EnvelopeError::UnsupportedVersion {
                object: object.to_string(),
                version: bytes[4],
            });
        }
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err(EnvelopeError::CorruptHeader(object.to_string()));
        }
        let corrupt = || EnvelopeError::CorruptHeader(object.to_string());
        let header = Header {
            compression: match bytes[5] {
                0 => Compression::None,
                1 => Compression::Zstd,
                _ => return Err(corrupt()),
            },
            cipher: match bytes[6] {
                0 => Cipher::None,
                1 => Cipher::Aes256GcmStream,
                _ => return Err(corrupt()),
            },
            chunk_size: u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
            content: ContentSummary {
                length: u64::from_le_bytes(bytes[12..20].try_into().unwrap()),
                checksum: match bytes[4] {
                    BLAKE3_FORMAT_VERSION => Checksum::Blake3(bytes[20..52].try_into().unwrap()),
                    _ if bytes[36..52] != [0; 16] => return Err(corrupt()),
                    _ => Checksum::Xxh3(bytes[20..36].try_into().unwrap()),
                },
            },
            key_id: match u64::from_le_bytes(bytes[52..60].try_into().unwrap()) {
                0 => None,
                id => Some(KeyId(id)),
            },
            wrap_nonce: bytes[60..72].try_into().unwrap(),
            wrapped_key: bytes[72..120].try_into().unwrap(),
            stream_nonce: bytes[120..127].try_into().unwrap(),
            object_name: String::from_utf8(
                bytes[FIXED_HEADER_LEN..FIXED_HEADER_LEN + name_length].to_vec(),
            )
            .map_err(|_| corrupt())?,
        };
        if header.chunk_size == 0 || header.chunk_size > MAX_CHUNK_SIZE {
            return Err(corrupt());
        }
        Ok((header, bytes))
    }
}

/// The format version a checksum's algorithm is written under.
fn format_version_of(checksum: &Checksum) -> u8 {
    match checksum {
        Checksum::Blake3(_) => BLAKE3_FORMAT_VERSION,
        Checksum::Xxh3(_) => FORMAT_VERSION,
    }
}

/// The header's 32-byte checksum field: the digest, then zeros.
fn checksum_field(checksum: &Checksum) -> [u8; 32] {
    let mut field = [0u8; 32];
    field[..checksum.as_bytes().len()].copy_from_slice(checksum.as_bytes());
    field
}

/// Reads only an object's header, without verifying its body.
pub fn read_header<R: Read>(mut source: R, expected_name: &str) -> Result<Header, EnvelopeError> {
    Header::read_from(&mut source, expected_name).map(|(header, _)| header)
}
