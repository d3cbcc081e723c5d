//! Sealing, plaintext to stored object: compress, then encrypt. `encode` streams from any
//! reader; `encode_file` and `encode_bytes` compress first and seal the compressed body in
//! place once its checksum (which the header, the associated data of every chunk, carries) is
//! known.

use std::io::{self, Read, Write};
use std::path::Path;

use aead_stream::StreamBE32;
use aes_gcm::Aes256Gcm;
use bytes::Bytes;

use super::checksum::{ChecksumAlgorithm, ContentSummary, SummarySink};
use super::cipher::{ChunkSealer, encrypt_chunks_in_place, wrap_new_data_key};
use super::header::{Cipher, Compression, DEFAULT_CHUNK_SIZE, Header, MAX_CHUNK_SIZE};
use super::{EnvelopeError, compression, copy_bounded, read_full, unwrap_io};
use crate::buffer_pool::BufferPool;
use crate::keyring::Keyring;

/// Tuning for encoding; none of it is needed to decode.
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    pub compression_level: i32,
    /// zstd worker threads; 0 compresses on the calling thread.
    pub compression_workers: u32,
    pub chunk_size: u32,
    /// With no zstd workers, compress a file of up to 64 MiB in one call from a reused buffer.
    /// Worth it in a long-lived process (the daemon); a short-lived hook would only pay for
    /// faulting in the buffers.
    pub whole_files: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            compression_level: 1,
            compression_workers: 0,
            chunk_size: DEFAULT_CHUNK_SIZE,
            whole_files: false,
        }
    }
}

/// Encodes `source`, whose length and checksum are `content`, as the object `object_name`.
/// Without a keyring the body is compressed and checksummed but not encrypted.
pub fn encode<R: Read, W: Write>(
    mut source: R,
    content: ContentSummary,
    object_name: &str,
    keyring: Option<&Keyring>,
    options: &EncodeOptions,
    sink: W,
) -> Result<W, EnvelopeError> {
    let sealer = begin_sealing(content, object_name, keyring, options, sink)?;
    let mut encoder = compression::encoder(sealer, options)?;
    let copied = copy_bounded(&mut source, &mut encoder).map_err(unwrap_io)?;
    if copied != content.length {
        return Err(EnvelopeError::SourceChanged {
            object: object_name.to_string(),
            expected: content.length,
            found: copied,
        });
    }
    let sealer = encoder.finish().map_err(unwrap_io)?;
    sealer.finish().map_err(unwrap_io)
}

/// Encodes a file in one read: each piece is hashed and compressed as it is read, the
/// compressed body is held in memory, and sealing follows once the checksum that the header
/// (the authenticated data of every chunk) carries is known; chunks are sealed in place.
/// Returns the file's summary and the encoded object as parts in order. Memory is the
/// compressed size plus a read buffer, whatever the file's size.
pub fn encode_file(
    path: &Path,
    object_name: &str,
    keyring: Option<&Keyring>,
    options: &EncodeOptions,
) -> Result<(ContentSummary, Vec<Bytes>), EnvelopeError> {
    let file = std::fs::File::open(path).map_err(EnvelopeError::Source)?;
    let length_hint = file.metadata().map(|meta| meta.len()).unwrap_or(0);
    if options.whole_files && options.compression_workers == 0 && length_hint <= WHOLE_FILE_LIMIT {
        return encode_whole_file(file, length_hint, object_name, keyring, options);
    }
    encode_streaming(file, length_hint, object_name, keyring, options)
}

/// `encode_file` in pieces of `FILE_READ_PIECE`.
fn encode_streaming(
    mut file: std::fs::File,
    length_hint: u64,
    object_name: &str,
    keyring: Option<&Keyring>,
    options: &EncodeOptions,
) -> Result<(ContentSummary, Vec<Bytes>), EnvelopeError> {
    let mut hasher = SummarySink::new(ChecksumAlgorithm::CURRENT);
    let mut encoder =
        compression::encoder(Vec::with_capacity((length_hint / 8) as usize), options)?;
    let mut buffer = vec![0u8; FILE_READ_PIECE];
    loop {
        let count = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(EnvelopeError::Source(error)),
        };
        hasher
            .write_all(&buffer[..count])
            .map_err(EnvelopeError::Source)?;
        encoder
            .write_all(&buffer[..count])
            .map_err(EnvelopeError::Sink)?;
    }
    let compressed = encoder.finish().map_err(EnvelopeError::Sink)?;
    let content = hasher.summary();
    let (header_bytes, chunk_size, stream) = new_header(content, object_name, keyring, options);
    let parts = seal_in_place(compressed, header_bytes, chunk_size, stream)?;
    Ok((content, parts))
}

/// `encode_file` reads in pieces this large: few system calls, and zstd gets whole blocks.
const FILE_READ_PIECE: usize = 1 << 20;

/// Files up to this size (every WAL segment of the default 16 MiB) are compressed in one call
/// when compressing on one thread: streaming them through zstd's window buffer sends most blocks
/// down its slower external-dictionary path.
const WHOLE_FILE_LIMIT: u64 = 64 << 20;

/// Buffers for whole files, kept for reuse so a busy daemon does not fault in fresh memory for
/// every segment (and backed by huge pages, see `buffer_pool`). The budget holds one file at
/// the limit or four 16 MiB segments at once; an encode that finds it spent streams its file.
static WHOLE_READ_BUFFERS: BufferPool = BufferPool::new(WHOLE_FILE_LIMIT as usize);

