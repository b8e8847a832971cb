//! W3C trace context captured into an event's headers at write time (`otel` feature), so
//! every publisher forwards it and the consumer continues the same trace.

use crate::event::Headers;

/// Adds the current OpenTelemetry span's W3C `traceparent` (and `tracestate`) to `headers`,
/// unless `traceparent` is already there.
#[cfg(feature = "otel")]
pub(crate) fn capture(headers: &mut Headers) {
    use opentelemetry::trace::TraceContextExt;

    if headers.contains_key("traceparent") {
        return;
    }
    let cx = opentelemetry::Context::current();
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return;
    }
    headers.insert(
        "traceparent".to_owned(),
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        ),
    );
    let state = sc.trace_state().header();
    if !state.is_empty() {
        headers.insert("tracestate".to_owned(), state);
    }
}

/// Without the `otel` feature there is no context to capture.
#[cfg(not(feature = "otel"))]
pub(crate) fn capture(_headers: &mut Headers) {}
