//! pgoutput's binary protocol (version 1), as `pg_logical_slot_peek_binary_changes` returns it:
//! one record per row. Only what the log relay reads is decoded: transaction bounds, logical
//! messages, relations and inserts; every other record is [`Record::Other`].
//!
//! The format is PostgreSQL's "Logical Replication Message Formats" chapter: big-endian
//! integers, NUL-terminated strings, tuple columns in text form.

use chrono::{DateTime, Utc};

/// A log position (`pg_lsn`) as a number.
pub(crate) type Lsn = u64;

/// `pg_lsn`'s text form, `X/Y`, as SQL takes it.
pub(crate) fn lsn_text(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// One decoded record.
#[derive(Debug, PartialEq)]
pub(crate) enum Record {
    /// A committed transaction starts; `commit_at` is its commit time.
    Begin { commit_at: DateTime<Utc> },
    /// It ends; the slot may be advanced to `end_lsn` once everything before is delivered.
    Commit { end_lsn: Lsn },
    /// `pg_logical_emit_message`'s record.
    Message {
        transactional: bool,
        prefix: String,
        content: Vec<u8>,
    },
    /// A table's column names, sent before its first change in each decoding call.
    Relation {
        id: u32,
        namespace: String,
        name: String,
        columns: Vec<String>,
    },
    /// A new row: each column's text, `None` for NULL.
    Insert {
        relation: u32,
        values: Vec<Option<String>>,
    },
    /// Anything else (origin, type, update, delete, truncate).
    Other,
}

/// Why a record could not be decoded.
pub(crate) type DecodeError = String;

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(format!(
                "record truncated: wanted {n} more bytes, {} left",
                self.buf.len()
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or("unterminated string")?;
        let s = String::from_utf8(self.buf[..end].to_vec()).map_err(|e| e.to_string())?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// PostgreSQL's timestamps: microseconds since 2000-01-01 UTC.
    fn timestamp(&mut self) -> Result<DateTime<Utc>, DecodeError> {
        const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
        let micros = self.u64()? as i64;
        DateTime::from_timestamp_micros(micros.saturating_add(PG_EPOCH_MICROS))
            .ok_or_else(|| format!("timestamp {micros} out of range"))
    }
}

/// Decodes one record.
pub(crate) fn decode(data: &[u8]) -> Result<Record, DecodeError> {
    let mut r = Reader { buf: data };
    Ok(match r.u8()? {
        b'B' => {
            let _final_lsn = r.u64()?;
            let commit_at = r.timestamp()?;
            let _xid = r.u32()?;
            Record::Begin { commit_at }
        }
        b'C' => {
            let _flags = r.u8()?;
            let _commit_lsn = r.u64()?;
            let end_lsn = r.u64()?;
            Record::Commit { end_lsn }
        }
        b'M' => {
            let flags = r.u8()?;
            let _lsn = r.u64()?;
            let prefix = r.string()?;
            let len = r.u32()? as usize;
            let content = r.take(len)?.to_vec();
            Record::Message {
                transactional: flags & 1 == 1,
                prefix,
                content,
            }
        }
        b'R' => {
            let id = r.u32()?;
            let namespace = r.string()?;
            let name = r.string()?;
            let _replica_identity = r.u8()?;
            let n = r.u16()?;
            let mut columns = Vec::with_capacity(n.into());
            for _ in 0..n {
                let _flags = r.u8()?;
                columns.push(r.string()?);
                let _type_oid = r.u32()?;
                let _typmod = r.u32()?;
            }
            Record::Relation {
                id,
                namespace,
                name,
                columns,
            }
        }
        b'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => {}
                other => return Err(format!("insert with tuple kind {:?}", other as char)),
            }
            let n = r.u16()?;
            let mut values = Vec::with_capacity(n.into());
            for _ in 0..n {
                values.push(match r.u8()? {
                    b'n' => None,
                    b't' => {
                        let len = r.u32()? as usize;
                        let text = r.take(len)?;
                        Some(String::from_utf8(text.to_vec()).map_err(|e| e.to_string())?)
                    }
                    other => return Err(format!("column of kind {:?}", other as char)),
                });
            }
            Record::Insert { relation, values }
        }
        _ => Record::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    // Read off a PostgreSQL 15 slot (BENCHMARKS.md's setup): a message, then an insert.
    #[test]
    fn decodes_what_postgres_sent() {
        assert!(matches!(
            decode(&hex("4200000000015341200003049f457f42cf000002db")),
            Ok(Record::Begin { .. })
        ));
        assert_eq!(
            decode(&hex(
                "4d0100000000015340c87365616f726d5f6f7574626f7800000000077b2261223a317d"
            )),
            Ok(Record::Message {
                transactional: true,
                prefix: "seaorm_outbox".into(),
                content: br#"{"a":1}"#.to_vec(),
            })
        );
        assert_eq!(
            decode(&hex("4300000000000153412000000000015341500003049f457f42cf")),
            Ok(Record::Commit { end_lsn: 0x1534150 })
        );
        assert_eq!(
            decode(&hex(
                "52000040047075626c69630074006400030069640000000017ffffffff00747300000004a0ffffffff006a0000000edaffffffff"
            )),
            Ok(Record::Relation {
                id: 16388,
                namespace: "public".into(),
                name: "t".into(),
                columns: vec!["id".into(), "ts".into(), "j".into()],
            })
        );
        assert_eq!(
            decode(&hex(
                "49000040044e0003740000000132740000001d323032362d31322d30322030363a31303a34322e3439353834372b3030740000000a7b226b223a202276227d"
            )),
            Ok(Record::Insert {
                relation: 16388,
                values: vec![
                    Some("2".into()),
                    Some("2026-12-02 06:10:42.495847+00".into()),
                    Some(r#"{"k": "v"}"#.into()),
                ],
            })
        );
        assert_eq!(lsn_text(0x1_0153_4150), "1/1534150");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(&[]).is_err());
        assert!(decode(b"M\x01\x00\x00").is_err());
        assert!(decode(&hex("4d0100000000015340c873656100ffffffff")).is_err());
        assert!(decode(b"R\x00\x00\x00\x01abc").is_err());
        assert_eq!(decode(b"Ynothing"), Ok(Record::Other));
    }
}
