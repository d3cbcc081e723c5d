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

use std::fmt;
use std::io::{self, BufRead, Read, Write};
use std::path::Path;

use aead_stream::{StreamBE32, StreamPrimitive};
use aes_gcm::Aes256Gcm;
use aes_gcm::aead;
use bytes::Bytes;

use crate::buffer_pool::{BufferPool, PooledBuffer};
use crate::keyring::{KeyId, Keyring, SecretKey};

pub const MAGIC: [u8; 4] = *b"PITR";
/// The version pitr writes. It names the plaintext checksum: v1 objects carry BLAKE3-256 and are
/// read as before; v2 objects carry XXH3-128, a third of the CPU on every read and write.
pub const FORMAT_VERSION: u8 = 2;
const BLAKE3_FORMAT_VERSION: u8 = 1;
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
const TAG_LEN: usize = 16;
const FIXED_HEADER_LEN: usize = 130;
const MAX_CHUNK_SIZE: u32 = 64 << 20;
const COPY_BUFFER: usize = 256 << 10;
/// The first allocation for a sealed chunk being read; it grows when the chunk is larger.
const SEALED_READ_HINT: usize = 128 << 10;

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

/// How a plaintext checksum is computed; an object's format version says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumAlgorithm {
    /// Format v1. Cryptographic strength buys nothing here: an encrypted object is authenticated
    /// by its tags, and anyone able to edit an unencrypted one could recompute any unkeyed hash.
    Blake3,
    /// Format v2: catches corruption as surely for this purpose, at three times BLAKE3's speed.
    Xxh3,
}

impl ChecksumAlgorithm {
    /// What pitr writes today.
    pub const CURRENT: ChecksumAlgorithm = ChecksumAlgorithm::Xxh3;
}

/// The checksum of an object's plaintext, in the algorithm of the object's format version.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    Blake3([u8; 32]),
    /// The canonical (big-endian) XXH3-128 digest.
    Xxh3([u8; 16]),
}

impl Checksum {
    pub fn algorithm(&self) -> ChecksumAlgorithm {
        match self {
            Checksum::Blake3(_) => ChecksumAlgorithm::Blake3,
            Checksum::Xxh3(_) => ChecksumAlgorithm::Xxh3,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Checksum::Blake3(digest) => digest,
            Checksum::Xxh3(digest) => digest,
        }
    }

    /// The header's 32-byte field: the digest, then zeros.
    fn field(&self) -> [u8; 32] {
        let mut field = [0u8; 32];
        field[..self.as_bytes().len()].copy_from_slice(self.as_bytes());
        field
    }

    fn format_version(&self) -> u8 {
        match self {
            Checksum::Blake3(_) => BLAKE3_FORMAT_VERSION,
            Checksum::Xxh3(_) => FORMAT_VERSION,
        }
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.as_bytes()))
    }
}

/// Hashes plaintext as it streams past, in one checksum algorithm.
pub enum PlaintextHasher {
    Blake3(Box<blake3::Hasher>),
    /// twox-hash picks AVX2 or SSE2 at run time; a build for the baseline CPU would use SSE2.
    Xxh3(Box<twox_hash::XxHash3_128>),
}

impl PlaintextHasher {
    pub fn new(algorithm: ChecksumAlgorithm) -> Self {
        match algorithm {
            ChecksumAlgorithm::Blake3 => PlaintextHasher::Blake3(Box::default()),
            ChecksumAlgorithm::Xxh3 => PlaintextHasher::Xxh3(Box::default()),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            PlaintextHasher::Blake3(hasher) => {
                hasher.update(bytes);
            }
            PlaintextHasher::Xxh3(hasher) => hasher.write(bytes),
        }
    }

    pub fn finish(&self) -> Checksum {
        match self {
            PlaintextHasher::Blake3(hasher) => Checksum::Blake3(*hasher.finalize().as_bytes()),
            PlaintextHasher::Xxh3(hasher) => Checksum::Xxh3(hasher.finish_128().to_be_bytes()),
        }
    }
}

/// A `Write` that only hashes and counts: the plaintext summary of whatever is decoded into it.
pub struct SummarySink {
    hasher: PlaintextHasher,
    length: u64,
}

impl SummarySink {
    pub fn new(algorithm: ChecksumAlgorithm) -> Self {
        SummarySink {
            hasher: PlaintextHasher::new(algorithm),
            length: 0,
        }
    }

    pub fn summary(&self) -> ContentSummary {
        ContentSummary {
            length: self.length,
            checksum: self.hasher.finish(),
        }
    }
}

impl Write for SummarySink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.hasher.update(bytes);
        self.length += bytes.len() as u64;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl fmt::Debug for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Checksum({self})")
    }
}

/// What the header promises about the plaintext, known before encoding starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentSummary {
    pub length: u64,
    pub checksum: Checksum,
}

impl ContentSummary {
    /// Hashes a file, reading it in blocks: a memory map would be faster to write but counts
    /// the whole file in the process's resident memory, which concurrent uploads multiply.
    pub fn of_file(path: &Path) -> io::Result<Self> {
        Self::of_file_in(path, ChecksumAlgorithm::CURRENT)
    }

