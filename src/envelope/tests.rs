//! Round trips through `seal` and `open`, and what each refuses: every bit flip, every cut,
//! a wrong keyring, a renamed object, a header that lies.

use proptest::prelude::*;

use super::header::FIXED_HEADER_LEN;
use super::open::{Delivery, deliver_verified, open_body};
use super::seal::{new_header, seal_in_place};
use super::*;
use crate::keyring::{KeyId, Keyring};

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
    let (header_bytes, chunk_size, stream) = new_header(claimed, "wal/x", Some(&keyring), &options);
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

#[test]
fn only_damage_to_the_object_itself_allows_replacing_it() {
    let object = || "wal/x".to_string();
    for damaged in [
        EnvelopeError::Truncated(object()),
        EnvelopeError::CorruptHeader(object()),
        EnvelopeError::Unencrypted(object()),
        EnvelopeError::AuthenticationFailed {
            object: object(),
            chunk: Some(0),
        },
    ] {
        assert!(damaged.is_damaged_object(), "{damaged}");
    }
    // A data key that does not unwrap may be a keyring with the right id and wrong bytes;
    // an unknown key or a newer format may be a valid object this pitr cannot read.
    for valid_maybe in [
        EnvelopeError::AuthenticationFailed {
            object: object(),
            chunk: None,
        },
        EnvelopeError::UnknownKey {
            object: object(),
            key_id: KeyId(7),
        },
        EnvelopeError::UnsupportedVersion {
            object: object(),
            version: 9,
        },
        EnvelopeError::KeyringRequired(object()),
    ] {
        assert!(!valid_maybe.is_damaged_object(), "{valid_maybe}");
    }
}
