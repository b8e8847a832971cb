//! `status`, `failed …` and `purge`.

use std::time::Duration;

use clap::{Args, Subcommand};
use sea_orm::DatabaseConnection;
use seaorm_outbox::dead_letter::{OutboxDeadLetters, Selection};
use seaorm_outbox::relay::BreakerState;
use seaorm_outbox::{Outbox, RelayHeartbeat};

use crate::{CliResult, Failure, dead_letters, parse_count, parse_id, parse_offset};

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
    /// Show one dead letter in full.
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
            seaorm_outbox::relay::wal::slots(db).await.ok(),
            seaorm_outbox::relay::wal::LogDeadLetters::new(db)
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
        out!("{v}");
        return Ok(());
    }
    out!("pending            {:>10}", s.pending());
    out!("  due now          {:>10}", s.pending_due);
    out!("  in backoff       {:>10}", s.pending_backoff);
    out!("  leased           {:>10}", s.pending_leased);
    out!("scheduled          {:>10}", s.scheduled);
    if let Some(next) = s.next_scheduled_at {
        out!(
            "  next due at      {}",
            next.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
    }
    out!("failed             {:>10}", s.failed);
    out!(
        "oldest pending     {:>10}",
        s.oldest_pending_age().map_or_else(|| "-".to_owned(), secs)
    );
    out!("published last 1h  {:>10}", s.published_last_hour);
    if let Some(slots) = &slots {
        out!("log slots          {:>10}", slots.len());
        for slot in slots {
            out!(
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
        out!("log dead letters   {n:>10}");
    }
    match relays {
        None => {
            out!("relays                      ? (outbox_relays missing: run the migrations)")
        }
        Some(relays) => {
            out!("relays (last 1m)   {:>10}", relays.len());
            for r in relays {
                let owns = match r.partitions {
                    0 => String::new(),
                    n => format!("  owns {n}/256 partitions"),
                };
                out!("  {}  {}  {}{owns}", r.name, r.publisher, breaker(&r, s.at));
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

pub(crate) async fn failed(db: &DatabaseConnection, cmd: Failed) -> CliResult {
    let store = OutboxDeadLetters::new(db);
    match cmd {
        Failed::List {
            limit,
            offset,
            json,
        } => {
            let (limit, offset) = (parse_count("--limit", &limit)?, parse_offset(&offset)?);
            dead_letters::list(&store, Selection::All, limit, offset, json).await
        }
        Failed::Show { id, json } => dead_letters::show(&store, parse_id(&id)?, json).await,
        Failed::Replay(r) => {
            let aggregate = match &r.aggregate {
                Some(agg) => Some(
                    agg.split_once(':')
                        .filter(|(t, i)| !t.is_empty() && !i.is_empty())
                        .ok_or_else(|| {
                            Failure::input(format!("invalid aggregate `{agg}`: expected TYPE:ID"))
                        })?,
                ),
                None => None,
            };
            let which = match (r.id, aggregate) {
                (Some(id), _) => Selection::One(parse_id(&id)?),
                (None, Some((t, id))) => Selection::Aggregate(t, id),
                (None, None) => Selection::All,
            };
            dead_letters::replay(&store, which).await
        }
        Failed::Discard { id } => {
            dead_letters::discard(&store, Selection::One(parse_id(&id)?)).await
        }
    }
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
    out!(
        "purged {deleted} published event{} older than {}",
        if deleted == 1 { "" } else { "s" },
        humantime::format_duration(age)
    );
    Ok(())
}