    /// `of_file` in a given algorithm: to compare a file with an object written in another.
    pub fn of_file_in(path: &Path, algorithm: ChecksumAlgorithm) -> io::Result<Self> {
        let mut file = std::fs::File::open(path)?;
        let mut sink = SummarySink::new(algorithm);
        let mut buffer = vec![0u8; COPY_BUFFER];
        loop {
            match file.read(&mut buffer) {
                Ok(0) => break,
                Ok(count) => {
                    sink.write_all(&buffer[..count])?;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(sink.summary())
    }

    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self::of_bytes_in(bytes, ChecksumAlgorithm::CURRENT)
    }

    pub fn of_bytes_in(bytes: &[u8], algorithm: ChecksumAlgorithm) -> Self {
        let mut hasher = PlaintextHasher::new(algorithm);
        hasher.update(bytes);
        ContentSummary {
            length: bytes.len() as u64,
            checksum: hasher.finish(),
        }
    }
}

/// The decoded header of a stored object.
#[derive(Debug, Clone)]
pub struct Header {
    pub compression: Compression,
    pub cipher: Cipher,
    pub chunk_size: u32,
    pub content: ContentSummary,
    pub key_id: Option<KeyId>,
    wrap_nonce: [u8; 12],
    wrapped_key: [u8; 48],
    stream_nonce: [u8; 7],
    pub object_name: String,
}

impl Header {
    fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(FIXED_HEADER_LEN + self.object_name.len() + 4);
        bytes.extend_from_slice(&MAGIC);
        bytes.push(self.content.checksum.format_version());
        bytes.push(self.compression as u8);
        bytes.push(self.cipher as u8);
        bytes.push(0);
        bytes.extend_from_slice(&self.chunk_size.to_le_bytes());
        bytes.extend_from_slice(&self.content.length.to_le_bytes());
        bytes.extend_from_slice(&self.content.checksum.field());
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
    fn wrap_context(&self) -> Vec<u8> {
        let mut unwrapped = self.clone();
        unwrapped.wrap_nonce = [0; 12];
        unwrapped.wrapped_key = [0; 48];
        unwrapped.to_bytes()
    }

    fn read_from(source: &mut impl Read, object: &str) -> Result<(Self, Vec<u8>), EnvelopeError> {
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
    let mut encoder = zstd_encoder(sealer, options)?;
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
    let mut encoder = zstd_encoder(Vec::with_capacity((length_hint / 8) as usize), options)?;
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

fn encode_whole_file(
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
    let compressed = if options.compression_workers == 0 {
        zstd::bulk::compress(plaintext, options.compression_level).map_err(EnvelopeError::Sink)?
    } else {
        let mut encoder = zstd_encoder(Vec::with_capacity(plaintext.len() / 4), options)?;
        encoder.write_all(plaintext).map_err(EnvelopeError::Sink)?;
        encoder.finish().map_err(EnvelopeError::Sink)?
    };
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
    Ok(ChunkSealer {
        sink,
        buffer: Vec::with_capacity(chunk_size + TAG_LEN),
        chunk_size,
        stream,
        associated_data: header_bytes,
        position: 0,
    })
}

/// A new object's header bytes, its chunk size, and the cipher for its chunks (with a fresh
/// data key, wrapped into the header, when encrypting).
fn new_header(
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
    let mut stream = None;
    if let Some(keyring) = keyring {
        let key = keyring.newest();
        let data_key = SecretKey::random();
        header.cipher = Cipher::Aes256GcmStream;
        header.key_id = Some(key.id);
        getrandom::fill(&mut header.stream_nonce)
            .expect("the operating system's random source failed");
        (header.wrap_nonce, header.wrapped_key) = key.wrap(&data_key, &header.wrap_context());
        stream = Some(stream_cipher(&data_key, &header.stream_nonce));
    }
    (header.to_bytes(), header.chunk_size as usize, stream)
}

/// Seals a compressed body where it lies: each chunk is encrypted in place and its tag kept
/// aside, and the object is returned as parts (header, then each chunk followed by its tag)
/// that share the body's memory, ready for a multi-part put. The chunking is `ChunkSealer`'s:
/// full chunks, the last one flagged, an empty body sealed as one empty last chunk.
fn seal_in_place(
    mut body: Vec<u8>,
    header_bytes: Vec<u8>,
    chunk_size: usize,
    stream: Option<StreamBE32<Aes256Gcm>>,
) -> Result<Vec<Bytes>, EnvelopeError> {
    let Some(stream) = stream else {
        return Ok(vec![Bytes::from(header_bytes), Bytes::from(body)]);
    };
    let chunk_count = body.len().div_ceil(chunk_size).max(1);
    let mut tags = Vec::with_capacity(chunk_count);
    let mut empty = [0u8; 0];
    let mut pieces: Vec<&mut [u8]> = body.chunks_mut(chunk_size).collect();
    if pieces.is_empty() {
        pieces.push(&mut empty);
    }
    for (position, piece) in pieces.into_iter().enumerate() {
        let mut buffer = DetachedTag {
            data: piece,
            tag: [0; TAG_LEN],
        };
        let last = position + 1 == chunk_count;
        stream
            .encrypt_in_place(position as u32, last, &header_bytes, &mut buffer)
            .map_err(|_| EnvelopeError::Sink(io::Error::other("chunk encryption failed")))?;
        tags.push(buffer.tag);
    }
    let length = body.len();
    let body = Bytes::from(body);
    let mut parts = Vec::with_capacity(1 + 2 * chunk_count);
    parts.push(Bytes::from(header_bytes));
    for (index, tag) in tags.iter().enumerate() {
        let start = (index * chunk_size).min(length);
        let end = (start + chunk_size).min(length);
        parts.push(body.slice(start..end));
        parts.push(Bytes::copy_from_slice(tag));
    }
    Ok(parts)
}

/// An in-place AEAD buffer over one chunk whose tag goes aside instead of after it.
struct DetachedTag<'a> {
    data: &'a mut [u8],
    tag: [u8; TAG_LEN],
}

impl AsRef<[u8]> for DetachedTag<'_> {
    fn as_ref(&self) -> &[u8] {
        self.data
    }
}

impl AsMut<[u8]> for DetachedTag<'_> {
    fn as_mut(&mut self) -> &mut [u8] {
        self.data
    }
}

impl aead::Buffer for DetachedTag<'_> {
    fn extend_from_slice(&mut self, other: &[u8]) -> aead::Result<()> {
        if other.len() != TAG_LEN {
            return Err(aead::Error);
        }
        self.tag.copy_from_slice(other);
        Ok(())
    }

    fn truncate(&mut self, _length: usize) {}
}

fn zstd_encoder<'a, W: Write>(
    sink: W,
    options: &EncodeOptions,
) -> Result<zstd::stream::write::Encoder<'a, W>, EnvelopeError> {
    let mut encoder = zstd::stream::write::Encoder::new(sink, options.compression_level)
        .map_err(EnvelopeError::Sink)?;
    if options.compression_workers > 0 {
        encoder
            .multithread(options.compression_workers)
            .map_err(EnvelopeError::Sink)?;
    }
    Ok(encoder)
}

