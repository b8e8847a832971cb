//! Relay outbox events to a Redis Stream.
//!
//! ```text
//! cargo run --example relay_redis --features redis      # REDIS_URL, default redis://127.0.0.1:6379
//! ```

mod support;

use seaorm_outbox::broker::redis::RedisPublisher;
use seaorm_outbox::wire::Router;

const STREAM: &str = "outbox_example:orders";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let db = support::outbox_with_events(10).await?;
    let publisher = RedisPublisher::connect(&url)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .router(Router::fixed(STREAM))
        .max_len(Some(10_000));
    support::drain(&db, publisher).await?;

    let mut conn = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let len: usize = redis::cmd("XLEN")
        .arg(STREAM)
        .query_async(&mut conn)
        .await?;
    let last: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg(STREAM)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await?;
    println!("stream {STREAM}: {len} entries");
    if let Some((id, fields)) = last.first() {
        println!("last entry {id}: {fields:?}");
    }
    let _: () = redis::cmd("DEL").arg(STREAM).query_async(&mut conn).await?;
    Ok(())
}
