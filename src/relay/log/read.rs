//! One read of the slot: records → the events of each committed transaction, in commit order,
//! and the records that could not be read, each with the reason.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::event::{OutboxEvent, now};
use crate::store::logical::{LogDeadLetter, event_from_row};
use crate::store::{Lsn, Record, decode_pgoutput};

/// An event of a read, with the transaction it came in.
pub(super) struct Item {
    pub(super) event: OutboxEvent,
    /// Index into [`Read::ends`].
    pub(super) txn: usize,
    pub(super) attempts: u32,
}

/// What one read found.
#[derive(Default)]
pub(super) struct Read {
    pub(super) items: Vec<Item>,
    /// Each transaction's end position, in commit order.
    pub(super) ends: Vec<Lsn>,
    /// The oldest commit time in the read.
    pub(super) oldest_commit: Option<DateTime<Utc>>,
    /// Records that could not be read, to dead-letter before the slot moves past them.
    pub(super) unreadable: Vec<LogDeadLetter>,
}

/// What the reader needs to know of this outbox.
pub(super) struct Source<'a> {
    pub(super) slot: &'a str,
    pub(super) prefix: &'a str,
    /// Table mode: the schema whose `outbox_events` inserts are events.
    pub(super) table_schema: Option<&'a str>,
}

/// Relations seen, by id: pgoutput names a table's columns once per decoding call, before its
/// first change, and refers to it by id after that.
#[derive(Default)]
pub(super) struct Relations(HashMap<u32, (bool, Vec<String>)>);

impl Source<'_> {
    pub(super) fn read(&self, rows: Vec<(Lsn, Vec<u8>)>, relations: &mut Relations) -> Read {
        let mut read = Read::default();
        let mut commit_at = None;
        for (lsn, data) in rows {
            let record = match decode_pgoutput(&data) {
                Ok(r) => r,
                Err(reason) => {
                    read.unreadable.push(self.unreadable(
                        lsn,
                        &data,
                        format!("undecodable pgoutput record: {reason}"),
                    ));
                    continue;
                }
            };
            match record {
                Record::Begin { commit_at: at } => {
                    commit_at = Some(at);
                    read.oldest_commit.get_or_insert(at);
                }
                Record::Commit { end_lsn } => {
                    read.ends.push(end_lsn);
                    commit_at = None;
                }
                Record::Relation {
                    id,
                    namespace,
                    name,
                    columns,
                } => {
                    let ours =
                        name == "outbox_events" && Some(namespace.as_str()) == self.table_schema;
                    relations.0.insert(id, (ours, columns));
                }
                Record::Insert { relation, values } => match relations.0.get(&relation) {
                    Some((true, columns)) => {
                        let at = commit_at.unwrap_or_else(now);
                        match event_from_row(columns, &values, at) {
                            Ok(event) => self.push(&mut read, event),
                            Err(reason) => read.unreadable.push(self.unreadable(
                                lsn,
                                &data,
                                format!("outbox row not readable: {reason}"),
                            )),
                        }
                    }
                    Some((false, _)) => {}
                    None => read.unreadable.push(self.unreadable(
                        lsn,
                        &data,
                        format!("insert into relation {relation}, which was never described"),
                    )),
                },
                Record::Message {
                    transactional,
                    prefix,
                    content,
                } => {
                    if prefix != self.prefix {
                        continue; // another application's messages, or our heartbeat
                    }
                    let at = commit_at.unwrap_or_else(now);
                    if !transactional {
                        read.unreadable.push(self.unreadable(
                            lsn,
                            &content,
                            "a non-transactional message: not written by Outbox::emit".into(),
                        ));
                        continue;
                    }
                    match OutboxEvent::from_envelope(&content, at) {
                        Ok(event) => self.push(&mut read, event),
                        Err(reason) => read.unreadable.push(self.unreadable(lsn, &content, reason)),
                    }
                }
                Record::Other => {}
            }
        }
        read
    }

    fn push(&self, read: &mut Read, event: OutboxEvent) {
        read.items.push(Item {
            event,
            txn: read.ends.len(),
            attempts: 0,
        });
    }

    /// A dead letter for a record; its id is a hash of where it is, so reading the record again
    /// (after a crash) finds the same dead letter instead of adding another.
    fn unreadable(&self, lsn: Lsn, raw: &[u8], error: String) -> LogDeadLetter {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let hash = |salt: u8| {
            let mut h = DefaultHasher::new();
            (salt, self.slot, lsn, raw).hash(&mut h);
            h.finish()
        };
        LogDeadLetter {
            id: Uuid::from_u64_pair(hash(0), hash(1)),
            event: None,
            raw: Some(String::from_utf8_lossy(raw).into_owned()),
            slot: self.slot.to_owned(),
            error,
            attempts: 0,
            failed_at: now(),
        }
    }
}
