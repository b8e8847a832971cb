//! The group's loop: tenants' batches on a bounded set of workers, in turns, with failing
//! tenants checked outside them and every start held while the shared breaker is open.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::schedule::{After, Schedule, Timer};
use super::{Change, RelayGroup, Shared, Tenant, forget};
use crate::publisher::Publisher;
use crate::relay::{BreakerState, RelayStats, lock, wake};

impl<P: Publisher + 'static> RelayGroup<P> {
    /// Relays every tenant's events until `cancel` is cancelled, then lets the batches in
    /// flight finish (within the relay's `shutdown_grace`) and be written back, removes the
    /// tenants' heartbeat rows, and returns what all of them did. Tenants may be added and
    /// removed while it runs. Database errors never end it: a failing tenant is checked again
    /// with backoff until it answers.
    pub async fn run(&self, cancel: CancellationToken) -> RelayStats {
        let sh = &self.shared;
        let mut schedule = Schedule::default();
        // Schema tenants wait for the scan: a first batch each would open a connection per
        // schema at start (a thousand schemas, a thousand cold connections).
        for (id, t) in lock(&sh.tenants).iter() {
            if !t.scanned() {
                schedule.wake(id);
            }
        }
        let listeners = CancellationToken::new();
        let routers: Vec<_> = sh
            .listen
            .iter()
            .filter_map(|db| wake::spawn_router(db, router(Arc::downgrade(sh)), listeners.clone()))
            .collect();
        let scan = spawn_scan(sh, listeners.clone());
        let mut batches: JoinSet<(String, After)> = JoinSet::new();
        // When each batch in flight started, by tenant.
        let mut started: HashMap<String, Instant> = HashMap::new();
        let mut probes: JoinSet<(String, bool)> = JoinSet::new();
        let mut totals = RelayStats::default();
        loop {
            for change in std::mem::take(&mut *lock(&sh.changes)) {
                match change {
                    Change::Wake(id) if sh.tenant(&id).is_some() => schedule.wake(&id),
                    Change::Wake(_) => {}
                    Change::Removed(id) => schedule.remove(&id),
                }
            }
            for (id, _) in schedule.due(Instant::now()) {
                if let Some(t) = sh.tenant(&id) {
                    probes.spawn(probe(t, sh.config.probe_timeout));
                }
            }
            let gate = self.gate();
            if gate.is_none() && !cancel.is_cancelled() {
                self.start(&mut schedule, &mut batches, &mut started, &cancel);
            }
            if cancel.is_cancelled() && batches.is_empty() {
                break;
            }
            // A batch about to stall frees its worker then.
            let stall = started
                .values()
                .map(|s| *s + sh.config.stall_after)
                .filter(|at| *at > Instant::now())
                .min();
            let wake_at = [schedule.next_timer(), gate, stall]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                () = cancel.cancelled(), if !cancel.is_cancelled() => {}
                Some(done) = batches.join_next(), if !batches.is_empty() => {
                    if let Ok((id, next)) = done {
                        started.remove(&id);
                        schedule.done(&id, next);
                    }
                }
                Some(done) = probes.join_next(), if !probes.is_empty() => {
                    if let Ok((id, answered)) = done {
                        self.probed(&mut schedule, &id, answered).await;
                    }
                }
                () = sh.changed.notified() => {}
                () = sleep_until(wake_at) => {}
            }
        }
        probes.shutdown().await;
        listeners.cancel();
        for r in routers.into_iter().chain(scan) {
            let _ = r.await;
        }
        let tenants: Vec<_> = lock(&sh.tenants).values().cloned().collect();
        for t in tenants {
            let run = t.running.lock().await;
            forget(&t, &run).await;
            totals += *lock(&t.stats);
        }
        totals
    }

    /// While the shared breaker is open: when the next probe may go (nothing starts before).
    /// Half-open, one batch at a time probes the broker.
    fn gate(&self) -> Option<Instant> {
        let b = lock(&self.shared.breaker);
        b.reopen_at().filter(|at| *at > Instant::now())
    }

    /// Starts batches of ready tenants while workers are free. A batch in flight longer than
    /// `stall_after` (a tenant whose database hangs) frees its worker, up to `workers` such
    /// batches besides the others.
    fn start(
        &self,
        schedule: &mut Schedule,
        batches: &mut JoinSet<(String, After)>,
        started: &mut HashMap<String, Instant>,
        cancel: &CancellationToken,
    ) {
        let sh = &self.shared;
        let workers = sh.config.workers;
        loop {
            let stalled = started
                .values()
                .filter(|s| s.elapsed() >= sh.config.stall_after)
                .count();
            if batches.len() - stalled.min(workers) >= workers {
                return;
            }
            let probing = lock(&sh.breaker).status().state != BreakerState::Closed;
            if probing && !batches.is_empty() {
                return;
            }
            let Some(id) = schedule.next_ready() else {
                return;
            };
            let Some(t) = sh.tenant(&id) else {
                schedule.remove(&id);
                continue;
            };
            started.insert(id, Instant::now());
            batches.spawn(batch(t, sh.clone(), cancel.clone()));
        }
    }

    /// A failing tenant's check came back: answered, it gets a batch (which clears its
    /// failure if it succeeds); not, it is checked again after a longer wait.
    async fn probed(&self, schedule: &mut Schedule, id: &str, answered: bool) {
        let Some(t) = self.shared.tenant(id) else {
            return;
        };
        if answered {
            schedule.wake(id);
            return;
        }
        let mut run = t.running.lock().await;
        run.backoff = (run.backoff * 2).clamp(
            self.shared.config.failure_backoff,
            self.shared.config.failure_backoff_max,
        );
        schedule.set_timer(id, Instant::now() + run.backoff, Timer::Probe);
    }
}

