//! Redis Streams source (`redis` feature): a consumer group, `XACK` after commit.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{FromRedisValue, Value};

use super::BODY_FIELD;
use crate::error::BoxError;
use crate::error::{Error, Result};
use crate::inbox::Incoming;
use crate::inbox::{Acknowledge, Delivery, RECONNECT_DELAY, Source, SourceContext, pause};

/// Reads a stream through a consumer group: the group is created when missing (from the
/// stream's start, so events relayed before the consumer first ran are not skipped), and each
/// entry is `XACK`ed after its transaction committed.
///
/// On start it first re-reads its own pending entries (delivered to this
/// [`instance`](Self::instance) name before a crash, never acknowledged), then, every
/// [`claim_idle`](Self::claim_idle), takes over entries other instances have held unacknowledged
/// that long (`XAUTOCLAIM`). Give each instance a stable name of its own so a restart finds
/// its pending entries at once. Reads block on one connection and acknowledgements go on
/// another, so a blocked read never delays an ack.
#[derive(Clone, Debug)]
pub struct RedisSource {
    client: redis::Client,
    stream: String,
    group: String,
    instance: String,
    count: usize,
    claim_idle: Duration,
}

impl RedisSource {
    /// Group `group` on stream key `stream`, as instance `"{group}-1"`.
    pub fn new(client: redis::Client, stream: impl Into<String>, group: impl Into<String>) -> Self {
        let group = group.into();
        Self {
            client,
            stream: stream.into(),
            instance: format!("{group}-1"),
            group,
            count: 100,
            claim_idle: Duration::from_secs(60),
        }
    }

    /// This instance's consumer name in the group (default `"{group}-1"`).
    #[must_use]
    pub fn instance(mut self, name: impl Into<String>) -> Self {
        self.instance = name.into();
        self
    }

    /// Entries per read (default 100).
    #[must_use]
    pub fn count(mut self, n: usize) -> Self {
        self.count = n.max(1);
        self
    }

    /// How long another instance's entry may sit unacknowledged before this one takes it
    /// (default 60 s). Keep it above the longest handling time, retries included.
    #[must_use]
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    async fn connection(&self) -> std::result::Result<ConnectionManager, redis::RedisError> {
        // Reads block for 1 s; the response timeout must outlast them.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        ConnectionManager::new_with_config(self.client.clone(), config).await
    }

    async fn create_group(&self, conn: &mut ConnectionManager) -> Result<()> {
        let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(Error::Broker {
                broker: "redis",
                reason: format!("creating group `{}` on `{}`: {e}", self.group, self.stream),
                source: Some(Box::new(e)),
            }),
        }
    }

    /// `XREADGROUP … STREAMS key <from>`: `>` for new entries, an id to page through our own
    /// pending ones.
    async fn read(
        &self,
        conn: &mut ConnectionManager,
        from: &str,
        block: bool,
    ) -> redis::RedisResult<Vec<StreamId>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.instance)
            .arg("COUNT")
            .arg(self.count);
        if block {
            cmd.arg("BLOCK").arg(1000);
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(from);
        let reply: Option<StreamReadReply> = cmd.query_async(conn).await?;
        Ok(reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default())
    }

    async fn autoclaim(
        &self,
        conn: &mut ConnectionManager,
        start: &str,
    ) -> redis::RedisResult<StreamAutoClaimReply> {
        redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.instance)
            .arg(u64::try_from(self.claim_idle.as_millis()).unwrap_or(u64::MAX))
            .arg(start)
            .arg("COUNT")
            .arg(self.count)
            .query_async(conn)
            .await
    }

    /// The group's `lag` from `XINFO GROUPS` (Redis 7+): entries not yet delivered to it.
    async fn lag(&self, conn: &mut ConnectionManager) -> Option<u64> {
        let groups: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.stream)
            .query_async(conn)
            .await
            .ok()?;
        let ours = groups.into_iter().find(|g| {
            g.get("name")
                .cloned()
                .and_then(|v| String::from_redis_value(v).ok())
                .as_deref()
                == Some(self.group.as_str())
        })?;
        u64::from_redis_value(ours.get("lag")?.clone()).ok()
    }

    fn delivery(&self, entry: StreamId, redelivered: bool, acks: &ConnectionManager) -> Delivery {
        let mut headers = Vec::with_capacity(entry.map.len());
        let mut payload = Vec::new();
        for (field, value) in entry.map {
            let bytes = Vec::<u8>::from_redis_value(value).unwrap_or_default();
            if field == BODY_FIELD {
                payload = bytes;
            } else {
                headers.push((field, String::from_utf8_lossy(&bytes).into_owned()));
            }
        }
        headers.sort();
        Delivery {
            message: Incoming::new(self.stream.clone(), headers, payload)
                .position(Some(entry.id.clone()))
                .redelivered(redelivered),
            ack: Box::new(self.ack_for(entry.id, acks)),
        }
    }

    /// The acknowledgement of entry `id`, sent on the `acks` connection.
    fn ack_for(&self, id: String, acks: &ConnectionManager) -> RedisAck {
        RedisAck {
            conn: acks.clone(),
            stream: self.stream.clone(),
            group: self.group.clone(),
            instance: self.instance.clone(),
            ids: vec![id],
        }
    }

    /// Pushes `entries`; `false` when the consumer stopped.
    async fn push(
        &self,
        entries: Vec<StreamId>,
        redelivered: bool,
        ctx: &SourceContext,
        acks: &ConnectionManager,
    ) -> bool {
        for entry in entries {
            // A pending entry whose data was trimmed away comes back empty: ack it, nothing
            // is left to apply.
            if entry.map.is_empty() {
                tracing::warn!(stream = %self.stream, id = %entry.id, "redis source: a pending entry was trimmed from the stream before it was applied; acknowledging it");
                let _ = Box::new(self.ack_for(entry.id, acks)).ack().await;
                continue;
            }
            if ctx
                .deliveries
                .send(self.delivery(entry, redelivered, acks))
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }
}

