//! The store's entry points run in `tracing` spans that record a failing statement's error, so
//! an app's subscriber sees which call failed and why, under the span's name.

use std::sync::{Arc, Mutex};

use sea_orm::Database;
use seaorm_outbox::inbox::Inbox;
use seaorm_outbox::{Error, Outbox};
use tracing_subscriber::layer::SubscriberExt;

/// Each event as `span: field=value …`, with the name of the span it was in.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

impl<S> tracing_subscriber::Layer<S> for Capture
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={v:?} ", f.name()));
            }
        }
        let span = ctx
            .event_span(event)
            .map(|s| format!("{}::{}", s.metadata().target(), s.name()))
            .unwrap_or_default();
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        self.0
            .lock()
            .expect("events")
            .push(format!("{span}: {}", fields.0));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_failing_statement_is_recorded_in_its_store_span() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    // No migrations: every statement fails on a missing table.
    let db = Database::connect("sqlite::memory:").await.expect("sqlite");

    let err = Outbox::new(&db)
        .get(uuid::Uuid::now_v7())
        .await
        .expect_err("no table");
    assert!(matches!(err, Error::Database(_)), "{err}");
    Inbox::new(&db)
        .record("billing", "m-1")
        .await
        .expect_err("no table");

    let events = capture.0.lock().expect("events").clone();
    let find = |span: &str| {
        events
            .iter()
            .find(|e| e.starts_with(span))
            .unwrap_or_else(|| panic!("no event in span {span}: {events:#?}"))
    };
    assert!(find("seaorm_outbox::store::portable::get:").contains("no such table"));
    assert!(find("seaorm_outbox::store::inbox::record:").contains("no such table"));
}