/// One batch of one tenant: claim, publish, write back; then what comes next for it.
async fn batch<P: Publisher + 'static>(
    t: Arc<Tenant<P>>,
    sh: Arc<Shared<P>>,
    group_stop: CancellationToken,
) -> (String, After) {
    let mut run = t.running.lock().await;
    if t.stop.is_cancelled() {
        return (t.id.clone(), After::Park);
    }
    let relay = &t.relay;
    if let Some(parked) = &t.parked {
        parked.store(false, std::sync::atomic::Ordering::Relaxed);
    }
    // Stopping the group or removing the tenant stops the batch the same way.
    let stop = CancellationToken::new();
    let cycle = relay.cycle(&stop);
    tokio::pin!(cycle);
    let result = loop {
        tokio::select! {
            r = &mut cycle => break r,
            () = group_stop.cancelled(), if !stop.is_cancelled() => stop.cancel(),
            () = t.stop.cancelled(), if !stop.is_cancelled() => stop.cancel(),
        }
    };
    let now = Instant::now();
    let next = match result {
        Ok(c) => {
            *lock(&t.stats) += c.stats;
            if let Some((since, _)) = lock(&t.failing).take() {
                tracing::info!(tenant = %t.id, failing_since = %since, "relay group: tenant database answers again");
            }
            run.backoff = Duration::ZERO;
            if let Some(every) = relay.config.heartbeat_interval {
                relay.heartbeat(&mut run.beat, Some(every)).await;
            }
            if relay.config.retention.is_some() && now >= run.next_purge {
                lock(&t.stats).purged += relay.purge().await;
                run.next_purge = now + relay.config.purge_interval;
            }
            let open = lock(&sh.breaker).reopen_at().is_some_and(|at| at > now);
            if open {
                // The broker is down: its turn comes when the breaker lets batches go.
                After::Again
            } else if c.claimed >= c.limit as usize || c.partial {
                run.idle = 0;
                After::Again
            } else if t.scanned() && c.next_retry.is_none() {
                // The group's scan of the schemas finds when it has work again.
                run.idle = 0;
                park(&sh, &t);
                After::Park
            } else {
                let idle = if c.claimed == 0 {
                    run.idle = run.idle.saturating_add(1);
                    let doubled = relay
                        .config
                        .idle_poll_interval
                        .saturating_mul(1 << run.idle.min(16).saturating_sub(1));
                    doubled.min(sh.config.idle_poll_max.max(relay.config.idle_poll_interval))
                } else {
                    run.idle = 0;
                    relay.config.idle_poll_interval
                };
                let until_retry = c
                    .next_retry
                    .and_then(|at| (at - relay.now()).to_std().ok())
                    .unwrap_or(idle);
                After::At(now + idle.min(until_retry), Timer::Poll)
            }
        }
        Err(e) => {
            let mut failing = lock(&t.failing);
            if failing.is_none() {
                tracing::warn!(tenant = %t.id, error = %e, "relay group: tenant database failed; taken out of turn and checked with backoff");
                *failing = Some((crate::event::now(), e.to_string()));
            }
            // Doubles when a probe answered but the batch failed again (say, a schema whose
            // migrations were not run), so a tenant that pings but cannot work waits longer.
            run.backoff =
                (run.backoff * 2).clamp(sh.config.failure_backoff, sh.config.failure_backoff_max);
            After::At(now + run.backoff, Timer::Probe)
        }
    };
    (t.id.clone(), next)
}