/// Whether a decode runs alone or beside others; it decides how a WAL-sized object is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeMode {
    /// The only decode in progress, as in a hook: a second thread hashes and writes while this
    /// one decompresses, so one object gets two cores.
    Alone,
    /// One of several decodes that together keep the cores busy, as in the prefetcher, from a
    /// local file. An object of 4–32 MiB is decompressed into one pooled buffer of its full
    /// length when the pool's budget allows, and hashed and written on the same thread: no
    /// copy out of zstd's window and no thread hand-offs. (A remote body is decoded `Alone`
    /// whoever asks: decoding it waits on the network, so the buffer would only add memory.)
    Concurrent,
}

/// Decodes and verifies one object into `sink`, returning its header. `expected_name` guards
/// against an object renamed or copied from elsewhere. `keyring` is the repository's: given one,
/// every object must be encrypted under it (an unencrypted object is refused as forged), and
/// without one an encrypted object is refused as unreadable. On error, what was written to `sink` must
/// be discarded: verification completes only at the end.
pub fn decode<R: Read + Send, W: Write + Send>(
    source: R,
    expected_name: &str,
    keyring: Option<&Keyring>,
    sink: W,
    mode: DecodeMode,
) -> Result<Header, EnvelopeError> {
    let (header, opener) = open_body(source, expected_name, keyring)?;
    let mut whole_buffer = match mode {
        DecodeMode::Concurrent => whole_decode_buffer(&header),
        DecodeMode::Alone => None,
    };
    let delivery = match whole_buffer.as_deref_mut() {
        Some(output) => Delivery::Whole(output),
        None => Delivery::streaming(&header),
    };
    deliver_verified(opener, sink, &header, expected_name, delivery)?;
    Ok(header)
}

/// Proves an object intact and returns its header. For an encrypted object this needs no
/// decompression: every chunk's tag covers the whole header (plaintext length and checksum
/// included), the chunk's position and the last-chunk flag, so a complete sequence of
/// authentic chunks is exactly the object that was written. Unencrypted objects carry no tags
/// and are decoded in full, checksum included.
pub fn authenticate<R: Read + Send>(
    source: R,
    expected_name: &str,
    keyring: Option<&Keyring>,
) -> Result<Header, EnvelopeError> {
    let (header, mut opener) = open_body(source, expected_name, keyring)?;
    if header.cipher == Cipher::None {
        let delivery = Delivery::streaming(&header);
        deliver_verified(opener, io::sink(), &header, expected_name, delivery)?;
    } else {
        copy_bounded(&mut opener, &mut io::sink())
            .map_err(|error| corrupt_unless_wrapped(error, expected_name))?;
    }
    Ok(header)
}

/// Reads and checks the header, and returns a reader of the (compressed) body.
fn open_body<R: Read>(
    mut source: R,
    expected_name: &str,
    keyring: Option<&Keyring>,
) -> Result<(Header, ChunkOpener<R>), EnvelopeError> {
    let (header, header_bytes) = Header::read_from(&mut source, expected_name)?;
    if header.object_name != expected_name {
        return Err(EnvelopeError::NameMismatch {
            object: expected_name.to_string(),
            found: header.object_name.clone(),
        });
    }
    let stream = match (header.cipher, keyring) {
        // A keyring means the repository's identity says it is encrypted: an object without a
        // cipher carries no authentication at all, so anyone who can write to the storage could
        // have made it, checksum included.
        (Cipher::None, Some(_)) => {
            return Err(EnvelopeError::Unencrypted(expected_name.to_string()));
        }
        (Cipher::None, None) => None,
        (Cipher::Aes256GcmStream, _) => Some(open_data_key(&header, keyring)?),
    };
    let opener = ChunkOpener {
        source,
        stream,
        associated_data: header_bytes,
        sealed_chunk_length: header.chunk_size as usize + TAG_LEN,
        pending: None,
        plaintext: Vec::new(),
        offset: 0,
        position: 0,
        finished: false,
        object: expected_name.to_string(),
    };
    Ok((header, opener))
}

fn decompressor<'a, R: Read + Send + 'a>(
    header: &Header,
    opener: ChunkOpener<R>,
) -> Result<Box<dyn Read + Send + 'a>, EnvelopeError> {
    Ok(match header.compression {
        // The opener is zstd's input buffer itself: each opened chunk is read where it lies.
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(opener).map_err(EnvelopeError::Sink)?)
        }
        Compression::None => Box::new(opener),
    })
}

/// Reads only an object's header, without verifying its body.
pub fn read_header<R: Read>(mut source: R, expected_name: &str) -> Result<Header, EnvelopeError> {
    Header::read_from(&mut source, expected_name).map(|(header, _)| header)
}

fn open_data_key(
    header: &Header,
    keyring: Option<&Keyring>,
) -> Result<StreamBE32<Aes256Gcm>, EnvelopeError> {
    let object = header.object_name.clone();
    let key_id = header
        .key_id
        .ok_or_else(|| EnvelopeError::CorruptHeader(object.clone()))?;
    let keyring = keyring.ok_or_else(|| EnvelopeError::KeyringRequired(object.clone()))?;
    let key = keyring
        .find(key_id)
        .ok_or_else(|| EnvelopeError::UnknownKey {
            object: object.clone(),
            key_id,
        })?;
    let data_key = key
        .unwrap(
            &header.wrap_nonce,
            &header.wrapped_key,
            &header.wrap_context(),
        )
        .ok_or(EnvelopeError::AuthenticationFailed {
            object,
            chunk: None,
        })?;
    Ok(stream_cipher(&data_key, &header.stream_nonce))
}

fn stream_cipher(data_key: &SecretKey, nonce: &[u8; 7]) -> StreamBE32<Aes256Gcm> {
    use aead_stream::NewStream;
    StreamBE32::from_aead(data_key.cipher(), &(*nonce).into())
}

