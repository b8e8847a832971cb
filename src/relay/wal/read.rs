//! Records → reads: the events of each committed transaction, in commit order, and the
//! records that could not be read, each with the reason. Both transports feed it one record
//! at a time.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::event::{OutboxEvent, now};
use crate::store::LogDeadLetter;
use crate::store::logical::event_from_row;
use crate::store::{Lsn, Record};

/// An event of a read, with the transaction it came in.
pub(super) struct Item {
    pub(super) event: OutboxEvent,
    /// Index into [`Read::ends`].
    pub(super) txn: usize,
    pub(super) attempts: u32,
}

/// Whole transactions, ready to deliver.
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

/// Builds [`Read`]s from records.
pub(super) struct Assembler {
    slot: String,
    prefix: String,
    /// Table mode: the schema whose `outbox_events` inserts are events.
    table_schema: Option<String>,
    /// Relations seen, by id: pgoutput names a table's columns before its first change in a
    /// session, and refers to it by id after that.
    relations: HashMap<u32, (bool, Vec<String>)>,
    /// The open transaction's commit time, between its Begin and Commit.
    open: Option<DateTime<Utc>>,
    /// The open transaction's events, kept back until it commits.
    open_items: Vec<OutboxEvent>,
    read: Read,
}

impl Assembler {
    pub(super) fn new(slot: &str, prefix: &str, table_schema: Option<String>) -> Self {
        Self {
            slot: slot.to_owned(),
            prefix: prefix.to_owned(),
            table_schema,
            relations: HashMap::new(),
            open: None,
            open_items: Vec::new(),
            read: Read::default(),
        }
    }

    /// Whether a transaction is open (its Commit not yet seen).
    pub(super) fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Events in whole transactions so far.
    pub(super) fn events(&self) -> usize {
        self.read.items.len()
    }

    /// Whether there is anything to deliver or keep.
    pub(super) fn is_empty(&self) -> bool {
        self.read.ends.is_empty() && self.read.unreadable.is_empty()
    }

    /// The whole transactions so far; an open one stays.
    pub(super) fn take(&mut self) -> Read {
        std::mem::take(&mut self.read)
    }

    /// A raw record at `lsn`.
    pub(super) fn push_raw(&mut self, lsn: Lsn, data: &[u8]) {
        match crate::store::decode_pgoutput(data) {
            Ok(record) => self.push(lsn, record, data),
            Err(reason) => {
                let d =
                    self.unreadable(lsn, data, format!("undecodable pgoutput record: {reason}"));
                self.read.unreadable.push(d);
            }
        }
    }

    /// A decoded record at `lsn`; `raw` is kept if it cannot be read as an event.
    pub(super) fn push(&mut self, lsn: Lsn, record: Record, raw: &[u8]) {
        match record {
            Record::Begin { commit_at } => {
                self.open = Some(commit_at);
                self.open_items.clear();
            }
            Record::Commit { end_lsn } => {
                let at = self.open.take();
                if let Some(at) = at {
                    self.read.oldest_commit.get_or_insert(at);
                }
                let txn = self.read.ends.len();
                for event in self.open_items.drain(..) {
                    self.read.items.push(Item {
                        event,
                        txn,
                        attempts: 0,
                    });
                }
                self.read.ends.push(end_lsn);
            }
            Record::Relation {
                id,
                namespace,
                name,
                columns,
            } => {
                let ours = name == "outbox_events"
                    && self.table_schema.as_deref() == Some(namespace.as_str());
                self.relations.insert(id, (ours, columns));
            }
            Record::Insert { relation, values } => match self.relations.get(&relation) {
                Some((true, columns)) => {
                    let at = self.open.unwrap_or_else(now);
                    match event_from_row(columns, &values, at) {
                        // A log relay cannot hold a row for later (the slot would hold the WAL
                        // until then), and must not send it early: kept as a dead letter that
                        // an operator can replay when it is due.
                        Ok(event) => match event.deliver_at {
                            Some(due) if due > now() => {
                                let d = self.unreadable(
                                    lsn,
                                    raw,
                                    format!(
                                        "scheduled for {due}: the table-mode log relay does not \
                                         deliver scheduled events (use the polling relay)"
                                    ),
                                );
                                self.read.unreadable.push(LogDeadLetter {
                                    id: event.id,
                                    event: Some(event),
                                    raw: None,
                                    ..d
                                });
                            }
                            _ => self.open_items.push(event),
                        },
                        Err(reason) => {
                            let d = self.unreadable(
                                lsn,
                                raw,
                                format!("outbox row not readable: {reason}"),
                            );
                            self.read.unreadable.push(d);
                        }
                    }
                }
                Some((false, _)) => {}
                None => {
                    let d = self.unreadable(
                        lsn,
                        raw,
                        format!("insert into relation {relation}, which was never described"),
                    );
                    self.read.unreadable.push(d);
                }
            },
            Record::Message {
                transactional,
                prefix,
                content,
            } => {
                if prefix != self.prefix {
                    return; // another application's messages, or our heartbeat
                }
                if !transactional {
                    let d = self.unreadable(
                        lsn,
                        &content,
                        "a non-transactional message: not written by Outbox::emit".into(),
                    );
                    self.read.unreadable.push(d);
                    return;
                }
                let at = self.open.unwrap_or_else(now);
                match OutboxEvent::from_envelope(&content, at) {
                    Ok(event) => self.open_items.push(event),
                    Err(reason) => {
                        let d = self.unreadable(lsn, &content, reason);
                        self.read.unreadable.push(d);
                    }
                }
            }
            Record::Other => {}
        }
    }

    /// A dead letter for a record; its id is a hash of where it is, so reading the record again
    /// (after a crash) finds the same dead letter instead of adding another.
    fn unreadable(&self, lsn: Lsn, raw: &[u8], error: String) -> LogDeadLetter {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let hash = |salt: u8| {
            let mut h = DefaultHasher::new();
            (salt, &self.slot, lsn, raw).hash(&mut h);
            h.finish()
        };
        LogDeadLetter {
            id: Uuid::from_u64_pair(hash(0), hash(1)),
            event: None,
            raw: Some(String::from_utf8_lossy(raw).into_owned()),
            slot: self.slot.clone(),
            error,
            attempts: 0,
            failed_at: now(),
        }
    }
}
