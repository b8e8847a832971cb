//! [`Transport::Sql`](super::Transport::Sql): the slot read by polling
//! `pg_logical_slot_peek_binary_changes` and confirmed with `pg_replication_slot_advance`, over
//! the leader's ordinary connection.

use tokio_util::sync::CancellationToken;

use super::session::Session;
use super::{LogRelay, LogRelayStats};
use crate::error::Result;
use crate::publisher::Publisher;
use crate::store::logical;

/// What one read did.
pub(super) struct Step {
    pub(super) events: usize,
    /// The read stopped at `max_changes`: there is more.
    pub(super) full: bool,
    /// The relay is stopping.
    pub(super) stopped: bool,
}

impl<P: Publisher> LogRelay<P> {
    /// One read: peek, deliver, keep what must be kept, confirm.
    pub(super) async fn sql_step(
        &self,
        s: &mut Session,
        cancel: &CancellationToken,
        stats: &mut LogRelayStats,
        stop_when_unavailable: bool,
    ) -> Result<Step> {
        let c = &self.config;
        self.touch();
        let upto = logical::current_lsn(&mut s.conn).await?;
        let rows = logical::peek(&mut s.conn, &c.slot, &c.publication, upto, c.max_changes).await?;
        // A read ends at a transaction's end once it has `max_changes` records.
        let full = rows.len() >= c.max_changes as usize;
        for (lsn, data) in &rows {
            s.asm.push_raw(*lsn, data);
        }
        let read = s.asm.take();
        let settled = self
            .settle(s, read, cancel, stats, stop_when_unavailable)
            .await?;
        // A read that stopped short of `max_changes` has decoded every commit before `upto`.
        let target = if settled.stopped || full {
            settled.target
        } else {
            Some(settled.target.map_or(upto, |t| t.max(upto)))
        };
        if let Some(t) = target
            && t > s.confirmed
        {
            logical::advance(&mut s.conn, &c.slot, t).await?;
            s.confirmed = t;
        }
        if settled.events == 0 {
            self.beat(s, stats).await?;
        }
        self.record_lag(s, upto).await;
        Ok(Step {
            events: settled.events,
            full,
            stopped: settled.stopped,
        })
    }
}