/// Splits the compressed stream into chunks and seals each. A chunk is sealed as "not last" only
/// once more data has arrived, so the final chunk always carries the last-chunk flag.
struct ChunkSealer<W: Write> {
    sink: W,
    buffer: Vec<u8>,
    chunk_size: usize,
    stream: Option<StreamBE32<Aes256Gcm>>,
    associated_data: Vec<u8>,
    position: u32,
}

impl<W: Write> ChunkSealer<W> {
    fn seal(&mut self, last: bool) -> io::Result<()> {
        if let Some(stream) = &self.stream {
            stream
                .encrypt_in_place(self.position, last, &self.associated_data, &mut self.buffer)
                .map_err(|_| io::Error::other("chunk encryption failed"))?;
            self.position = self.position.checked_add(1).ok_or_else(|| {
                io::Error::other("object exceeds 2^32 chunks; raise the chunk size")
            })?;
        }
        self.sink
            .write_all(&self.buffer)
            .map_err(|error| io::Error::other(EnvelopeError::Sink(error)))?;
        self.buffer.clear();
        Ok(())
    }

    fn finish(mut self) -> io::Result<W> {
        self.seal(true)?;
        self.sink
            .flush()
            .map_err(|error| io::Error::other(EnvelopeError::Sink(error)))?;
        Ok(self.sink)
    }
}

impl<W: Write> Write for ChunkSealer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buffer.len() == self.chunk_size && !data.is_empty() {
            self.seal(false)?;
        }
        let taken = data.len().min(self.chunk_size - self.buffer.len());
        self.buffer.extend_from_slice(&data[..taken]);
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads sealed chunks and yields the compressed stream. It reads one chunk ahead, because only
/// the end of the object tells which chunk must carry the last-chunk flag.
struct ChunkOpener<R: Read> {
    source: R,
    stream: Option<StreamBE32<Aes256Gcm>>,
    associated_data: Vec<u8>,
    sealed_chunk_length: usize,
    pending: Option<Vec<u8>>,
    plaintext: Vec<u8>,
    offset: usize,
    position: u32,
    finished: bool,
    object: String,
}

impl<R: Read> ChunkOpener<R> {
    /// Reads the next sealed chunk into `chunk`, a buffer whose contents are done with: reusing
    /// the chunk opened before saves an allocation and the copy of a regrowth per chunk.
    fn read_sealed_chunk(&mut self, mut chunk: Vec<u8>) -> Result<Vec<u8>, EnvelopeError> {
        // Grown as it fills, not zeroed up front: most sealed chunks of small objects are far
        // smaller than the chunk size, and zeroing (and faulting in) the rest dominated restores.
        chunk.clear();
        chunk.reserve(self.sealed_chunk_length.min(SEALED_READ_HINT));
        (&mut self.source)
            .take(self.sealed_chunk_length as u64)
            .read_to_end(&mut chunk)
            .map_err(EnvelopeError::Source)?;
        Ok(chunk)
    }

    fn open_next(&mut self) -> Result<(), EnvelopeError> {
        let consumed = std::mem::take(&mut self.plaintext);
        if self.stream.is_none() {
            let mut chunk = consumed;
            chunk.resize(COPY_BUFFER, 0);
            let filled = read_full(&mut self.source, &mut chunk).map_err(EnvelopeError::Source)?;
            chunk.truncate(filled);
            self.finished = filled == 0;
            self.plaintext = chunk;
            return Ok(());
        };
        let mut current = match self.pending.take() {
            Some(chunk) => chunk,
            None => self.read_sealed_chunk(Vec::new())?,
        };
        let following = self.read_sealed_chunk(consumed)?;
        let last = following.is_empty();
        let stream = self.stream.as_ref().expect("checked above");
        if last {
            // AES-GCM checks the tag before it decrypts, so a chunk that fails is left as read
            // and can be tried again as a middle chunk.
            if stream
                .decrypt_in_place(self.position, true, &self.associated_data, &mut current)
                .is_err()
            {
                return Err(self.diagnose_last_chunk_failure(current));
            }
            self.finished = true;
        } else {
            stream
                .decrypt_in_place(self.position, false, &self.associated_data, &mut current)
                .map_err(|_| EnvelopeError::AuthenticationFailed {
                    object: self.object.clone(),
                    chunk: Some(self.position),
                })?;
            self.pending = Some(following);
        }
        self.position += 1;
        self.plaintext = current;
        Ok(())
    }

    /// A final chunk that opens as a middle chunk means the object was cut at a chunk boundary.
    fn diagnose_last_chunk_failure(&self, mut chunk: Vec<u8>) -> EnvelopeError {
        let stream = self
            .stream
            .as_ref()
            .expect("only encrypted objects have chunks");
        let is_middle_chunk = chunk.len() == self.sealed_chunk_length
            && stream
                .decrypt_in_place(self.position, false, &self.associated_data, &mut chunk)
                .is_ok();
        if is_middle_chunk || chunk.len() < TAG_LEN {
            EnvelopeError::Truncated(self.object.clone())
        } else {
            EnvelopeError::AuthenticationFailed {
                object: self.object.clone(),
                chunk: Some(self.position),
            }
        }
    }
}

impl<R: Read> Read for ChunkOpener<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let count = out.len().min(available.len());
        out[..count].copy_from_slice(&available[..count]);
        self.consume(count);
        Ok(count)
    }
}

impl<R: Read> BufRead for ChunkOpener<R> {
    /// The rest of the current opened chunk, opening the next one when it is used up; empty
    /// only at the end of the object.
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.offset == self.plaintext.len() {
            if self.finished {
                return Ok(&[]);
            }
            self.open_next().map_err(io::Error::other)?;
            self.offset = 0;
        }
        Ok(&self.plaintext[self.offset..])
    }

    fn consume(&mut self, count: usize) {
        self.offset = (self.offset + count).min(self.plaintext.len());
    }
}

/// Objects up to this size are decoded on the calling thread alone: for a backup chunk or a
/// small file, starting a writer thread and handing buffers across costs more than it saves.
const INLINE_DECODE_LIMIT: u64 = 4 << 20;

/// Objects from this size up to the budget of `WHOLE_DECODE_BUFFERS` are decompressed into one
/// buffer of their full length (see `decompress_whole`) while the budget allows.
const WHOLE_DECODE_MINIMUM: u64 = INLINE_DECODE_LIMIT + 1;

