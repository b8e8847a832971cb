//! `cargo loco task outbox:status | outbox:replay | outbox:purge`.

use async_trait::async_trait;
use loco_rs::app::AppContext;
use loco_rs::task::{Task, TaskInfo, Tasks, Vars};
use seaorm_outbox::Outbox;

/// Registers the outbox's tasks; call it from `Hooks::register_tasks`.
pub fn register(tasks: &mut Tasks) {
    tasks.register(Status);
    tasks.register(Replay);
    tasks.register(Purge);
}

fn fail(e: impl std::fmt::Display) -> loco_rs::Error {
    loco_rs::Error::Message(e.to_string())
}

/// `outbox:status`: the backlog, dead letters and running relays.
struct Status;

#[async_trait]
impl Task for Status {
    fn task(&self) -> TaskInfo {
        TaskInfo {
            name: "outbox:status".into(),
            detail: "Show the outbox backlog, dead letters and relays".into(),
        }
    }

    async fn run(&self, ctx: &AppContext, _vars: &Vars) -> loco_rs::Result<()> {
        let outbox = Outbox::new(&ctx.db);
        let s = outbox.stats().await.map_err(fail)?;
        println!(
            "pending={} (due={} backoff={} leased={}) dead_letters={} published_last_hour={} oldest_pending_age={}",
            s.pending(),
            s.pending_due,
            s.pending_backoff,
            s.pending_leased,
            s.failed,
            s.published_last_hour,
            s.oldest_pending_age()
                .map_or_else(|| "-".to_owned(), |d| format!("{}s", d.as_secs())),
        );
        for r in outbox
            .relays(std::time::Duration::from_secs(60))
            .await
            .map_err(fail)?
        {
            println!(
                "relay {} publisher={} breaker={:?}{}",
                r.name,
                r.publisher,
                r.breaker,
                r.last_error
                    .map(|e| format!(" last_error={e}"))
                    .unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// `outbox:replay id:<uuid>` | `aggregate_type:<t> aggregate_id:<id>` | `all:true`.
struct Replay;

#[async_trait]
impl Task for Replay {
    fn task(&self) -> TaskInfo {
        TaskInfo {
            name: "outbox:replay".into(),
            detail:
                "Replay dead letters: id:<uuid> | aggregate_type:<t> aggregate_id:<id> | all:true"
                    .into(),
        }
    }

    async fn run(&self, ctx: &AppContext, vars: &Vars) -> loco_rs::Result<()> {
        let outbox = Outbox::new(&ctx.db);
        let arg = |k: &str| vars.cli.get(k).map(String::as_str);
        let n = match (
            arg("id"),
            arg("aggregate_type"),
            arg("aggregate_id"),
            arg("all"),
        ) {
            (Some(id), None, None, None) => {
                let id = id
                    .parse()
                    .map_err(|e| fail(format!("id:{id} is not a UUID: {e}")))?;
                outbox.replay(id).await.map_err(fail)?;
                1
            }
            (None, Some(t), Some(a), None) => outbox.replay_aggregate(t, a).await.map_err(fail)?,
            (None, None, None, Some("true")) => outbox.replay_all().await.map_err(fail)?,
            _ => {
                return Err(fail(
                    "give id:<uuid>, or aggregate_type:<t> aggregate_id:<id>, or all:true",
                ));
            }
        };
        tracing::info!(target: "seaorm_outbox::admin", who = "loco task", action = "replay", rows = n, "outbox admin replay");
        println!("replayed {n}");
        Ok(())
    }
}

/// `outbox:purge older_than:7d`: deletes published events older than that.
struct Purge;

#[async_trait]
impl Task for Purge {
    fn task(&self) -> TaskInfo {
        TaskInfo {
            name: "outbox:purge".into(),
            detail: "Delete published events: older_than:<duration, e.g. 7d>".into(),
        }
    }

    async fn run(&self, ctx: &AppContext, vars: &Vars) -> loco_rs::Result<()> {
        let text = vars.cli_arg("older_than")?;
        let age =
            humantime::parse_duration(text).map_err(|e| fail(format!("older_than:{text}: {e}")))?;
        let cutoff = chrono::Duration::from_std(age)
            .ok()
            .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
            .ok_or_else(|| fail(format!("older_than:{text} is too long")))?;
        let n = Outbox::new(&ctx.db)
            .purge_published(cutoff, 1000)
            .await
            .map_err(fail)?;
        tracing::info!(target: "seaorm_outbox::admin", who = "loco task", action = "purge", rows = n, "outbox admin purge");
        println!("purged {n}");
        Ok(())
    }
}
