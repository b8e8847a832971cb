//! What a claim asks for and gets, and the per-aggregate head test every backend's claim shares.
//! The claims themselves are per backend: see [`postgres`](super::postgres),
//! [`mysql`](super::mysql) and [`sqlite`](super::sqlite).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::rows::ClaimedRow;

/// A key in the due index's order, `(next_attempt_at, id)`.
pub(crate) type DueKey = (DateTime<Utc>, Uuid);

/// One claim's parameters.
pub(crate) struct Claim<'a> {
    /// The batch's lease token.
    pub(crate) token: &'a str,
    pub(crate) now: DateTime<Utc>,
    pub(crate) lease_end: DateTime<Utc>,
    pub(crate) limit: u32,
    /// Per-aggregate order: only an aggregate's head and the events after it are claimed.
    pub(crate) ordered: bool,
    /// Under per-aggregate order, a dead letter blocks its aggregate's later events too.
    pub(crate) hold_dead_letters: bool,
    /// A claim made while this relay's previous batch is still being written back: under
    /// per-aggregate order it only looks within the window and never walks the backlog, as its
    /// own in-flight aggregates may be all that is left.
    pub(crate) opportunistic: bool,
    /// Per-aggregate order on PostgreSQL: the most consecutive events one aggregate adds to
    /// the batch.
    pub(crate) share: u32,
    /// PostgreSQL: where the scan of due rows starts; `None` scans them all. The relay passes
    /// `None` on the other backends, which leave no dead index entries behind.
    pub(crate) from: Option<DueKey>,
}

/// What a claim found.
pub(crate) struct Claimed {
    pub(crate) rows: Vec<ClaimedRow>,
    /// It searched the whole due backlog for aggregate heads (per-aggregate order). An empty
    /// claim that did is the one expensive poll worth throttling; any other empty claim is
    /// cheap, and a slow one only means a busy server.
    pub(crate) walked: bool,
}

impl Claim<'_> {
    /// The statuses of earlier events that block an event under per-aggregate order.
    pub(super) fn blocking(&self) -> &'static str {
        if self.hold_dead_letters {
            "'pending', 'failed'"
        } else {
            "'pending'"
        }
    }

    /// `a` (an earlier event of `e`'s aggregate) is not a scheduled event nobody has touched yet
    /// that is due after `e`: unless written to hold its aggregate, such an event is ordered by
    /// its time and holds nothing.
    pub(super) fn not_scheduled_after_e(a: &str) -> String {
        format!(
            " AND NOT ({a}.status = 'pending' AND {a}.deliver_at IS NOT NULL \
             AND {a}.attempts = 0 AND {a}.next_attempt_at = {a}.deliver_at \
             AND NOT {a}.holds_aggregate AND {a}.next_attempt_at > e.next_attempt_at)"
        )
    }

    /// Not a scheduled event nobody has touched and not due by now (binds now): a head's
    /// followers leave it out, as it is ordered by its time. `a` is the row's alias and a dot,
    /// or nothing.
    pub(super) fn not_scheduled_yet(a: &str) -> String {
        format!(
            " AND NOT ({a}deliver_at IS NOT NULL AND {a}attempts = 0 \
             AND {a}next_attempt_at = {a}deliver_at AND NOT {a}holds_aggregate \
             AND {a}next_attempt_at > ?)"
        )
    }

    /// `NOT EXISTS` an earlier blocking event of `e`'s aggregate: `e` is its aggregate's head.
    /// The row comparison is an index condition on `outbox_events_aggregate_idx`, so the probe
    /// reads one entry, not the aggregate's whole backlog (on SQLite, whose index leaves
    /// `status` out to keep write-backs cheap, it steps over the aggregate's retained published
    /// rows too). `fence` is PostgreSQL's probe tail,
    /// which keeps the probe a plain index scan rather than a hash anti-join.
    pub(crate) fn is_head(&self, fence: &str) -> String {
        format!(
            "NOT EXISTS (SELECT 1 FROM outbox_events p \
               WHERE p.aggregate_type = e.aggregate_type AND p.aggregate_id = e.aggregate_id \
               AND p.status IN ({}){} \
               AND (p.occurred_at, p.id) < (e.occurred_at, e.id){fence})",
            self.blocking(),
            Self::not_scheduled_after_e("p")
        )
    }

    /// Due heads, oldest due first, at most `limit` of them; binds now and the limit. `also` is
    /// an extra condition on `e` (PostgreSQL: not held by a live lease).
    pub(crate) fn heads(&self, lock: &str, fence: &str, also: &str) -> String {
        format!(
            "SELECT e.id, e.aggregate_type, e.aggregate_id FROM outbox_events e \
             WHERE e.status = 'pending' AND e.next_attempt_at <= ?{also} AND {} \
             ORDER BY e.next_attempt_at, e.id LIMIT ?{lock}",
            self.is_head(fence)
        )
    }
}