/// Enough for two 16 MiB WAL segments, one per core of a small sidecar; a third concurrent
/// decode streams instead, so memory stays bounded at any concurrency.
static WHOLE_DECODE_BUFFERS: BufferPool = BufferPool::new(32 << 20);

fn whole_decode_buffer(header: &Header) -> Option<PooledBuffer> {
    let length = usize::try_from(header.content.length).ok()?;
    if header.compression != Compression::Zstd || header.content.length < WHOLE_DECODE_MINIMUM {
        return None;
    }
    WHOLE_DECODE_BUFFERS.take(length)
}

/// How an object's plaintext reaches the sink.
enum Delivery<'a> {
    /// Streamed through zstd on the calling thread alone.
    Inline,
    /// Streamed through zstd on this thread while another hashes and writes.
    Pipelined,
    /// Decompressed into this buffer, which is as long as the header's plaintext length.
    Whole(&'a mut [u8]),
}

impl Delivery<'_> {
    fn streaming(header: &Header) -> Self {
        if header.content.length <= INLINE_DECODE_LIMIT {
            Delivery::Inline
        } else {
            Delivery::Pipelined
        }
    }
}

/// Decompresses, hashes and writes the plaintext, then checks its length and checksum.
fn deliver_verified<R: Read + Send, W: Write + Send>(
    opener: ChunkOpener<R>,
    sink: W,
    header: &Header,
    object: &str,
    delivery: Delivery<'_>,
) -> Result<(), EnvelopeError> {
    let limit = header.content.length;
    let algorithm = header.content.checksum.algorithm();
    let (length, checksum) = match delivery {
        Delivery::Whole(output) => decompress_whole(opener, sink, output, algorithm, object)?,
        Delivery::Inline => deliver_inline(
            decompressor(header, opener)?,
            sink,
            limit,
            algorithm,
            object,
        )?,
        Delivery::Pipelined => deliver_pipelined(
            decompressor(header, opener)?,
            sink,
            limit,
            algorithm,
            object,
        )?,
    };
    if length != header.content.length {
        return Err(EnvelopeError::Truncated(object.to_string()));
    }
    if checksum != header.content.checksum {
        return Err(EnvelopeError::ChecksumMismatch(object.to_string()));
    }
    Ok(())
}

/// How much compressed input `decompress_whole` hands zstd per call.
const WHOLE_DECODE_INPUT_PIECE: usize = 64 << 10;

