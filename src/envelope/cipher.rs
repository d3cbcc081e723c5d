//! Encryption: the per-object data key (wrapped into the header by the keyring's newest key,
//! unwrapped by the key the header names) and AES-256-GCM in the STREAM construction over the
//! compressed body. `ChunkSealer` and `ChunkOpener` frame that body into sealed chunks, the
//! last one flagged; an unencrypted body passes through them unchanged.

use std::io::{self, BufRead, Read, Write};

use aead_stream::{StreamBE32, StreamPrimitive};
use aes_gcm::Aes256Gcm;
use aes_gcm::aead;

use super::header::{Cipher, Header};
use super::{COPY_BUFFER, EnvelopeError, read_full};
use crate::keyring::{Keyring, SecretKey};

pub(super) const TAG_LEN: usize = 16;
/// The first allocation for a sealed chunk being read; it grows when the chunk is larger.
const SEALED_READ_HINT: usize = 128 << 10;

/// Gives `header` a fresh data key, wrapped by the keyring's newest key under the header's own
/// bytes, and returns the cipher that seals the object's chunks with it.
pub(super) fn wrap_new_data_key(header: &mut Header, keyring: &Keyring) -> StreamBE32<Aes256Gcm> {
    let key = keyring.newest();
    let data_key = SecretKey::random();
    header.cipher = Cipher::Aes256GcmStream;
    header.key_id = Some(key.id);
    getrandom::fill(&mut header.stream_nonce).expect("the operating system's random source failed");
    (header.wrap_nonce, header.wrapped_key) = key.wrap(&data_key, &header.wrap_context());
    stream_cipher(&data_key, &header.stream_nonce)
}

pub(super) fn open_data_key(
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

/// Encrypts `body` in place in chunks of `chunk_size`, the last one flagged (an empty body is
/// one empty last chunk), and returns each chunk's tag, kept aside rather than after it.
pub(super) fn encrypt_chunks_in_place(
    stream: &StreamBE32<Aes256Gcm>,
    body: &mut [u8],
    chunk_size: usize,
    associated_data: &[u8],
) -> Result<Vec<[u8; TAG_LEN]>, EnvelopeError> {
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
            .encrypt_in_place(position as u32, last, associated_data, &mut buffer)
            .map_err(|_| EnvelopeError::Sink(io::Error::other("chunk encryption failed")))?;
        tags.push(buffer.tag);
    }
    Ok(tags)
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

/// Splits the compressed stream into chunks and seals each. A chunk is sealed as "not last" only
/// once more data has arrived, so the final chunk always carries the last-chunk flag.
pub(super) struct ChunkSealer<W: Write> {
    sink: W,
    buffer: Vec<u8>,
    chunk_size: usize,
    stream: Option<StreamBE32<Aes256Gcm>>,
    associated_data: Vec<u8>,
    position: u32,
}

impl<W: Write> ChunkSealer<W> {
    /// A sealer writing to `sink`, after the header whose bytes are `associated_data`.
    pub(super) fn new(
        sink: W,
        chunk_size: usize,
        stream: Option<StreamBE32<Aes256Gcm>>,
        associated_data: Vec<u8>,
    ) -> Self {
        ChunkSealer {
            sink,
            buffer: Vec::with_capacity(chunk_size + TAG_LEN),
            chunk_size,
            stream,
            associated_data,
            position: 0,
        }
    }

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

    pub(super) fn finish(mut self) -> io::Result<W> {
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
pub(super) struct ChunkOpener<R: Read> {
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
    /// An opener of the body that follows, in `source`, the header read as `associated_data`;
    /// without a `stream` the body is unencrypted and passes through in pieces.
    pub(super) fn new(
        source: R,
        stream: Option<StreamBE32<Aes256Gcm>>,
        associated_data: Vec<u8>,
        chunk_size: u32,
        object: &str,
    ) -> Self {
        ChunkOpener {
            source,
            stream,
            associated_data,
            sealed_chunk_length: chunk_size as usize + TAG_LEN,
            pending: None,
            plaintext: Vec::new(),
            offset: 0,
            position: 0,
            finished: false,
            object: object.to_string(),
        }
    }

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
