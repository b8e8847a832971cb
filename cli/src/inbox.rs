//! `seaorm-outbox inbox …`: the consumer side's dead letters, counts and retention.

use clap::{Args, Subcommand};
use sea_orm::DatabaseConnection;
use seaorm_outbox::dead_letter::{InboxDeadLetters, Selection};
use seaorm_outbox::inbox::Inbox;

use crate::{
    CliResult, Failure, dead_letters, parse_count, parse_duration, parse_id, parse_offset,
};

#[derive(Subcommand)]
pub(crate) enum InboxCommand {
    /// Processed ids and dead letters, per consumer or in all.
    Status {
        /// Only this consumer.
        #[arg(long)]
        consumer: Option<String>,
    },
    /// List, show, replay or discard the consumers' dead letters.
    #[command(subcommand)]
    Failed(InboxFailed),
    /// Delete processed ids older than a duration, in bounded batches. Below the longest
    /// redelivery you can get (a replay days later), a message would be applied twice.
    Purge {
        /// e.g. 7d, 36h.
        #[arg(long, value_name = "DURATION")]
        processed_older_than: String,
        /// Rows per DELETE statement.
        #[arg(long, default_value = "1000", value_name = "N")]
        batch_size: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum InboxFailed {
    /// Dead letters, oldest first.
    List {
        /// Only this consumer's.
        #[arg(long)]
        consumer: Option<String>,
        #[arg(long, default_value = "50")]
        limit: String,
        #[arg(long, default_value = "0")]
        offset: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter in full, payload included.
    Show { id: String },
    /// Ask the running consumer to apply dead letters again (it picks them up within its
    /// replay interval; a duplicate is dropped, a failure stays with the new error).
    Replay(Which),
    /// Delete dead letters without applying them.
    Discard(Which),
}

#[derive(Args)]
#[group(required = true, multiple = false)]
pub(crate) struct Which {
    /// One dead letter, by id.
    id: Option<String>,
    /// Every dead letter of this consumer.
    #[arg(long)]
    consumer: Option<String>,
    /// Every dead letter.
    #[arg(long)]
    all: bool,
}

impl Which {
    fn selection(&self) -> CliResult<Selection<'_>> {
        Ok(match (&self.id, &self.consumer) {
            (Some(id), _) => Selection::One(parse_id(id)?),
            (None, Some(c)) => Selection::Consumer(c),
            (None, None) => Selection::All,
        })
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

pub(crate) async fn run(db: &DatabaseConnection, cmd: InboxCommand) -> CliResult {
    let inbox = Inbox::new(db);
    let store = InboxDeadLetters::new(db);
    match cmd {
        InboxCommand::Status { consumer } => {
            let c = consumer.as_deref();
            out!("processed ids      {:>10}", inbox.count_processed(c).await?);
            out!(
                "dead letters       {:>10}",
                inbox.count_dead_letters(c).await?
            );
        }
        InboxCommand::Failed(InboxFailed::List {
            consumer,
            limit,
            offset,
            json,
        }) => {
            let (limit, offset) = (parse_count("--limit", &limit)?, parse_offset(&offset)?);
            let which = consumer
                .as_deref()
                .map_or(Selection::All, Selection::Consumer);
            dead_letters::list(&store, which, limit, offset, json).await?;
        }
        InboxCommand::Failed(InboxFailed::Show { id }) => {
            dead_letters::show(&store, parse_id(&id)?, false).await?;
        }
        InboxCommand::Failed(InboxFailed::Replay(which)) => {
            dead_letters::replay(&store, which.selection()?).await?;
        }
        InboxCommand::Failed(InboxFailed::Discard(which)) => {
            dead_letters::discard(&store, which.selection()?).await?;
        }
        InboxCommand::Purge {
            processed_older_than,
            batch_size,
        } => {
            let age = parse_duration("--processed-older-than", &processed_older_than)?;
            let batch = parse_count("--batch-size", &batch_size)?;
            let cutoff = chrono::Utc::now()
                - chrono::Duration::from_std(age)
                    .map_err(|_| Failure::input("duration too large"))?;
            let mut deleted = 0;
            loop {
                let n = inbox.purge_processed(cutoff, batch).await?;
                deleted += n;
                if n < batch {
                    break;
                }
            }
            out!(
                "purged {deleted} processed id{} older than {}",
                plural(deleted),
                humantime::format_duration(age)
            );
        }
    }
    Ok(())
}