thread_local! {
    /// `decompress_whole`'s zstd context, set up once per thread.
    static WHOLE_DECOMPRESSOR: std::cell::RefCell<Option<zstd::zstd_safe::DCtx<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses a zstd body into `output`, which is exactly as long as the plaintext the header
/// promises, and hashes and writes each newly decompressed stretch while it is still in the
/// cache. Told that its output buffer stays put, zstd decodes straight into it and uses it as
/// its window, instead of decoding into a window buffer of its own and copying out of it; and
/// no second thread or buffer hand-off is needed. In the prefetcher's A/B runs on a 2-core VM
/// this restored the realistic corpus up to 9 % faster and was never slower. A frame that would run past
/// `output` is refused, so a corrupt object can never write more than the header promised.
fn decompress_whole<R: Read, W: Write>(
    mut compressed: ChunkOpener<R>,
    mut sink: W,
    output: &mut [u8],
    algorithm: ChecksumAlgorithm,
    object: &str,
) -> Result<(u64, Checksum), EnvelopeError> {
    use zstd::zstd_safe::{DCtx, DParameter, InBuffer, OutBuffer, ResetDirective};
    let corrupt = |_| EnvelopeError::CorruptCompressedData(object.to_string());
    WHOLE_DECOMPRESSOR.with_borrow_mut(|context| {
        let context = match context {
            Some(context) => context,
            None => {
                let mut created = DCtx::try_create().ok_or_else(|| {
                    EnvelopeError::Sink(io::Error::other("cannot allocate a zstd context"))
                })?;
                created
                    .set_parameter(DParameter::StableOutBuffer(true))
                    .map_err(corrupt)?;
                context.insert(created)
            }
        };
        context
            .reset(ResetDirective::SessionOnly)
            .map_err(corrupt)?;
        // zstd refuses a frame that says it is longer than `output` as an error of its own; a
        // frame whose length differs from the header's is the mismatch the other deliveries
        // report, so it is reported the same way.
        let first = compressed.fill_buf().map_err(unwrap_io)?;
        if let Ok(Some(frame_length)) = zstd::zstd_safe::get_frame_content_size(first)
            && frame_length != output.len() as u64
        {
            return Err(EnvelopeError::ChecksumMismatch(object.to_string()));
        }
        let mut hasher = PlaintextHasher::new(algorithm);
        let mut produced = 0;
        let mut frame_finished = false;
        loop {
            let input = compressed.fill_buf().map_err(unwrap_io)?;
            if input.is_empty() {
                break;
            }
            if frame_finished {
                // More data after the one frame: more than the header promised.
                return Err(EnvelopeError::ChecksumMismatch(object.to_string()));
            }
            // A small piece of input per call keeps what it decompresses to (a few hundred KiB)
            // in the cache until it is hashed and written; a whole 1 MiB chunk of a WAL
            // segment could decompress to 10 MiB, and reading that back from memory made
            // restores up to a fifth slower on a busy host.
            let input = &input[..input.len().min(WHOLE_DECODE_INPUT_PIECE)];
            let mut input = InBuffer::around(input);
            let mut out = OutBuffer::around_pos(&mut *output, produced);
            let hint = context
                .decompress_stream(&mut out, &mut input)
                .map_err(corrupt)?;
            let (consumed, decompressed_to) = (input.pos(), out.pos());
            compressed.consume(consumed);
            if consumed == 0 && decompressed_to == produced {
                // The output is full and the frame goes on.
                return Err(EnvelopeError::ChecksumMismatch(object.to_string()));
            }
            let fresh = &output[produced..decompressed_to];
            hasher.update(fresh);
            sink.write_all(fresh).map_err(EnvelopeError::Sink)?;
            produced = decompressed_to;
            frame_finished = hint == 0;
        }
        if !frame_finished {
            return Err(EnvelopeError::Truncated(object.to_string()));
        }
        sink.flush().map_err(EnvelopeError::Sink)?;
        Ok((produced as u64, hasher.finish()))
    })
}

fn deliver_inline<W: Write>(
    plaintext: impl Read,
    sink: W,
    limit: u64,
    algorithm: ChecksumAlgorithm,
    object: &str,
) -> Result<(u64, Checksum), EnvelopeError> {
    INLINE_BUFFER.with_borrow_mut(|buffer| {
        buffer.resize(INLINE_BUFFER_SIZE, 0);
        deliver_inline_with(plaintext, sink, limit, algorithm, object, buffer)
    })
}

thread_local! {
    /// `deliver_inline`'s buffer, reused by every object decoded on this thread.
    static INLINE_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}
const INLINE_BUFFER_SIZE: usize = 128 << 10;

fn deliver_inline_with<W: Write>(
    mut plaintext: impl Read,
    mut sink: W,
    limit: u64,
    algorithm: ChecksumAlgorithm,
    object: &str,
    buffer: &mut [u8],
) -> Result<(u64, Checksum), EnvelopeError> {
    let mut hasher = PlaintextHasher::new(algorithm);
    let mut produced = 0u64;
    loop {
        let count = read_full(&mut plaintext, buffer)
            .map_err(|error| corrupt_unless_wrapped(error, object))?;
        if count == 0 {
            break;
        }
        produced += count as u64;
        if produced > limit {
            return Err(EnvelopeError::ChecksumMismatch(object.to_string()));
        }
        hasher.update(&buffer[..count]);
        sink.write_all(&buffer[..count])
            .map_err(EnvelopeError::Sink)?;
    }
    sink.flush().map_err(EnvelopeError::Sink)?;
    Ok((produced, hasher.finish()))
}

/// Decodes on this thread while another hashes the plaintext and writes it to the sink, so
/// decompression, hashing and the write overlap. Buffers circulate between the two threads, so
/// memory is a fixed handful of them. Nothing past the length the header promised is written,
/// so a corrupt object can never fill a disk; the checksum is compared at the end.
fn deliver_pipelined<W: Write + Send>(
    mut plaintext: impl Read,
    mut sink: W,
    limit: u64,
    algorithm: ChecksumAlgorithm,
    object: &str,
) -> Result<(u64, Checksum), EnvelopeError> {
    const BUFFERS: usize = 4;
    let (full_sender, full_receiver) = std::sync::mpsc::sync_channel::<Vec<u8>>(BUFFERS);
    let (empty_sender, empty_receiver) = std::sync::mpsc::sync_channel::<Vec<u8>>(BUFFERS);
    for _ in 0..BUFFERS {
        empty_sender
            .send(vec![0u8; COPY_BUFFER])
            .expect("the channel has room");
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<(u64, Checksum), EnvelopeError> {
            let mut hasher = PlaintextHasher::new(algorithm);
            let mut written = 0u64;
            for buffer in full_receiver {
                hasher.update(&buffer);
                sink.write_all(&buffer).map_err(EnvelopeError::Sink)?;
                written += buffer.len() as u64;
                let _ = empty_sender.send(buffer);
            }
            sink.flush().map_err(EnvelopeError::Sink)?;
            Ok((written, hasher.finish()))
        });
        let produced =
            produce_plaintext(&mut plaintext, &full_sender, &empty_receiver, limit, object);
        drop(full_sender);
        let written = writer.join().expect("the writer thread does not panic");
        // A sink error explains a producer that stopped early, so it is reported first.
        let written = written?;
        produced?;
        Ok(written)
    })
}

fn produce_plaintext(
    plaintext: &mut impl Read,
    full: &std::sync::mpsc::SyncSender<Vec<u8>>,
    empty: &std::sync::mpsc::Receiver<Vec<u8>>,
    limit: u64,
    object: &str,
) -> Result<(), EnvelopeError> {
    let mut produced = 0u64;
    loop {
        // The writer stopped (a sink error): it reports why.
        let Ok(mut buffer) = empty.recv() else {
            return Ok(());
        };
        buffer.resize(COPY_BUFFER, 0);
        let count = read_full(plaintext, &mut buffer)
            .map_err(|error| corrupt_unless_wrapped(error, object))?;
        if count == 0 {
            return Ok(());
        }
        produced += count as u64;
        if produced > limit {
            return Err(EnvelopeError::ChecksumMismatch(object.to_string()));
        }
        buffer.truncate(count);
        if full.send(buffer).is_err() {
            return Ok(());
        }
    }
}

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

/// Recovers an `EnvelopeError` that crossed an `io::Read`/`io::Write` boundary.
fn unwrap_io(error: io::Error) -> EnvelopeError {
    match error.downcast::<EnvelopeError>() {
        Ok(inner) => inner,
        Err(other) => EnvelopeError::Source(other),
    }
}

/// During decoding, an io error that is not ours came from zstd: the compressed data is bad.
fn corrupt_unless_wrapped(error: io::Error, object: &str) -> EnvelopeError {
    match error.downcast::<EnvelopeError>() {
        Ok(inner) => inner,
        Err(_) => EnvelopeError::CorruptCompressedData(object.to_string()),
    }
}

