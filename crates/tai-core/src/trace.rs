//! W3C trace context across the queue: a signal carries its `traceparent`
//! (the ingress `enqueue` span's when tracing is on, else the client's), and
//! the engine continues the trace from it. With no OpenTelemetry layer
//! installed the spans have no context and the client's header is passed
//! through as it came, so receipts still carry its trace id.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A well-formed `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, ids not
/// all zeros), split without allocating or decoding: this runs several
/// times for every signal.
struct Parts<'a> {
    trace: &'a str,
    span: &'a str,
    flags: u8,
}

fn parts(traceparent: &str) -> Option<Parts<'_>> {
    // `vv-<32>-<16>-ff` is 55 bytes with its dashes at 2, 35 and 52; every
    // other byte a hex digit (so no fifth field can hide in it).
    let tp = traceparent.trim();
    let b = tp.as_bytes();
    let dash = |i: usize| b[i] == b'-';
    let ok = b.len() == 55
        && dash(2)
        && dash(35)
        && dash(52)
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 2 | 35 | 52) || c.is_ascii_hexdigit());
    if !ok {
        return None;
    }
    let (version, trace, span, flags) = (&tp[..2], &tp[3..35], &tp[36..52], &tp[53..]);
    let zero = |f: &str| f.bytes().all(|b| b == b'0');
    (version != "ff" && !zero(trace) && !zero(span)).then(|| Parts {
        trace,
        span,
        flags: u8::from_str_radix(flags, 16).unwrap_or_default(),
    })
}

/// The remote span a well-formed `traceparent` names.
fn span_context(traceparent: &str) -> Option<SpanContext> {
    let p = parts(traceparent)?;
    let sc = SpanContext::new(
        TraceId::from_hex(p.trace).ok()?,
        SpanId::from_hex(p.span).ok()?,
        TraceFlags::new(p.flags),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

pub fn valid(traceparent: &str) -> bool {
    parts(traceparent).is_some()
}

/// The trace id of a `traceparent` (lowercase hex).
pub fn trace_id(traceparent: &str) -> Option<String> {
    parts(traceparent).map(|p| p.trace.to_ascii_lowercase())
}

/// Whether the trace of `traceparent` is sampled (exported): spans of an
/// unsampled trace are not worth making.
pub fn sampled(traceparent: &str) -> bool {
    // The sampled flag is the low bit of the last hex digit: an even digit
    // is unsampled whatever the rest holds, so the common case (every
    // unsampled signal, asked once more by its engine) parses nothing.
    let even = |c: &u8| {
        matches!(
            c.to_ascii_lowercase(),
            b'0' | b'2' | b'4' | b'6' | b'8' | b'a' | b'c' | b'e'
        )
    };
    if traceparent.trim_end().as_bytes().last().is_some_and(even) {
        return false;
    }
    parts(traceparent).is_some_and(|p| p.flags & 1 == 1)
}

/// A new, unsampled trace context (random ids, flags `00`): the trace id of
/// a signal no span records. With its trace id, as [`trace_id`] gives it.
pub fn unsampled_root() -> (String, String) {
    let trace = fastrand::u128(1..);
    let span = fastrand::u64(1..);
    // `00-{trace:032x}-{span:016x}-00`, hex-encoded in place (one per signal).
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex::encode_to_slice(trace.to_be_bytes(), &mut out[3..35]).expect("32 hex digits");
    hex::encode_to_slice(span.to_be_bytes(), &mut out[36..52]).expect("16 hex digits");
    let id = std::str::from_utf8(&out[3..35]).expect("ascii").to_string();
    (String::from_utf8(out.to_vec()).expect("ascii"), id)
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
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-00",
            // 55 bytes, but a dash out of place.
            "000-bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-3600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-701",
        ] {
            assert!(!valid(bad), "{bad:?}");
        }
        // What is valid is what OpenTelemetry takes as a remote parent.
        for tp in [
            tp,
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-03",
        ] {
            let sc = span_context(tp).expect("a span context");
            assert_eq!(sc.trace_id().to_string(), trace_id(tp).unwrap());
            assert_eq!(sc.is_sampled(), sampled(tp));
        }
        assert_eq!(
            trace_id("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            "trace ids are lowercase hex"
        );
        // The flags' last digit alone answers an unsampled one; every flags
        // byte, in either case and with the spaces a header may carry, gives
        // what the full parse gives, and a malformed one is never sampled.
        for flags in 0..=u8::MAX {
            for tp in [
                format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags:02x}"),
                format!(" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags:02X} "),
            ] {
                assert_eq!(sampled(&tp), flags & 1 == 1, "{tp:?}");
            }
            let bad = format!("00-00000000000000000000000000000000-00f067aa0ba902b7-{flags:02x}");
            assert!(!sampled(&bad), "{bad}");
        }
        assert!(!sampled("") && !sampled("1") && !sampled("zz"));
        let (root, id) = unsampled_root();
        assert!(valid(&root) && !sampled(&root), "{root}");
        assert_eq!(trace_id(&root).as_deref(), Some(id.as_str()));
        assert_ne!(trace_id(&root), trace_id(&unsampled_root().0));
        // Without an OpenTelemetry layer a span has no context to give.
        assert_eq!(traceparent_of(&tracing::Span::none()), None);
    }
}
