//! `seaorm-outbox inbox …`: the consumer side's dead letters, counts and retention.

use clap::{Args, Subcommand};
use sea_orm::DatabaseConnection;
use seaorm_outbox::inbox::{DeadLetters, Inbox, InboxDeadLetter};

use crate::{CliResult, Failure, parse_count, parse_duration, parse_id, parse_offset};

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
    fn selector(&self) -> CliResult<DeadLetters<'_>> {
        Ok(match (&self.id, &self.consumer) {
            (Some(id), _) => DeadLetters::Id(parse_id(id)?),
            (None, Some(c)) => DeadLetters::Consumer(c),
            (None, None) => DeadLetters::All,
        })
    }
}

fn json(d: &InboxDeadLetter) -> serde_json::Value {
    serde_json::json!({
        "id": d.id,
        "consumer": d.consumer,
        "message_id": d.message_id,
        "ordering_key": d.ordering_key,
        "source": d.source,
        "position": d.position,
        "headers": d.headers,
        "payload": String::from_utf8_lossy(&d.payload),
        "error": d.error,
        "attempts": d.attempts,
        "received_at": d.received_at,
        "failed_at": d.failed_at,
        "replay_requested_at": d.replay_requested_at,
    })
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

pub(crate) async fn run(db: &DatabaseConnection, cmd: InboxCommand) -> CliResult {
    let inbox = Inbox::new(db);
    match cmd {
        InboxCommand::Status { consumer } => {
            let c = consumer.as_deref();
            println!("processed ids      {:>10}", inbox.count_processed(c).await?);
            println!(
                "dead letters       {:>10}",
                inbox.count_dead_letters(c).await?
            );
        }
        InboxCommand::Failed(InboxFailed::List {
            consumer,
            limit,
            offset,
            json: as_json,
        }) => {
            let limit = parse_count("--limit", &limit)?;
            let offset = parse_offset(&offset)?;
            let which = consumer
                .as_deref()
                .map_or(DeadLetters::All, DeadLetters::Consumer);
            let dead = inbox.dead_letters(which, limit, offset).await?;
            if as_json {
                let all: Vec<_> = dead.iter().map(json).collect();
                println!("{}", serde_json::Value::Array(all));
                return Ok(());
            }
            for d in &dead {
                let error: String = d.error.chars().take(60).collect();
                println!(
                    "{}  {}  {:>3}  {:<16} {:<38} {}{}",
                    d.id,
                    d.failed_at.format("%Y-%m-%d %H:%M:%S"),
                    d.attempts,
                    d.consumer,
                    d.message_id.as_deref().unwrap_or("(no id)"),
                    error.replace('\n', " "),
                    if d.replay_requested_at.is_some() {
                        "  [replay requested]"
                    } else {
                        ""
                    }
                );
            }
            println!(
                "{} dead letters shown of {}",
                dead.len(),
                inbox.count_dead_letters(consumer.as_deref()).await?
            );
        }
        InboxCommand::Failed(InboxFailed::Show { id }) => {
            let id = parse_id(&id)?;
            let found = inbox.dead_letters(DeadLetters::Id(id), 1, 0).await?;
            let d = found
                .first()
                .ok_or_else(|| Failure::from(format!("inbox dead letter {id} not found")))?;
            println!("{}", serde_json::to_string_pretty(&json(d))?);
        }
        InboxCommand::Failed(InboxFailed::Replay(which)) => {
            let n = inbox.replay(which.selector()?).await?;
            println!("replay requested for {n} inbox dead letter{}", plural(n));
        }
        InboxCommand::Failed(InboxFailed::Discard(which)) => {
            let n = inbox.discard(which.selector()?).await?;
            println!("discarded {n} inbox dead letter{}", plural(n));
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
            println!(
                "purged {deleted} processed id{} older than {}",
                plural(deleted),
                humantime::format_duration(age)
            );
        }
    }
    Ok(())
}
