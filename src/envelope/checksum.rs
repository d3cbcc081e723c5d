//! Plaintext checksums: which algorithm a format version names (`ChecksumAlgorithm`), the
//! digest itself (`Checksum`), the streaming hasher, and `ContentSummary`, the length and
//! checksum a header promises and that decoding verifies.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;

use super::COPY_BUFFER;

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
}
