//! A batch's write-back: its fates written while its lease (or ownership) holds, retried on
//! database errors, and accounted for in stats and metrics.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::Instrument;
use uuid::Uuid;

use super::batch::Offered;
use super::{Relay, RelayStats, lock};
use crate::publisher::Publisher;
use crate::store::{self, Fate};
use crate::telemetry;

impl<P: Publisher> Relay<P> {
    /// Writes an offered batch's fates back and accounts for them; nothing without a batch.
    pub(super) async fn finish(&self, offered: Option<Offered>) -> RelayStats {
        let Some(o) = offered else {
            return RelayStats::default();
        };
        let seq = o.seq;
        let stats = self.write_offered(o).await;
        // Lanes opened by later batches wait for this one ([`lanes`](super::lanes)).
        self.written.fetch_max(seq, AtomicOrdering::AcqRel);
        stats
    }

    async fn write_offered(&self, o: Offered) -> RelayStats {
        if o.by_id.is_empty() {
            // Everything claimed went to lanes.
            return RelayStats::default();
        }
        let mut stats = RelayStats {
            batches: 1,
            ..RelayStats::default()
        };
        let written = self
            .write_back(&o.token, o.epoch, &o.by_id, o.lease_end)
            .instrument(
                tracing::debug_span!("outbox.write_back", relay = %self.name, events = o.by_id.len()),
            )
            .await;
        if let Some(w) = &written {
            stats.published = w.published;
            stats.retried = w.retried;
            stats.dead_lettered = w.dead;
            let count = |f: fn(&Fate) -> bool| o.fates.iter().filter(|x| f(x)).count() as u64;
            let gone = (
                count(|f| matches!(f, Fate::Dead { .. })),
                count(|f| *f == Fate::Discard),
            );
            if (w.dead, w.discarded) == gone {
                stats.expired = count(Fate::is_expiry);
            }
            stats.released = w.released;
            stats.lost_leases = w.lost();
            if stats.lost_leases > 0 {
                tracing::warn!(relay = %self.name, lost = stats.lost_leases,
                    "outbox lease expired before write-back; another relay owns those events");
            }
        }
        telemetry::metrics::record_batch(
            self.publisher.name(),
            self.tenant.as_deref(),
            &o.events,
            &o.fates,
            written.as_ref(),
            o.started.elapsed(),
        );
        stats
    }

    /// Writes the batch's fates back, retrying database errors while the lease lasts. Giving up
    /// is safe: the events stay leased and are retried after the lease ends.
    async fn write_back(
        &self,
        token: &str,
        epoch: Option<i64>,
        fates: &[(Uuid, Fate)],
        lease_end: DateTime<Utc>,
    ) -> Option<store::WriteBack> {
        let mut delay = Duration::from_millis(50);
        let on_publish = self.config.on_publish;
        loop {
            let (db, now) = (&self.db, self.now());
            let turn = self.writers.turn(db).await;
            let written = match epoch {
                Some(e) => {
                    store::partitions::write_back(db, token, e, now, fates, on_publish).await
                }
                None => store::write_back(db, token, now, fates, on_publish).await,
            };
            drop(turn);
            match written {
                Ok(w) => return Some(w),
                Err(e) => {
                    let retry_at =
                        self.now() + chrono::Duration::from_std(delay).unwrap_or_default();
                    // Owned partitions: not once another relay may have taken them over, when a
                    // handed-back row moved under its feet could let a later event overtake.
                    let owned_lapsed = epoch.is_some()
                        && !lock(&self.ownership).writable(
                            tokio::time::Instant::now() + delay,
                            self.config.publish_timeout,
                        );
                    if retry_at >= lease_end || owned_lapsed {
                        tracing::error!(relay = %self.name, error = %e,
                            "outbox write-back failed until the lease ended; the batch will be redelivered");
                        return None;
                    }
                    tracing::warn!(relay = %self.name, error = %e, "outbox write-back failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
