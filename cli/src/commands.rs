//! `status`, `failed …` and `purge`.

use std::time::Duration;

use clap::{Args, Subcommand};
use sea_orm::DatabaseConnection;
use seaorm_outbox::relay::BreakerState;
use seaorm_outbox::{Outbox, OutboxEvent, RelayHeartbeat};

use crate::{CliResult, Failure, parse_count, parse_id, parse_offset};

#[derive(Subcommand)]
pub(crate) enum Failed {
    /// List dead letters, most recent first.
    List {
        #[arg(long, default_value = "50")]
        limit: String,
        #[arg(long, default_value = "0")]
        offset: String,
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter (any event, in fact) in full.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back to pending, attempts reset.
    Replay(Replay),
    /// Delete a dead letter for good.
    Discard { id: String },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
pub(crate) struct Replay {
    /// One event id.
    id: Option<String>,
    /// Every dead letter.
    #[arg(long)]
    all: bool,
    /// Every dead letter of one aggregate, as TYPE:ID.
    #[arg(long, value_name = "TYPE:ID")]
    aggregate: Option<String>,
}

fn secs(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// Relays heard from within this long count as running (they beat every 10 s by default).
const RELAYS_WITHIN: Duration = Duration::from_secs(60);

pub(crate) async fn status(db: &DatabaseConnection, json: bool) -> CliResult {
    let outbox = Outbox::new(db);
    let s = outbox.stats().await?;
    // A schema from before the relay table still has a backlog to show.
    let relays = outbox.relays(RELAYS_WITHIN).await.ok();
    // The log relay's slots and dead letters, on PostgreSQL.
    let (slots, log_dead) = if db.get_database_backend() == sea_orm::DbBackend::Postgres {
        (
            seaorm_outbox::relay::log::slots(db).await.ok(),
            seaorm_outbox::relay::log::LogDeadLetters::new(db)
                .count()
                .await
                .ok(),
        )
    } else {
        (None, None)
    };
    if json {
        let mut v = serde_json::to_value(&s)?;
        v["pending"] = s.pending().into();
        v["oldest_pending_age_seconds"] = s.oldest_pending_age().map(|d| d.as_secs_f64()).into();
        v["relays"] = serde_json::to_value(&relays)?;
        v["slots"] = serde_json::to_value(&slots)?;
        v["log_dead_letters"] = log_dead.into();
        println!("{v}");
        return Ok(());
    }
    println!("pending            {:>10}", s.pending());
    println!("  due now          {:>10}", s.pending_due);
    println!("  in backoff       {:>10}", s.pending_backoff);
    println!("  leased           {:>10}", s.pending_leased);
    println!("failed             {:>10}", s.failed);
    println!(
        "oldest pending     {:>10}",
        s.oldest_pending_age().map_or_else(|| "-".to_owned(), secs)
    );
    println!("published last 1h  {:>10}", s.published_last_hour);
    if let Some(slots) = &slots {
        println!("log slots          {:>10}", slots.len());
        for slot in slots {
            println!(
                "  {}  {}  lag {} B  retains {} B  wal {}  confirmed {}",
                slot.name,
                if slot.active { "in use" } else { "idle" },
                slot.lag_bytes,
                slot.retained_bytes,
                slot.wal_status,
                slot.confirmed_lsn
            );
        }
    }
    if let Some(n) = log_dead {
        println!("log dead letters   {n:>10}");
    }
    match relays {
        None => {
            println!("relays                      ? (outbox_relays missing: run the migrations)")
        }
        Some(relays) => {
            println!("relays (last 1m)   {:>10}", relays.len());
            for r in relays {
                println!("  {}  {}  {}", r.name, r.publisher, breaker(&r, s.at));
            }
        }
    }
    Ok(())
}

fn breaker(r: &RelayHeartbeat, now: chrono::DateTime<chrono::Utc>) -> String {
    let state = match r.breaker {
        BreakerState::Closed => return "broker answering (breaker closed)".to_owned(),
        BreakerState::Open => "open",
        BreakerState::HalfOpen => "half-open",
        _ => "unknown",
    };
    let down = r
        .unavailable_since
        .and_then(|t| (now - t).to_std().ok())
        .map_or_else(|| "-".to_owned(), secs);
    format!(
        "broker UNAVAILABLE for {down} (breaker {state}): {}",
        r.last_error.as_deref().unwrap_or("")
    )
}

fn row(e: &OutboxEvent) -> String {
    let error: String = e
        .last_error
        .as_deref()
        .unwrap_or("")
        .chars()
        .take(60)
        .collect();
    format!(
        "{}  {}  {:>3}  {:<24} {}/{}  {}",
        e.id,
        e.failed_at.map_or_else(
            || "-".to_owned(),
            |t| t.format("%Y-%m-%d %H:%M:%S").to_string()
        ),
        e.attempts,
        e.event_type,
        e.aggregate_type,
        e.aggregate_id,
        error.replace('\n', " ")
    )
}

pub(crate) async fn failed(db: &DatabaseConnection, cmd: Failed) -> CliResult {
    let outbox = Outbox::new(db);
    match cmd {
        Failed::List {
            limit,
            offset,
            json,
        } => {
            let limit = parse_count("--limit", &limit)?;
            let offset = parse_offset(&offset)?;
            let events = outbox.list_failed(limit, offset).await?;
            if json {
                println!("{}", serde_json::to_string(&events)?);
            } else {
                for e in &events {
                    println!("{}", row(e));
                }
                println!(
                    "{} dead letters shown of {}",
                    events.len(),
                    outbox.count_failed().await?
                );
            }
        }
        Failed::Show { id, json } => {
            let e = outbox.get(parse_id(&id)?).await?;
            if json {
                println!("{}", serde_json::to_string(&e)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&e)?);
            }
        }
        Failed::Replay(r) => {
            let n = if let Some(id) = r.id {
                outbox.requeue(parse_id(&id)?).await?;
                1
            } else if r.all {
                outbox.requeue_all().await?
            } else if let Some(agg) = r.aggregate {
                let (ty, id) = agg
                    .split_once(':')
                    .filter(|(t, i)| !t.is_empty() && !i.is_empty())
                    .ok_or_else(|| {
                        Failure::input(format!("invalid aggregate `{agg}`: expected TYPE:ID"))
                    })?;
                outbox.requeue_aggregate(ty, id).await?
            } else {
                0
            };
            println!("requeued {n} dead letter{}", if n == 1 { "" } else { "s" });
        }
        Failed::Discard { id } => {
            outbox.discard(parse_id(&id)?).await?;
            println!("discarded 1 dead letter");
        }
    }
    Ok(())
}

pub(crate) async fn purge(db: &DatabaseConnection, age: Duration, batch: u64) -> CliResult {
    let outbox = Outbox::new(db);
    let cutoff = chrono::Utc::now()
        - chrono::Duration::from_std(age).map_err(|_| Failure::input("duration too large"))?;
    let total = outbox.count_published_before(cutoff).await?;
    // Drawn only on a terminal; hidden when piped.
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} deleted ({per_sec})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut deleted = 0;
    loop {
        let n = outbox.purge_published_batch(cutoff, batch).await?;
        deleted += n;
        bar.inc(n);
        if n < batch {
            break;
        }
    }
    bar.finish_and_clear();
    println!(
        "purged {deleted} published event{} older than {}",
        if deleted == 1 { "" } else { "s" },
        humantime::format_duration(age)
    );
    Ok(())
}
