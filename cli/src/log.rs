//! `log failed …`: the log relay's dead letters (PostgreSQL), listed, replayed through the
//! log again, or discarded; `log slot drop`: a relay taken out of service.

use clap::{Args, Subcommand};
use sea_orm::DatabaseConnection;
use seaorm_outbox::dead_letter::Selection;
use seaorm_outbox::relay::wal::LogDeadLetters;

use crate::{CliResult, dead_letters, parse_count, parse_duration, parse_id, parse_offset};

#[derive(Subcommand)]
pub(crate) enum LogCommand {
    /// The log relay's dead letters (outbox_log_dead_letters).
    #[command(subcommand)]
    Failed(LogFailed),
    /// The log relay's replication slots.
    #[command(subcommand)]
    Slot(LogSlot),
}

#[derive(Subcommand)]
pub(crate) enum LogSlot {
    /// Drop a slot, to take a log relay out of service for good (stop the relay first): until
    /// then the server keeps WAL for it, and its database cannot be dropped.
    Drop {
        /// The slot's name (the relay's --slot).
        name: String,
        /// How long to wait for a relay that just stopped to let go of it.
        #[arg(long, default_value = "30s", value_name = "DURATION")]
        wait: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum LogFailed {
    /// List them, oldest first.
    List {
        #[arg(long, default_value = "50")]
        limit: String,
        #[arg(long, default_value = "0")]
        offset: String,
        #[arg(long)]
        json: bool,
    },
    /// Write events back to the log (as messages, same ids) for the relay to deliver again.
    Replay(LogReplay),
    /// Delete one for good.
    Discard { id: String },
}

#[derive(Args)]
pub(crate) struct LogReplay {
    /// One dead letter's id.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    id: Option<String>,
    /// Every one that holds an event.
    #[arg(long)]
    all: bool,
    /// The message prefix the log relay reads (its --message-prefix).
    #[arg(long, default_value = seaorm_outbox::repository::MESSAGE_PREFIX)]
    message_prefix: String,
}

pub(crate) async fn run(db: &DatabaseConnection, cmd: LogCommand) -> CliResult {
    match cmd {
        LogCommand::Failed(cmd) => failed(db, cmd).await,
        LogCommand::Slot(LogSlot::Drop { name, wait }) => {
            let wait = parse_duration("--wait", &wait)?;
            if seaorm_outbox::relay::wal::drop_slot(db, &name, wait).await? {
                out!("dropped replication slot {name}");
            } else {
                out!("no replication slot {name} in this database: nothing dropped");
            }
            Ok(())
        }
    }
}

async fn failed(db: &DatabaseConnection, cmd: LogFailed) -> CliResult {
    match cmd {
        LogFailed::List {
            limit,
            offset,
            json,
        } => {
            let (limit, offset) = (parse_count("--limit", &limit)?, parse_offset(&offset)?);
            let store = LogDeadLetters::new(db);
            dead_letters::list(&store, Selection::All, limit, offset, json).await
        }
        LogFailed::Replay(r) => {
            let store = LogDeadLetters::new(db).with_prefix(r.message_prefix);
            let which = match r.id {
                Some(id) => Selection::One(parse_id(&id)?),
                None => Selection::All,
            };
            dead_letters::replay(&store, which).await
        }
        LogFailed::Discard { id } => {
            let store = LogDeadLetters::new(db);
            dead_letters::discard(&store, Selection::One(parse_id(&id)?)).await
        }
    }
}
