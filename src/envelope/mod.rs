//! The object envelope, format v2: how plaintext becomes a stored object and back.
//!
//! Every object pitr stores goes through this one codec: a self-describing header, then the body,
//! compressed with zstd and then encrypted with AES-256-GCM in the STREAM construction (a 7-byte
//! nonce prefix, a 32-bit chunk counter and a last-chunk flag). Each object has its own random
//! data key, wrapped by the keyring's newest key, so nonces never repeat under one key however
//! many objects are written. The whole header is the associated data of every chunk: editing it,
//! reordering chunks or cutting the object short all fail authentication. The plaintext length
//! and checksum in the header are verified after decoding as a second, independent check: XXH3-128
//! in format v2 (what pitr writes), BLAKE3-256 in v1 (still read).
//! Encoding and decoding both stream; memory is a few chunks whatever the object's size, except
//! that a local WAL segment may be decoded into one pooled buffer of its length (`DecodeMode`).
//! docs/FORMAT.md is the byte-level specification and must change with this file.
//!
//! One file per concern: `header` (the byte layout), `checksum` (the plaintext's length and
//! checksum), `cipher` (data keys and sealed chunks), `compression` (zstd), and the two
//! directions that compose them, `seal` (compress, then encrypt) and `open` (decrypt, then
//! decompress, then verify). `error` holds `EnvelopeError`.

use std::io::{self, Read, Write};

mod checksum;
mod cipher;
mod compression;
mod error;
mod header;
mod open;
mod seal;

pub use checksum::{Checksum, ChecksumAlgorithm, ContentSummary, PlaintextHasher, SummarySink};
pub use error::EnvelopeError;
use error::{corrupt_unless_wrapped, unwrap_io};
pub use header::{
    Cipher, Compression, DEFAULT_CHUNK_SIZE, FORMAT_VERSION, Header, MAGIC, read_header,
};
pub use open::{DecodeMode, authenticate, decode};
pub use seal::{EncodeOptions, encode, encode_bytes, encode_file};

/// The size of the buffers plaintext and unencrypted bodies are copied through.
const COPY_BUFFER: usize = 256 << 10;

/// Copies `source` to `sink` through one buffer, returning how many bytes went across.
fn copy_bounded(source: &mut impl Read, sink: &mut impl Write) -> io::Result<u64> {
    let mut buffer = vec![0u8; COPY_BUFFER];
    let mut total = 0u64;
    loop {
        let count = match source.read(&mut buffer) {
            Ok(0) => return Ok(total),
            Ok(count) => count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        sink.write_all(&buffer[..count])?;
        total += count as u64;
    }
}

/// Fills `buffer` as far as `source` goes; fewer bytes than its length means the end was reached.
fn read_full(source: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match source.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(count) => filled += count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests;
