//! `log failed …`: the log relay's dead letters (PostgreSQL), listed, replayed through the
//! log again, or discarded.

use clap::{Args, Subcommand};
use sea_orm::DatabaseConnection;
use seaorm_outbox::relay::log::{LogDeadLetter, LogDeadLetters};

use crate::{CliResult, parse_count, parse_id, parse_offset};

#[derive(Subcommand)]
pub(crate) enum LogCommand {
    /// The log relay's dead letters (outbox_log_dead_letters).
    #[command(subcommand)]
    Failed(LogFailed),
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

fn row(d: &LogDeadLetter) -> String {
    let what = match &d.event {
        Some(e) => format!(
            "{:<24} {}/{}",
            e.event_type, e.aggregate_type, e.aggregate_id
        ),
        None => "(unreadable record)".to_owned(),
    };
    let error: String = d.error.chars().take(60).collect();
    format!(
        "{}  {}  {:>3}  {what}  {}",
        d.id,
        d.failed_at.format("%Y-%m-%d %H:%M:%S"),
        d.attempts,
        error.replace('\n', " ")
    )
}

pub(crate) async fn run(db: &DatabaseConnection, cmd: LogCommand) -> CliResult {
    let LogCommand::Failed(cmd) = cmd;
    match cmd {
        LogFailed::List {
            limit,
            offset,
            json,
        } => {
            let dead = LogDeadLetters::new(db);
            let list = dead
                .list(parse_count("--limit", &limit)?, parse_offset(&offset)?)
                .await?;
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else {
                for d in &list {
                    println!("{}", row(d));
                }
                println!(
                    "{} log dead letters shown of {}",
                    list.len(),
                    dead.count().await?
                );
            }
        }
        LogFailed::Replay(r) => {
            let dead = LogDeadLetters::new(db).with_prefix(r.message_prefix);
            let n = match r.id {
                Some(id) => {
                    dead.replay(parse_id(&id)?).await?;
                    1
                }
                None => dead.replay_all().await?,
            };
            println!(
                "replayed {n} log dead letter{}",
                if n == 1 { "" } else { "s" }
            );
        }
        LogFailed::Discard { id } => {
            LogDeadLetters::new(db).discard(parse_id(&id)?).await?;
            println!("discarded 1 log dead letter");
        }
    }
    Ok(())
}
