//! W3C trace context across the queue: a signal carries its `traceparent`
//! (the ingress `enqueue` span's when tracing is on, else the client's), and
//! the engine continues the trace from it. With no OpenTelemetry layer
//! installed the spans have no context and the client's header is passed
//! through as it came, so receipts still carry its trace id.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The remote span a well-formed `traceparent` (`00-<32 hex>-<16 hex>-<2
/// hex>`, ids not all zeros) names.
fn span_context(traceparent: &str) -> Option<SpanContext> {
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    let [version, trace, span, flags] = parts.as_slice() else {
        return None;
    };
    if version.len() != 2 || *version == "ff" || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

pub fn valid(traceparent: &str) -> bool {
    span_context(traceparent).is_some()
}

/// The trace id of a `traceparent` (lowercase hex).
pub fn trace_id(traceparent: &str) -> Option<String> {
    span_context(traceparent).map(|sc| sc.trace_id().to_string())
}

/// Whether the trace of `traceparent` is sampled (exported): spans of an
/// unsampled trace are not worth making.
pub fn sampled(traceparent: &str) -> bool {
    span_context(traceparent).is_some_and(|sc| sc.is_sampled())
}

/// A new, unsampled trace context (random ids, flags `00`): the trace id of
/// a signal no span records.
pub fn unsampled_root() -> String {
    let trace = fastrand::u128(1..);
    let span = fastrand::u64(1..);
    // `00-{trace:032x}-{span:016x}-00`, hex-encoded in place (one per signal).
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex::encode_to_slice(trace.to_be_bytes(), &mut out[3..35]).expect("32 hex digits");
    hex::encode_to_slice(span.to_be_bytes(), &mut out[36..52]).expect("16 hex digits");
    String::from_utf8(out.to_vec()).expect("ascii")
}

/// Makes `span` a child of the remote span in `traceparent`.
pub fn continue_from(span: &tracing::Span, traceparent: &str) {
    if let Some(sc) = span_context(traceparent) {
        let _ = span.set_parent(Context::new().with_remote_span_context(sc));
    }
}

/// The `traceparent` naming `span`, if tracing is on.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_parsed_strictly() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(valid(tp));
        assert!(sampled(tp));
        assert!(!sampled(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        ));
        assert_eq!(
            trace_id(tp).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",
        ] {
            assert!(!valid(bad), "{bad:?}");
        }
        let root = unsampled_root();
        assert!(valid(&root) && !sampled(&root), "{root}");
        assert_ne!(trace_id(&root), trace_id(&unsampled_root()));
        // Without an OpenTelemetry layer a span has no context to give.
        assert_eq!(traceparent_of(&tracing::Span::none()), None);
    }
}
