//! Relay outbox events to NATS JetStream.
//!
//! ```text
//! cargo run --example relay_nats --features nats        # NATS_URL, default nats://127.0.0.1:4222
//! ```

mod support;

use async_nats::jetstream;
use seaorm_outbox::broker::nats::NatsPublisher;
use seaorm_outbox::wire::Router;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = async_nats::connect(&url).await?;
    let js = jetstream::new(client.clone());
    // Publishing needs a stream over the subjects; the server drops a duplicate Nats-Msg-Id
    // (the event id) within the stream's duplicate window.
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: "OUTBOX_EXAMPLE".into(),
            subjects: vec!["outbox_example.>".into()],
            ..Default::default()
        })
        .await?;
    let before = stream.get_info().await?.state.messages;

    let db = support::outbox_with_events(10).await?;
    let publisher = NatsPublisher::new(client).router(Router::prefixed("outbox_example."));
    support::drain(&db, publisher).await?;

    let info = stream.get_info().await?;
    println!(
        "stream OUTBOX_EXAMPLE on {url}: {} messages ({} new)",
        info.state.messages,
        info.state.messages - before
    );
    let last = stream.get_raw_message(info.state.last_sequence).await?;
    println!(
        "last message: subject={} Nats-Msg-Id={} payload={}",
        last.subject,
        last.headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str())
            .unwrap_or("-"),
        String::from_utf8_lossy(&last.payload)
    );
    js.delete_stream("OUTBOX_EXAMPLE").await?;
    Ok(())
}
