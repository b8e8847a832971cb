//! What `failed …`, `inbox failed …` and `log failed …` share: every kind of dead letter is
//! listed, shown, replayed and discarded through the core's [`DeadLetterStore`], and printed
//! the same way.

use seaorm_outbox::dead_letter::{DeadLetter, DeadLetterKind, DeadLetterStore, Selection};
use uuid::Uuid;

use crate::{CliResult, Failure};

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn row(d: &DeadLetter) -> String {
    let error: String = d.error.chars().take(60).collect();
    format!(
        "{}  {}  {:>3}  {}  {}{}",
        d.id,
        d.failed_at.map_or_else(
            || "-".to_owned(),
            |t| t.format("%Y-%m-%d %H:%M:%S").to_string()
        ),
        d.attempts,
        d.summary,
        error.replace('\n', " "),
        if d.replay_pending {
            "  [replay requested]"
        } else {
            ""
        }
    )
}

/// A page of `which`, as lines or as a JSON array of the records; then how many there are.
pub(crate) async fn list(
    store: &dyn DeadLetterStore,
    which: Selection<'_>,
    limit: u64,
    offset: u64,
    json: bool,
) -> CliResult {
    let page = store.list(which, limit, offset).await?;
    if json {
        let all: Vec<_> = page.into_iter().map(|d| d.detail).collect();
        out!("{}", serde_json::Value::Array(all));
        return Ok(());
    }
    for d in &page {
        out!("{}", row(d));
    }
    out!(
        "{} {}s shown of {}",
        page.len(),
        store.kind().noun(),
        store.count(which).await?
    );
    Ok(())
}

/// One, in full.
pub(crate) async fn show(store: &dyn DeadLetterStore, id: Uuid, compact: bool) -> CliResult {
    let d = store
        .show(id)
        .await?
        .ok_or_else(|| Failure::from(format!("{} {id} not found", store.kind().noun())))?;
    if compact {
        out!("{}", serde_json::to_string(&d.detail)?);
    } else {
        out!("{}", serde_json::to_string_pretty(&d.detail)?);
    }
    Ok(())
}

pub(crate) async fn replay(store: &dyn DeadLetterStore, which: Selection<'_>) -> CliResult {
    let n = store.replay(which).await?;
    let noun = store.kind().noun();
    match store.kind() {
        // The consumer applies them when it next looks (its replay_interval).
        DeadLetterKind::Inbox => out!("replay requested for {n} {noun}{}", plural(n)),
        _ => out!("replayed {n} {noun}{}", plural(n)),
    }
    Ok(())
}

pub(crate) async fn discard(store: &dyn DeadLetterStore, which: Selection<'_>) -> CliResult {
    let n = store.discard(which).await?;
    out!("discarded {n} {}{}", store.kind().noun(), plural(n));
    Ok(())
}
