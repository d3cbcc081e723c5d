//! PostgreSQL data page checksums (`pg_checksum_page` in storage/checksum_impl.h): 32 parallel
//! FNV-1a-style lanes over the page as little-endian u32 words, two mixing rounds, folded with
//! XOR, mixed with the block number and reduced to 1..=65535.

pub const PAGE_SIZE: usize = 8192;
/// Blocks per relation segment file (1 GiB of 8 KiB pages).
pub const BLOCKS_PER_SEGMENT: u32 = 131_072;
const LANES: usize = 32;
const FNV_PRIME: u32 = 16_777_619;
const BASE_OFFSETS: [u32; LANES] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

fn mix(sum: u32, value: u32) -> u32 {
    let tmp = sum ^ value;
    tmp.wrapping_mul(FNV_PRIME) ^ (tmp >> 17)
}

/// The checksum Postgres would store for `page` at absolute block number `block`.
pub fn page_checksum(page: &[u8; PAGE_SIZE], block: u32) -> u16 {
    let mut sums = BASE_OFFSETS;
    for (index, word) in page.chunks_exact(4).enumerate() {
        // The checksum field itself (bytes 8..10) counts as zero.
        let mut value = u32::from_le_bytes(word.try_into().unwrap());
        if index == 2 {
            value &= 0xFFFF_0000;
        }
        let lane = index % LANES;
        sums[lane] = mix(sums[lane], value);
    }
    for _ in 0..2 {
        for sum in sums.iter_mut() {
            *sum = mix(*sum, 0);
        }
    }
    let folded = sums.iter().fold(0u32, |acc, sum| acc ^ sum) ^ block;
    ((folded % 65535) + 1) as u16
}

/// Whether a page fails verification. New (all-zero) pages and pages written after the backup
/// started (their LSN is at or past `backup_start`) are not checked: WAL replay rewrites them.
pub fn page_is_corrupt(page: &[u8; PAGE_SIZE], block: u32, backup_start: u64) -> bool {
    let lsn = (u64::from(u32::from_le_bytes(page[0..4].try_into().unwrap())) << 32)
        | u64::from(u32::from_le_bytes(page[4..8].try_into().unwrap()));
    let upper = u16::from_le_bytes([page[14], page[15]]);
    if upper == 0 {
        return page.iter().any(|byte| *byte != 0);
    }
    if lsn >= backup_start {
        return false;
    }
    let stored = u16::from_le_bytes([page[8], page[9]]);
    stored != page_checksum(page, block)
}

/// Whether a file in the data directory is a relation data file with checksummed pages, and
/// its segment number (the `.N` suffix).
pub fn relation_segment(relative_path: &str) -> Option<u32> {
    let in_relation_directory = relative_path.starts_with("base/")
        || relative_path.starts_with("global/")
        || relative_path.starts_with("pg_tblspc/");
    if !in_relation_directory {
        return None;
    }
    let file_name = relative_path.rsplit('/').next()?;
    let (stem, segment) = match file_name.split_once('.') {
        Some((stem, segment)) => (stem, segment.parse().ok()?),
        None => (file_name, 0),
    };
    let node = stem
        .split_once('_')
        .map_or(stem, |(node, fork)| match fork {
            "fsm" | "vm" | "init" => node,
            _ => "",
        });
    (!node.is_empty() && node.bytes().all(|byte| byte.is_ascii_digit())).then_some(segment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_files_are_recognised() {
        assert_eq!(relation_segment("base/5/16384"), Some(0));
        assert_eq!(relation_segment("base/5/16384.2"), Some(2));
        assert_eq!(relation_segment("base/5/16384_fsm"), Some(0));
        assert_eq!(relation_segment("global/1262"), Some(0));
        assert_eq!(relation_segment("global/pg_control"), None);
        assert_eq!(relation_segment("base/5/PG_VERSION"), None);
        assert_eq!(relation_segment("base/5/pg_filenode.map"), None);
        assert_eq!(relation_segment("pg_xact/0000"), None);
    }

    #[test]
    fn a_flipped_bit_changes_the_checksum() {
        let mut page = [0u8; PAGE_SIZE];
        page[14] = 0x20; // pd_upper, so the page is not "new"
        page[4000] = 7;
        let checksum = page_checksum(&page, 3);
        page[8..10].copy_from_slice(&checksum.to_le_bytes());
        assert!(!page_is_corrupt(&page, 3, u64::MAX));
        assert!(
            page_is_corrupt(&page, 4, u64::MAX),
            "the block number is part of the checksum"
        );
        page[5000] ^= 1;
        assert!(page_is_corrupt(&page, 3, u64::MAX));
    }
}
