//! Which of the [`PARTITIONS`] hash partitions an aggregate's events fall in.
//!
//! The partition is what relays divide among themselves for per-aggregate order: every event of
//! one aggregate lands in one partition, so the one relay that owns it can deliver the
//! aggregate's events in order without asking the database whether each is its aggregate's
//! head. The hash is fixed and documented, so any writer can compute it:
//!
//! > the first four bytes of the MD5 digest of `aggregate_type + ":" + aggregate_id` (UTF-8),
//! > read as a big-endian unsigned 32-bit integer, modulo 256.
//!
//! The separator makes two keys collide now and then (`("a:b", "c")` and `("a", "b:c")`):
//! harmless, as a partition only groups aggregates, it never merges them. Writers other than
//! this library need not compute it: PostgreSQL's insert trigger and MySQL's generated column
//! fill it in (see the `partitions` migration), and a relay assigns any row still without one
//! before it claims.

use md5::{Digest, Md5};

/// How many hash partitions the outbox is divided into; fixed, like the hash.
pub const PARTITIONS: u16 = 256;

/// The partition of aggregate `(aggregate_type, aggregate_id)`: see the module docs.
///
/// ```
/// use seaorm_outbox::event::partition_of;
///
/// let p = partition_of("order", "42");
/// assert!(p < seaorm_outbox::event::PARTITIONS);
/// assert_eq!(p, partition_of("order", "42"), "stable");
/// ```
pub fn partition_of(aggregate_type: &str, aggregate_id: &str) -> u16 {
    let mut md5 = Md5::new();
    md5.update(aggregate_type.as_bytes());
    md5.update(b":");
    md5.update(aggregate_id.as_bytes());
    let digest = md5.finalize();
    let head = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    // Fits: the remainder is below 256.
    (head % u32::from(PARTITIONS)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_documented_hash() {
        // md5("order:42") starts d978d567: 3648574823 % 256 = 103, as PostgreSQL's
        // ('x' || substr(md5('order:42'), 1, 8))::bit(32)::bigint % 256 and MariaDB's
        // CONV(SUBSTRING(MD5('order:42'), 1, 8), 16, 10) % 256 both say.
        assert_eq!(partition_of("order", "42"), 103);
        let spread: std::collections::BTreeSet<u16> = (0..4096)
            .map(|i| partition_of("order", &i.to_string()))
            .collect();
        assert_eq!(
            spread.len(),
            usize::from(PARTITIONS),
            "every partition is used"
        );
    }
}
