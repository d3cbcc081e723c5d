//! Opening, stored object to plaintext: decrypt, then decompress, then verify. `decode` reads
//! the header and opens the body (`open_body`), picks how the plaintext reaches the sink (a
//! `Delivery`), and `deliver_verified` checks the length and checksum the header promised.
//! `authenticate` proves an object intact without decompressing it when its tags allow.

use std::io::{self, Read, Write};

use super::checksum::{Checksum, ChecksumAlgorithm, PlaintextHasher};
use super::cipher::{ChunkOpener, open_data_key};
use super::compression::{decompress_whole, decompressor};
use super::header::{Cipher, Compression, Header};
use super::{COPY_BUFFER, EnvelopeError, copy_bounded, corrupt_unless_wrapped, read_full};
use crate::buffer_pool::{BufferPool, PooledBuffer};
use crate::keyring::Keyring;

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
pub(super) fn open_body<R: Read>(
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
    let opener = ChunkOpener::new(
        source,
        stream,
        header_bytes,
        header.chunk_size,
        expected_name,
    );
    Ok((header, opener))
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
pub(super) enum Delivery<'a> {
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
pub(super) fn deliver_verified<R: Read + Send, W: Write + Send>(
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