impl EnvelopeError {
    /// Whether the object itself is damaged or forged, so that storing a verified copy in its
    /// place loses nothing: a torn write, a flipped bit, a planted or moved object. An object
    /// under a key this keyring lacks, or of a newer format, may be valid and is never one.
    pub fn is_damaged_object(&self) -> bool {
        matches!(
            self,
            EnvelopeError::NotAnObject(_)
                | EnvelopeError::CorruptHeader(_)
                | EnvelopeError::NameMismatch { .. }
                | EnvelopeError::Unencrypted(_)
                | EnvelopeError::AuthenticationFailed { .. }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keyring() -> (tempfile::TempDir, Keyring) {
        let directory = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate(&directory.path().join("keyring")).unwrap();
        (directory, keyring)
    }

    fn seal(data: &[u8], keyring: Option<&Keyring>, chunk_size: u32) -> Vec<u8> {
        let options = EncodeOptions {
            chunk_size,
            ..EncodeOptions::default()
        };
        encode(
            data,
            ContentSummary::of_bytes(data),
            "wal/x",
            keyring,
            &options,
            Vec::new(),
        )
        .unwrap()
    }

    fn open(object: &[u8], keyring: Option<&Keyring>) -> Result<Vec<u8>, EnvelopeError> {
        let mut out = Vec::new();
        decode(object, "wal/x", keyring, &mut out, DecodeMode::Concurrent)?;
        Ok(out)
    }

    /// `decode` through one of its three deliveries, whatever the object's size: 0 inline,
    /// 1 pipelined, 2 whole (for a zstd body whose header claims a test-sized length).
    fn open_as(
        object: &[u8],
        keyring: Option<&Keyring>,
        delivery: u8,
    ) -> Result<Vec<u8>, EnvelopeError> {
        let (header, opener) = open_body(object, "wal/x", keyring)?;
        let whole_possible =
            header.compression == Compression::Zstd && header.content.length <= 1 << 20;
        let mut output = vec![
            0u8;
            if whole_possible {
                header.content.length as usize
            } else {
                0
            }
        ];
        let delivery = match delivery {
            2 if whole_possible => Delivery::Whole(&mut output),
            1 => Delivery::Pipelined,
            _ => Delivery::Inline,
        };
        let mut out = Vec::new();
        deliver_verified(opener, &mut out, &header, "wal/x", delivery)?;
        Ok(out)
    }

    /// `encode_file`'s in-place sealing, joined from its parts.
    fn seal_file(
        data: &[u8],
        keyring: Option<&Keyring>,
        chunk_size: u32,
        whole_files: bool,
    ) -> Vec<u8> {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("plain");
        std::fs::write(&path, data).unwrap();
        let options = EncodeOptions {
            chunk_size,
            whole_files,
            ..EncodeOptions::default()
        };
        let (content, parts) = encode_file(&path, "wal/x", keyring, &options).unwrap();
        assert_eq!(content, ContentSummary::of_bytes(data));
        parts.concat()
    }

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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn file_encoding_round_trips_and_rejects_any_bit_flip(data in proptest::collection::vec(any::<u8>(), 0..20_000), chunk in 1u32..4096, encrypted: bool, whole: bool, bit in any::<proptest::sample::Index>(), delivery in 0u8..3) {
            let (_directory, keyring) = keyring();
            let keyring = encrypted.then_some(&keyring);
            let mut object = seal_file(&data, keyring, chunk, whole);
            prop_assert_eq!(open_as(&object, keyring, delivery).unwrap(), data.clone());
            let bit = bit.index(object.len() * 8);
            object[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(open_as(&object, keyring, delivery).is_err());
        }

        #[test]
        fn round_trips(data in proptest::collection::vec(any::<u8>(), 0..20_000), chunk in 1u32..4096, encrypted: bool, delivery in 0u8..3) {
            let (_directory, keyring) = keyring();
            let keyring = encrypted.then_some(&keyring);
            let object = seal(&data, keyring, chunk);
            prop_assert_eq!(open_as(&object, keyring, delivery).unwrap(), data);
        }

        #[test]
        fn any_bit_flip_is_rejected(data in proptest::collection::vec(any::<u8>(), 0..5_000), chunk in 1u32..600, bit in any::<proptest::sample::Index>(), delivery in 0u8..3) {
            let (_directory, keyring) = keyring();
            let mut object = seal(&data, Some(&keyring), chunk);
            let bit = bit.index(object.len() * 8);
            object[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(open_as(&object, Some(&keyring), delivery).is_err());
        }

        #[test]
        fn authentication_alone_rejects_any_bit_flip(data in proptest::collection::vec(any::<u8>(), 0..5_000), chunk in 1u32..600, bit in any::<proptest::sample::Index>()) {
            let (_directory, keyring) = keyring();
            let mut object = seal(&data, Some(&keyring), chunk);
            prop_assert_eq!(authenticate(&object[..], "wal/x", Some(&keyring)).unwrap().content, ContentSummary::of_bytes(&data));
            let bit = bit.index(object.len() * 8);
            object[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(authenticate(&object[..], "wal/x", Some(&keyring)).is_err());
        }

        #[test]
        fn any_truncation_is_rejected(data in proptest::collection::vec(any::<u8>(), 0..5_000), chunk in 1u32..600, cut in any::<proptest::sample::Index>(), delivery in 0u8..3) {
            let (_directory, keyring) = keyring();
            let object = seal(&data, Some(&keyring), chunk);
            let cut = cut.index(object.len());
            prop_assert!(open_as(&object[..cut], Some(&keyring), delivery).is_err());
        }

        #[test]
        fn unencrypted_truncation_is_rejected(data in proptest::collection::vec(any::<u8>(), 1..5_000), cut in any::<proptest::sample::Index>(), delivery in 0u8..3) {
            let object = seal(&data, None, 256);
            let cut = cut.index(object.len());
            prop_assert!(open_as(&object[..cut], None, delivery).is_err());
        }
    }

    #[test]
    fn a_cut_at_a_chunk_boundary_is_reported_as_truncation() {
        let (_directory, keyring) = keyring();
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|value| value.to_le_bytes())
            .collect();
        let object = seal(&data, Some(&keyring), 64);
        let header_length = FIXED_HEADER_LEN + "wal/x".len() + 4;
        assert!(
            object.len() > header_length + 4 * 80,
            "the test needs at least four chunks"
        );
        let cut = header_length + 3 * 80;
        let error = open(&object[..cut], Some(&keyring))
            .unwrap_err()
            .to_string();
        assert!(error.contains("is truncated"), "{error}");
    }

    #[test]
    fn wrong_keyring_and_renamed_objects_are_refused() {
        let (_a, first) = keyring();
        let (_b, second) = keyring();
        let object = seal(b"segment bytes", Some(&first), 1024);
        let error = open(&object, Some(&second)).unwrap_err().to_string();
        assert!(error.contains("which the keyring does not hold"), "{error}");
        let error = decode(
            &object[..],
            "wal/y",
            Some(&first),
            Vec::new(),
            DecodeMode::Concurrent,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            error,
            "object wal/y holds data for wal/x; it was renamed or copied from elsewhere and was not used"
        );
        let error = open(&object, None).unwrap_err().to_string();
        assert!(error.contains("no keyring is configured"), "{error}");
    }

    #[test]
    fn ciphertext_does_not_contain_the_plaintext() {
        let (_directory, keyring) = keyring();
        let data = b"MARKER-0123456789".repeat(1000);
        let object = seal(&data, Some(&keyring), 4096);
        assert!(
            !object
                .windows(17)
                .any(|window| window == b"MARKER-0123456789")
        );
    }

    /// An object as pitr wrote it before format v2: `encode` takes the summary it is given, so
    /// a BLAKE3 summary yields a v1 header.
    fn seal_version_1(data: &[u8], claimed: &[u8], keyring: Option<&Keyring>) -> Vec<u8> {
        let content = ContentSummary::of_bytes_in(claimed, ChecksumAlgorithm::Blake3);
        let options = EncodeOptions {
            chunk_size: 512,
            ..EncodeOptions::default()
        };
        encode(data, content, "wal/x", keyring, &options, Vec::new()).unwrap()
    }

    proptest! {
        /// The plaintext checksum is the standard XXH3-128 however the plaintext is split into
        /// updates, across the short, medium and long-input paths and the stripe boundaries.
        #[test]
        fn the_streamed_checksum_is_the_reference_xxh3_128(length in 0usize..40_000, cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..6)) {
            let data: Vec<u8> = (0..length).map(|index| (index * 7 + index / 251) as u8).collect();
            let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut.index(length + 1)).collect();
            cuts.sort_unstable();
            let mut hasher = PlaintextHasher::new(ChecksumAlgorithm::Xxh3);
            let mut start = 0;
            for cut in cuts.into_iter().chain([length]) {
                hasher.update(&data[start..cut]);
                start = cut;
            }
            let expected = xxhash_rust::xxh3::xxh3_128(&data).to_be_bytes();
            prop_assert_eq!(hasher.finish(), Checksum::Xxh3(expected));
        }
    }

    #[test]
    fn new_objects_are_version_2_and_carry_the_xxh3_128_of_their_plaintext() {
        let data = b"sixteen megabytes, in spirit".repeat(100);
        let object = seal(&data, None, 256);
        assert_eq!(object[4], 2);
        let expected = xxhash_rust::xxh3::xxh3_128(&data).to_be_bytes();
        assert_eq!(&object[20..36], &expected);
        assert_eq!(&object[36..52], &[0u8; 16]);
        let header = authenticate(&object[..], "wal/x", None).unwrap();
        assert_eq!(header.content.checksum, Checksum::Xxh3(expected));
    }

    #[test]
    fn version_1_objects_are_still_read_and_their_blake3_checksum_verified() {
        let (_directory, keyring) = keyring();
        let data: Vec<u8> = (0..20_000u32)
            .flat_map(|value| (value / 3).to_le_bytes())
            .collect();
        let mut other = data.clone();
        other[4321] ^= 1;
        for keyring in [None, Some(&keyring)] {
            let object = seal_version_1(&data, &data, keyring);
            assert_eq!(object[4], 1);
            assert_eq!(&object[20..52], blake3::hash(&data).as_bytes());
            for delivery in 0..3 {
                assert!(open_as(&object, keyring, delivery).unwrap() == data);
            }
            // A v1 header whose BLAKE3 checksum is not the plaintext's.
            let wrong = seal_version_1(&data, &other, keyring);
            for delivery in 0..3 {
                assert_eq!(
                    open_as(&wrong, keyring, delivery).unwrap_err().to_string(),
                    "object wal/x failed its plaintext checksum; it is corrupt and was not used"
                );
            }
        }
    }

    #[test]
    fn a_version_2_header_with_bytes_after_its_checksum_is_corrupt() {
        let data = vec![7u8; 3000];
        let mut object = seal(&data, None, 256);
        object[40] = 1;
        let name_length = usize::from(u16::from_le_bytes([object[128], object[129]]));
        let crc_at = FIXED_HEADER_LEN + name_length;
        let crc = crc32fast::hash(&object[..crc_at]);
        object[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            open(&object, None).unwrap_err().to_string(),
            "object wal/x has a corrupt header; it was not used (check the repository's storage)"
        );
    }

    #[test]
    fn a_whole_segment_round_trips_and_one_claiming_less_is_refused() {
        let (_directory, keyring) = keyring();
        // 16 MiB of compressible but not trivial data, the size of a WAL segment.
        let data: Vec<u8> = (0..(4u32 << 20))
            .flat_map(|value| (value / 7).to_le_bytes())
            .collect();
        let object = seal(&data, Some(&keyring), DEFAULT_CHUNK_SIZE);
        let mut restored = Vec::new();
        decode(
            &object[..],
            "wal/x",
            Some(&keyring),
            &mut restored,
            DecodeMode::Concurrent,
        )
        .unwrap();
        assert!(restored == data, "a 16 MiB object round-trips");
        // The same body under a header that promises 4 KiB less.
        let claimed = ContentSummary {
            length: data.len() as u64 - 4096,
            ..ContentSummary::of_bytes(&data)
        };
        let options = EncodeOptions::default();
        let (header_bytes, chunk_size, stream) =
            new_header(claimed, "wal/x", Some(&keyring), &options);
        let compressed = zstd::bulk::compress(&data, 1).unwrap();
        let short = seal_in_place(compressed, header_bytes, chunk_size, stream)
            .unwrap()
            .concat();
        let mut written = Vec::new();
        let error = decode(
            &short[..],
            "wal/x",
            Some(&keyring),
            &mut written,
            DecodeMode::Concurrent,
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "object wal/x failed its plaintext checksum; it is corrupt and was not used"
        );
        assert!(
            written.len() as u64 <= claimed.length,
            "nothing past the promised length"
        );
    }
}