pub(super) fn encode_whole_file(
    mut file: std::fs::File,
    length_hint: u64,
    object_name: &str,
    keyring: Option<&Keyring>,
    options: &EncodeOptions,
) -> Result<(ContentSummary, Vec<Bytes>), EnvelopeError> {
    let Some(mut plaintext) = WHOLE_READ_BUFFERS.take(length_hint as usize) else {
        return encode_streaming(file, length_hint, object_name, keyring, options);
    };
    let length = read_full(&mut file, &mut plaintext).map_err(EnvelopeError::Source)?;
    // A file that grew after its length was read would be archived cut short.
    let mut probe = [0u8; 1];
    if length == plaintext.len()
        && read_full(&mut file, &mut probe).map_err(EnvelopeError::Source)? > 0
    {
        return Err(EnvelopeError::SourceChanged {
            object: object_name.to_string(),
            expected: length_hint,
            found: length_hint + 1,
        });
    }
    encode_bytes(&plaintext[..length], object_name, keyring, options)
}

/// `encode` for plaintext already in memory. On one thread the whole input is compressed in one
/// call, which is faster than streaming it in pieces (zstd then never copies input into its
/// window buffer). Returns the summary and the object as parts in order (see `seal_in_place`).
pub fn encode_bytes(
    plaintext: &[u8],
    object_name: &str,
    keyring: Option<&Keyring>,
    options: &EncodeOptions,
) -> Result<(ContentSummary, Vec<Bytes>), EnvelopeError> {
    let content = ContentSummary::of_bytes(plaintext);
    let compressed = compression::compress_whole(plaintext, options)?;
    let (header_bytes, chunk_size, stream) = new_header(content, object_name, keyring, options);
    let parts = seal_in_place(compressed, header_bytes, chunk_size, stream)?;
    Ok((content, parts))
}

/// Writes the header (with a fresh wrapped data key when encrypting) and returns the writer
/// that seals the compressed body into authenticated chunks.
fn begin_sealing<W: Write>(
    content: ContentSummary,
    object_name: &str,
    keyring: Option<&Keyring>,
    options: &EncodeOptions,
    mut sink: W,
) -> Result<ChunkSealer<W>, EnvelopeError> {
    let (header_bytes, chunk_size, stream) = new_header(content, object_name, keyring, options);
    sink.write_all(&header_bytes).map_err(EnvelopeError::Sink)?;
    Ok(ChunkSealer::new(sink, chunk_size, stream, header_bytes))
}

/// A new object's header bytes, its chunk size, and the cipher for its chunks (with a fresh
/// data key, wrapped into the header, when encrypting).
pub(super) fn new_header(
    content: ContentSummary,
    object_name: &str,
    keyring: Option<&Keyring>,
    options: &EncodeOptions,
) -> (Vec<u8>, usize, Option<StreamBE32<Aes256Gcm>>) {
    let mut header = Header {
        compression: Compression::Zstd,
        cipher: Cipher::None,
        chunk_size: options.chunk_size.clamp(1, MAX_CHUNK_SIZE),
        content,
        key_id: None,
        wrap_nonce: [0; 12],
        wrapped_key: [0; 48],
        stream_nonce: [0; 7],
        object_name: object_name.to_string(),
    };
    let stream = keyring.map(|keyring| wrap_new_data_key(&mut header, keyring));
    (header.to_bytes(), header.chunk_size as usize, stream)
}

/// Seals a compressed body where it lies: each chunk is encrypted in place and its tag kept
/// aside, and the object is returned as parts (header, then each chunk followed by its tag)
/// that share the body's memory, ready for a multi-part put. The chunking is `ChunkSealer`'s:
/// full chunks, the last one flagged, an empty body sealed as one empty last chunk.
pub(super) fn seal_in_place(
    mut body: Vec<u8>,
    header_bytes: Vec<u8>,
    chunk_size: usize,
    stream: Option<StreamBE32<Aes256Gcm>>,
) -> Result<Vec<Bytes>, EnvelopeError> {
    let Some(stream) = stream else {
        return Ok(vec![Bytes::from(header_bytes), Bytes::from(body)]);
    };
    let tags = encrypt_chunks_in_place(&stream, &mut body, chunk_size, &header_bytes)?;
    let length = body.len();
    let body = Bytes::from(body);
    let mut parts = Vec::with_capacity(1 + 2 * tags.len());
    parts.push(Bytes::from(header_bytes));
    for (index, tag) in tags.iter().enumerate() {
        let start = (index * chunk_size).min(length);
        let end = (start + chunk_size).min(length);
        parts.push(body.slice(start..end));
        parts.push(Bytes::copy_from_slice(tag));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_grew_after_its_length_was_read_is_refused_whole() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("plain");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let options = EncodeOptions {
            whole_files: true,
            ..EncodeOptions::default()
        };
        let open = || std::fs::File::open(&path).unwrap();
        // The length read before the file grew to 10 000 bytes.
        let error = encode_whole_file(open(), 9_000, "wal/x", None, &options).unwrap_err();
        assert_eq!(
            error.to_string(),
            "wal/x changed while it was being encoded (9000 bytes expected, 9001 read); retry"
        );
        let (content, _) = encode_whole_file(open(), 10_000, "wal/x", None, &options).unwrap();
        assert_eq!(content, ContentSummary::of_bytes(&[7u8; 10_000]));
    }
}