/// A schema tenant with nothing to do: it joins the most recently parked, which keep their
/// connections (until the pool's idle timeout) so a tenant that writes again soon pays no new
/// connection; the one that falls off that list lets its connections go.
fn park<P>(sh: &Shared<P>, t: &Tenant<P>) {
    let cooled = {
        let mut warm = lock(&sh.warm);
        warm.retain(|id| *id != t.id);
        warm.push_front(t.id.clone());
        if warm.len() > sh.config.warm_schemas {
            warm.pop_back()
        } else {
            None
        }
    };
    let Some(id) = cooled else {
        return;
    };
    let Some(cold) = (if id == t.id { None } else { sh.tenant(&id) }) else {
        return cool(t);
    };
    // One at work keeps its connections: it parks again when done.
    if cold.running.try_lock().is_ok() {
        cool(&cold);
    }
}

/// Closes a parked schema tenant's connections, and those still coming back.
fn cool<P>(t: &Tenant<P>) {
    if let Some(parked) = &t.parked {
        parked.store(true, std::sync::atomic::Ordering::Relaxed);
        #[cfg(feature = "postgres")]
        crate::store::schemas::release_idle(&t.relay.db);
    }
}

/// Checks a failing tenant's database, outside the workers.
async fn probe<P: Publisher>(t: Arc<Tenant<P>>, within: Duration) -> (String, bool) {
    let error = match tokio::time::timeout(within, t.relay.db.ping()).await {
        Ok(Ok(())) => return (t.id.clone(), true),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer to a ping within {within:?}"),
    };
    if let Some((_, last)) = lock(&t.failing).as_mut() {
        *last = error;
    }
    (t.id.clone(), false)
}

/// Routes a group listener's NOTIFYs to the tenants of the schema named; after a reconnect,
/// to every polled tenant.
fn router<P: Publisher + 'static>(shared: std::sync::Weak<Shared<P>>) -> wake::Route {
    Arc::new(move |heard: Option<&str>, _own: &str| {
        let Some(sh) = shared.upgrade() else {
            return;
        };
        // After a (re)connect, whatever was missed: the polled tenants look now; the schema
        // scan covers its own tenants within `scan_interval` (waking a thousand schemas would
        // open a thousand connections).
        let woken: Vec<String> = lock(&sh.tenants)
            .values()
            .filter(|t| match heard {
                Some(s) => t.schema.as_deref() == Some(s),
                None => !t.scanned(),
            })
            .map(|t| t.id.clone())
            .collect();
        for id in woken {
            sh.tell(super::Change::Wake(id));
        }
    })
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Schema tenants: every `scan_interval`, one scan of their schemas wakes those with events
/// due. Failing tenants are left to their probes.
#[cfg(feature = "postgres")]
fn spawn_scan<P: Publisher + 'static>(
    sh: &Arc<Shared<P>>,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let pool = sh.schemas.as_ref().and_then(crate::store::pg_pool)?.clone();
    let shared = Arc::downgrade(sh);
    let every = sh.config.scan_interval;
    Some(tokio::spawn(async move {
        let mut failed = false;
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
            let Some(sh) = shared.upgrade() else {
                return;
            };
            let scanned: Vec<Arc<Tenant<P>>> = lock(&sh.tenants)
                .values()
                .filter(|t| t.scanned() && t.schema.is_some() && lock(&t.failing).is_none())
                .cloned()
                .collect();
            if scanned.is_empty() {
                continue;
            }
            let ids: Vec<String> = scanned.iter().map(|t| t.id.clone()).collect();
            let schemas: Vec<String> = scanned.iter().filter_map(|t| t.schema.clone()).collect();
            let at = sh.relay.clock.now();
            match crate::store::schemas::due(&pool, &schemas, at).await {
                Ok(due) => {
                    if std::mem::take(&mut failed) {
                        tracing::info!("relay group: the schema scan works again");
                    }
                    // The scan is a parked tenant's poll: its health counts it as one.
                    for t in &scanned {
                        t.relay
                            .last_poll
                            .store(at.timestamp_millis(), std::sync::atomic::Ordering::Relaxed);
                    }
                    for i in due {
                        sh.tell(Change::Wake(ids[i].clone()));
                    }
                }
                Err(e) => {
                    if !std::mem::replace(&mut failed, true) {
                        tracing::warn!(error = %e, "relay group: the schema scan failed; every schema tenant gets a batch instead");
                    }
                    // A batch each finds the failing ones and takes them out of the scan.
                    for id in ids {
                        sh.tell(Change::Wake(id));
                    }
                }
            }
        }
    }))
}

#[cfg(not(feature = "postgres"))]
fn spawn_scan<P: Publisher + 'static>(
    _sh: &Arc<Shared<P>>,
    _stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    None
}
