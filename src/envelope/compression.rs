//! zstd: the encoder for a streamed or pieced body, one-call compression of a body already in
//! memory, the streaming decoder, and `decompress_whole`, which decodes straight into a buffer
//! as long as the plaintext the header promises.

use std::io::{self, BufRead, Read, Write};

use super::checksum::{Checksum, ChecksumAlgorithm, PlaintextHasher};
use super::header::{Compression, Header};
use super::{EncodeOptions, EnvelopeError, unwrap_io};

/// A streaming encoder into `sink`, on `options.compression_workers` threads (0: this one).
pub(super) fn encoder<'a, W: Write>(
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

/// Compresses a body already in memory: in one call on this thread, which is faster than
/// streaming it in pieces, or streamed through the workers when there are any.
pub(super) fn compress_whole(
    plaintext: &[u8],
    options: &EncodeOptions,
) -> Result<Vec<u8>, EnvelopeError> {
    if options.compression_workers == 0 {
        return zstd::bulk::compress(plaintext, options.compression_level)
            .map_err(EnvelopeError::Sink);
    }
    let mut encoder = encoder(Vec::with_capacity(plaintext.len() / 4), options)?;
    encoder.write_all(plaintext).map_err(EnvelopeError::Sink)?;
    encoder.finish().map_err(EnvelopeError::Sink)
}

/// A reader of the plaintext of `body`, the object's (opened) compressed stream.
pub(super) fn decompressor<'a, B: BufRead + Send + 'a>(
    header: &Header,
    body: B,
) -> Result<Box<dyn Read + Send + 'a>, EnvelopeError> {
    Ok(match header.compression {
        // The opener is zstd's input buffer itself: each opened chunk is read where it lies.
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(body).map_err(EnvelopeError::Sink)?)
        }
        Compression::None => Box::new(body),
    })
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
pub(super) fn decompress_whole<B: BufRead, W: Write>(
    mut compressed: B,
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