struct RedisAck {
    conn: ConnectionManager,
    stream: String,
    group: String,
    instance: String,
    /// One entry's, or a batch's merged into one `XACK`.
    ids: Vec<String>,
}

#[async_trait]
impl Acknowledge for RedisAck {
    async fn ack(self: Box<Self>) -> std::result::Result<(), BoxError> {
        let mut conn = self.conn;
        let _: i64 = redis::cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.ids)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Resets the entries' idle time (`XCLAIM` to this instance, `JUSTID`, which leaves the
    /// delivery count alone), so another instance's `XAUTOCLAIM` does not take a message held
    /// on purpose for longer than its `claim_idle`.
    async fn in_progress(&self) {
        let mut conn = self.conn.clone();
        let _: redis::RedisResult<redis::Value> = redis::cmd("XCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.instance)
            .arg(0)
            .arg(&self.ids)
            .arg("JUSTID")
            .query_async(&mut conn)
            .await;
    }

    fn merge(
        &mut self,
        other: Box<dyn Acknowledge>,
    ) -> std::result::Result<(), Box<dyn Acknowledge>> {
        let same = (&*other as &dyn std::any::Any)
            .downcast_ref::<RedisAck>()
            .is_some_and(|o| o.stream == self.stream && o.group == self.group);
        if !same {
            return Err(other);
        }
        let other: Box<dyn std::any::Any> = other;
        match other.downcast::<RedisAck>() {
            Ok(o) => {
                self.ids.extend(o.ids);
                Ok(())
            }
            // Checked above; a type that is not a RedisAck can't get here.
            Err(_) => Ok(()),
        }
    }
}

#[async_trait]
impl Source for RedisSource {
    fn broker(&self) -> &'static str {
        "redis"
    }

    async fn run(self, ctx: SourceContext) -> Result<()> {
        let connect_err = |e: redis::RedisError| Error::Broker {
            broker: "redis",
            reason: format!("connecting: {e}"),
            source: Some(Box::new(e)),
        };
        let mut reads = self.connection().await.map_err(connect_err)?;
        let acks = self.connection().await.map_err(connect_err)?;
        self.create_group(&mut reads).await?;

        // Our own pending entries first, paged by id.
        let mut from = "0".to_owned();
        loop {
            match self.read(&mut reads, &from, false).await {
                Ok(entries) if entries.is_empty() => break,
                Ok(entries) => {
                    from = entries.last().map(|e| e.id.clone()).unwrap_or(from);
                    if !self.push(entries, true, &ctx, &acks).await {
                        return Ok(());
                    }
                }
                Err(e) => {
                    tracing::warn!(stream = %self.stream, error = %e, "redis source: reading own pending entries failed; retrying");
                    if !pause(&ctx.stop, RECONNECT_DELAY).await {
                        return Ok(());
                    }
                }
            }
        }

        let mut claim_at = tokio::time::Instant::now();
        let mut lag_at = tokio::time::Instant::now();
        let mut claim_from = "0-0".to_owned();
        loop {
            if ctx.stop.is_cancelled() {
                // Entries read and not yet applied stay in our pending list, which the next
                // start reads first: nothing acknowledged is read again.
                ctx.handed_over();
                ctx.shutdown.cancelled().await;
                return Ok(());
            }
            if tokio::time::Instant::now() >= lag_at {
                if let Some(n) = self.lag(&mut reads).await {
                    ctx.report_lag(n);
                }
                lag_at = tokio::time::Instant::now() + Duration::from_secs(5);
            }
            if tokio::time::Instant::now() >= claim_at {
                match self.autoclaim(&mut reads, &claim_from).await {
                    Ok(reply) => {
                        // "0-0" means the scan went round: rest until the next period.
                        if reply.next_stream_id == "0-0" {
                            claim_at = tokio::time::Instant::now() + self.claim_idle / 2;
                        }
                        claim_from = reply.next_stream_id;
                        if !self.push(reply.claimed, true, &ctx, &acks).await {
                            return Ok(());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(stream = %self.stream, error = %e, "redis source: XAUTOCLAIM failed");
                        claim_at = tokio::time::Instant::now() + RECONNECT_DELAY;
                    }
                }
            }
            let read = tokio::select! {
                _ = ctx.stop.cancelled() => continue,
                read = self.read(&mut reads, ">", true) => read,
            };
            match read {
                Ok(entries) => {
                    if !self.push(entries, false, &ctx, &acks).await {
                        return Ok(());
                    }
                }
                Err(e) => {
                    tracing::warn!(stream = %self.stream, error = %e, "redis source: read failed; retrying");
                    if !pause(&ctx.stop, RECONNECT_DELAY).await {
                        return Ok(());
                    }
                    // The stream (and its group) was deleted under us: start it again.
                    if e.code() == Some("NOGROUP") {
                        self.create_group(&mut reads).await?;
                    }
                }
            }
        }
    }
}
