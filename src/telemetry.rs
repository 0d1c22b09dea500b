//! Logging and tracing set-up for the process: log lines (text or JSON) on stderr, and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set, every span (requests, chain
//! steps) exported over OTLP/HTTP (`OTEL_EXPORTER_OTLP_PROTOCOL=http/json` for JSON, protobuf
//! otherwise; `…_TRACES_PROTOCOL` first).

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::IsTerminal;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes log lines and exported spans when dropped (at the end of `main`).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    _log_writer: crate::log_writer::Guard,
}

impl Telemetry {
    /// Whether spans go out over OTLP.
    pub fn exports_traces(&self) -> bool {
        self.provider.is_some()
    }
}

/// How long the exit waits for the last spans to reach the collector (after the requests, the
/// log lines and the token settlements, so only spans are lost if it is slow).
const SPAN_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown_with_timeout(SPAN_FLUSH)
        {
            // The log writer is still open (it closes after this): the line is in the log's
            // format.
            tracing::warn!(%error, "could not flush OTLP spans");
        }
    }
}

pub fn init(json: bool) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr, coloured only on a terminal, written in batches by a background thread,
    // so a slow stderr never stalls requests: past 4 MB of pending lines, lines are dropped (a
    // stderr nobody reads would otherwise stop every event loop) and the loss is logged.
    let (writer, log_writer) = crate::log_writer::batched(std::io::stderr(), |dropped| {
        tracing::warn!(
            dropped,
            "log lines dropped: stderr took nothing while 4 MB of lines were pending"
        );
    })?;
    let logs = tracing_subscriber::fmt::layer()
        .fmt_fields(PlainFields)
        .with_timer(Timestamp)
        .with_target(false)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = if json {
        // `json()` brings its own field formatter.
        logs.json().flatten_event(true).boxed()
    } else {
        logs.boxed()
    };
    let otlp = OtlpTarget::from_env();
    let provider = otlp.as_ref().map(otlp_provider).transpose()?;
    let spans = provider.as_ref().map(|provider| {
        // Spans carry what the gateway sets, not tracing's bookkeeping (source file and
        // line, thread, target, busy and idle nanoseconds).
        tracing_opentelemetry::layer()
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_tracer(provider.tracer("switchyard"))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(spans)
        .try_init()?;
    log_panics();
    if let Some(otlp) = &otlp {
        // Where spans go; an export that fails is logged by the exporter (its `internal-logs`).
        if let Some((variable, asked)) = &otlp.unknown_protocol {
            tracing::warn!(
                variable,
                asked,
                protocol = otlp.protocol_name,
                "the OTLP protocol asked for is neither http/protobuf nor http/json (gRPC is not \
                 built in): spans go out as http/protobuf"
            );
        }
        tracing::info!(
            endpoint = otlp.endpoint,
            protocol = otlp.protocol_name,
            "exporting traces over OTLP"
        );
    }
    Ok(Telemetry {
        provider,
        _log_writer: log_writer,
    })
}

/// Makes a panic a log line (in the log's format, JSON included; with a `backtrace` field when
/// `RUST_BACKTRACE` asks for one) instead of the default hook's text. A panic while logging one
/// goes to the default hook.
fn log_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        thread_local! {
            static LOGGING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        }
        // A panic while logging one, or on the thread that writes the log lines, goes to the
        // default hook: a log line would not get out.
        if LOGGING.replace(true) || std::thread::current().name() == Some(crate::log_writer::THREAD)
        {
            default(info);
            return;
        }
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        let thread = std::thread::current();
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
            .then(|| backtrace.to_string());
        tracing::error!(
            panic = panic_message(info.payload()),
            location,
            thread = thread.name().unwrap_or("unnamed"),
            backtrace,
            "panicked"
        );
        LOGGING.set(false);
    }));
}

/// What a panic said: its message, if it was a string.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

/// Writes a line's time as tracing-subscriber's default timer does (RFC 3339, UTC, in
/// microseconds: `2026-11-28T04:43:24.123456Z`), formatting the date and time of day once per
/// second per thread instead of for every line (~2 % of a proxied request's instructions).
struct Timestamp;

impl FormatTime for Timestamp {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        write_time(since_epoch, w)
    }
}

/// [`Timestamp`]'s text for a time since the epoch.
fn write_time(since_epoch: Duration, w: &mut impl fmt::Write) -> fmt::Result {
    thread_local! {
        /// A second since the epoch and its text up to the fraction: `2026-11-28T04:43:24.`.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let second = since_epoch.as_secs();
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != second {
            *cached = second;
            *text = second_text(second);
        }
        w.write_str(text)
    })?;
    let fraction = fraction_text(since_epoch.subsec_micros());
    w.write_str(std::str::from_utf8(&fraction).unwrap_or("000000Z"))
}

/// `012345Z` for 12 345 µs (the last six digits of `micros`).
fn fraction_text(micros: u32) -> [u8; 7] {
    let mut text = *b"000000Z";
    let mut rest = micros;
    for digit in text[..6].iter_mut().rev() {
        *digit = b'0' + u8::try_from(rest % 10).unwrap_or(0);
        rest /= 10;
    }
    text
}

/// `2026-11-28T04:43:24.` for a second since the epoch.
fn second_text(second: u64) -> String {
    i64::try_from(second)
        .ok()
        .and_then(|second| chrono::DateTime::from_timestamp(second, 0))
        .map(|time| time.format("%Y-%m-%dT%H:%M:%S.").to_string())
        .unwrap_or_default()
}

/// Formats the fields of log lines and spans in text mode exactly like tracing-subscriber's
/// default (`name=value` separated by spaces, the message first and unquoted, values as `Debug`),
/// without its styling: the default wraps every name and `=` in `nu_ansi_term` styles even with
/// colours off, which cost ~8 % of all instructions per proxied request (callgrind).
struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = PlainVisitor {
            writer,
            result: Ok(()),
            empty: true,
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'writer> {
    writer: Writer<'writer>,
    result: fmt::Result,
    empty: bool,
}

impl PlainVisitor<'_> {
    /// Starts the field: a space unless it is the first. False for fields not written.
    fn start(&mut self, name: &str) -> bool {
        // `log.*`: metadata of records from the `log` crate, already in the line's header;
        // `otel.*`: instructions to the OpenTelemetry layer (a span's kind, its status).
        if self.result.is_err() || name.starts_with("log.") || name.starts_with("otel.") {
            return false;
        }
        if !std::mem::take(&mut self.empty) {
            self.result = self.writer.write_char(' ');
        }
        self.result.is_ok()
    }

    /// `name=` followed by `value` written as is (`value` needs no escaping).
    fn write_raw(&mut self, name: &str, value: &str) {
        let writer = &mut self.writer;
        self.result = writer
            .write_str(name.strip_prefix("r#").unwrap_or(name))
            .and_then(|()| writer.write_char('='))
            .and_then(|()| writer.write_str(value));
    }
}

/// Where zmij writes floats as `Debug` does: plain decimals, the shortest that read back as the
/// same value (outside, their exponent notations differ: `1e16` and `1e+16`). The one difference
/// is a double that lies exactly between two shortest decimals (few fraction bits, large
/// magnitude: 1658206780088562.25): the two break the tie differently, `…562.2` and `…562.3`,
/// both exact on reading back. The log's milliseconds never come near one.
/// Test: `zmij_writes_what_debug_writes_in_the_plain_range`.
const PLAIN_F64: std::ops::Range<f64> = 1e-4..1e16;

/// The common field types are written directly (as `Debug` would write them) instead of
/// through `core::fmt`: the request log line is written for every request.
impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        let name = field.name();
        // Without short-circuiting, so that the compiler can check many bytes at a time.
        let plain = || {
            value.bytes().fold(true, |plain, b| {
                plain & (b' '..=b'~').contains(&b) & (b != b'"') & (b != b'\\')
            })
        };
        if name == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else if plain() {
            if self.start(name) {
                self.write_raw(name, "\"");
                self.result = self
                    .result
                    .and_then(|()| self.writer.write_str(value))
                    .and_then(|()| self.writer.write_char('"'));
            }
        } else if self.start(name) {
            // Quoted and escaped, as `Debug` writes a string.
            let writer = &mut self.writer;
            self.result = writer
                .write_str(name.strip_prefix("r#").unwrap_or(name))
                .and_then(|()| write!(writer, "={value:?}"));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field.name()) {
            self.write_raw(field.name(), itoa::Buffer::new().format(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field.name()) {
            self.write_raw(field.name(), itoa::Buffer::new().format(value));
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value == 0.0 || PLAIN_F64.contains(&value.abs()) {
            if self.start(field.name()) {
                self.write_raw(field.name(), zmij::Buffer::new().format_finite(value));
            }
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field.name()) {
            self.write_raw(field.name(), if value { "true" } else { "false" });
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        if !self.start(name) {
            return;
        }
        self.result = match name {
            // Messages may quote outside input: no terminal control characters get through.
            "message" => write!(EscapeControl(&mut self.writer), "{value:?}"),
            // `%value` and `?value` fields: a single token as is (`kind=route`, `1.5ms`);
            // anything else quoted and escaped like a string, so that a value from outside (an
            // upstream's error, a client's request id) can neither break the line nor pass for
            // more fields.
            name => {
                let text = format!("{value:?}");
                let token = !text.is_empty()
                    && text
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b'='));
                let writer = &mut self.writer;
                writer
                    .write_str(name.strip_prefix("r#").unwrap_or(name))
                    .and_then(|()| writer.write_char('='))
                    .and_then(|()| {
                        if token {
                            writer.write_str(&text)
                        } else {
                            write!(writer, "{text:?}")
                        }
                    })
            }
        };
    }
}

/// Writes control characters that could drive a terminal (ESC, BEL, BS, FF, DEL, C1) escaped, as
/// tracing-subscriber does for messages, and line breaks as `\n` and `\r`: one event, one line.
struct EscapeControl<'a, 'writer>(&'a mut Writer<'writer>);

impl fmt::Write for EscapeControl<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let is_control = |c: char| {
            matches!(
                c,
                '\n' | '\r' | '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
            )
        };
        let mut rest = s;
        while let Some(at) = rest.find(is_control) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c as u32 {
                0x0a => self.0.write_str("\\n")?,
                0x0d => self.0.write_str("\\r")?,
                code @ ..0x80 => write!(self.0, "\\x{code:02x}")?,
                code => write!(self.0, "\\u{{{code:x}}}")?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// Where spans go, from the environment as OpenTelemetry's SDKs read it: the traces-only
/// variables first (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, used as is), then the general ones
/// (`OTEL_EXPORTER_OTLP_ENDPOINT`, with `/v1/traces` appended). No endpoint, no export.
struct OtlpTarget {
    endpoint: String,
    protocol: Protocol,
    protocol_name: &'static str,
    /// A protocol asked for that is not built in: the variable and its value.
    unknown_protocol: Option<(&'static str, String)>,
}

impl OtlpTarget {
    fn from_env() -> Option<Self> {
        Self::from_vars(|name| std::env::var(name).ok().filter(|value| !value.is_empty()))
    }

    /// From the variables `var` gives (the environment, or a test's).
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| {
            var("OTEL_EXPORTER_OTLP_ENDPOINT")
                .map(|base| format!("{}/v1/traces", base.trim_end_matches('/')))
        })?;
        let asked = [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ]
        .into_iter()
        .find_map(|variable| Some((variable, var(variable)?)));
        let (protocol, protocol_name, unknown_protocol) = match asked {
            Some((_, asked)) if asked == "http/json" => (Protocol::HttpJson, "http/json", None),
            Some((_, asked)) if asked == "http/protobuf" => {
                (Protocol::HttpBinary, "http/protobuf", None)
            }
            other => (Protocol::HttpBinary, "http/protobuf", other),
        };
        Some(Self {
            endpoint,
            protocol,
            protocol_name,
            unknown_protocol,
        })
    }
}

fn otlp_provider(target: &OtlpTarget) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(&target.endpoint)
        .with_protocol(target.protocol)
        .build()?;
    // `OTEL_SERVICE_NAME`, else `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, names the
    // service (the builder reads both, but lets the second win), else `switchyard`.
    let mut resource = opentelemetry_sdk::Resource::builder();
    let among_attributes = std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|attributes| {
        attributes
            .split(',')
            .any(|pair| pair.split('=').next().map(str::trim) == Some("service.name"))
    });
    match std::env::var("OTEL_SERVICE_NAME") {
        Ok(name) if !name.trim().is_empty() => resource = resource.with_service_name(name),
        _ if among_attributes => {}
        _ => resource = resource.with_service_name("switchyard"),
    }
    let resource = resource.build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[test]
    fn a_panic_s_message_is_its_string_payload() {
        let message = std::panic::catch_unwind(|| panic!("boom {}", 7)).unwrap_err();
        assert_eq!(panic_message(&*message), "boom 7");
        let message = std::panic::catch_unwind(|| panic!("static")).unwrap_err();
        assert_eq!(panic_message(&*message), "static");
        let message = std::panic::catch_unwind(|| std::panic::panic_any(7_u8)).unwrap_err();
        assert_eq!(panic_message(&*message), "(not a string)");
    }

    #[test]
    fn the_traces_only_otlp_variables_come_first() {
        let target = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            OtlpTarget::from_vars(|name| {
                vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
            })
            .map(|t| (t.endpoint, t.protocol_name, t.unknown_protocol))
        };
        assert!(target(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).is_none());
        assert_eq!(
            target(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]),
            Some((
                "http://collector:4318/v1/traces".to_owned(),
                "http/protobuf",
                None
            ))
        );
        assert_eq!(
            target(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://traces:9000/in"
                ),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
            ]),
            Some(("http://traces:9000/in".to_owned(), "http/json", None))
        );
        assert_eq!(
            target(&[
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://traces:9000/in"
                ),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ]),
            Some((
                "http://traces:9000/in".to_owned(),
                "http/protobuf",
                Some(("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc".to_owned()))
            ))
        );
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    /// Events and spans shaped like the gateway's, logged through `layer`.
    fn log_samples<L>(layer: L)
    where
        L: tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync,
    {
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "request",
                request_id = "1b2c",
                "url.path" = "/v1/chat/completions",
                endpoint = tracing::field::Empty,
            );
            span.record("endpoint", "echo");
            let _entered = span.enter();
            tracing::info!(
                method = "POST",
                display = %"shown_by_Display",
                endpoint = "support \"bot\"",
                status = 200u16,
                stream = false,
                latency_ms = 0.07,
                upstream_ms = 1.0,
                tiny = 0.00001,
                small = -0.0001,
                zero = 0.0,
                negative_zero = -0.0,
                below_plain = 9.99e-5,
                infinite = f64::INFINITY,
                large = 9_999_999_999_999_998.0,
                huge = 1e16,
                nan = f64::NAN,
                retries = 0u32,
                offset = -3i64,
                quoted = "tab\there",
                unicode = "café",
                prompt_tokens = Some(8u64),
                completion_tokens = None::<u64>,
                r#type = "x",
                "request"
            );
            tracing::warn!(attempt = 2, "upstream said \x1b[31mno\u{9b} {}", "twice");
            tracing::error!("a message alone");
            tracing::info!(empty = "", "");
        });
    }

    #[test]
    fn timestamps_are_rfc3339_in_microseconds_like_the_default_timer() {
        assert_eq!(second_text(0), "1970-01-01T00:00:00.");
        assert_eq!(second_text(951_782_400), "2000-02-29T00:00:00.");
        assert_eq!(second_text(1_795_840_204), "2026-11-28T04:30:04.");
        assert_eq!(&fraction_text(0), b"000000Z");
        assert_eq!(&fraction_text(12_345), b"012345Z");
        assert_eq!(&fraction_text(999_999), b"999999Z");
        // A whole timestamp has the default timer's shape.
        let mut ours = String::new();
        Timestamp.format_time(&mut Writer::new(&mut ours)).unwrap();
        let mut theirs = String::new();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut Writer::new(&mut theirs))
            .unwrap();
        let shape = |text: &str| text.replace(|c: char| c.is_ascii_digit(), "0");
        assert_eq!(shape(&ours), shape(&theirs));
        assert_eq!(shape(&ours), "0000-00-00T00:00:00.000000Z");
    }

    /// The cached second's text changes exactly at the second, and every time reads as chrono's
    /// RFC 3339 in microseconds (what tracing-subscriber's default timer writes).
    #[test]
    fn timestamps_follow_the_clock_across_seconds() {
        let text = |micros: u64| {
            let mut out = String::new();
            write_time(Duration::from_micros(micros), &mut out).unwrap();
            out
        };
        let midnight = 1_795_910_400_000_000; // 2026-11-29T00:00:00Z
        assert_eq!(text(midnight - 1), "2026-11-28T23:59:59.999999Z");
        assert_eq!(text(midnight), "2026-11-29T00:00:00.000000Z");
        assert_eq!(text(midnight - 2), "2026-11-28T23:59:59.999998Z");
        for micros in (0..2_000_000_000_000_000u64).step_by(7_777_777_777_777) {
            let expected = chrono::DateTime::from_timestamp_micros(i64::try_from(micros).unwrap())
                .unwrap()
                .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string();
            assert_eq!(text(micros), expected);
        }
    }

    /// `record_f64`'s premise: in [`PLAIN_F64`], zmij writes what `Debug` writes, but for the
    /// last digit of an exact tie between two shortest decimals.
    #[test]
    fn zmij_writes_what_debug_writes_in_the_plain_range() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            // xorshift64: deterministic, many bit patterns.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut compared, mut ties) = (0, [0; 3]);
        while compared < 200_000 {
            let bits = next();
            // Random bit patterns, short decimals like the log's milliseconds, and values with
            // few fraction bits (where ties between two shortest decimals occur).
            let dyadic = (bits % (1 << 52)) as f64 / f64::from(1u32 << (bits >> 60));
            let values = [
                f64::from_bits(bits),
                (bits % 10_000_000) as f64 / 1000.0,
                dyadic,
            ];
            for (kind, value) in values.into_iter().enumerate() {
                if value == 0.0 || PLAIN_F64.contains(&value.abs()) {
                    let ours = zmij::Buffer::new().format_finite(value).to_owned();
                    let debug = format!("{value:?}");
                    if ours != debug {
                        // A tie: as short, the same but for the last digit, and exact.
                        assert_eq!(ours.len(), debug.len(), "{ours} vs {debug}");
                        assert_eq!(ours[..ours.len() - 1], debug[..debug.len() - 1]);
                        assert_eq!(ours.parse::<f64>().ok(), Some(value), "{ours}");
                        ties[kind] += 1;
                    }
                    compared += 1;
                }
            }
        }
        // Ties exist (the test meets them: large values, few fraction bits), never among
        // millisecond figures like the log's.
        assert_eq!(ties[1], 0, "{ties:?} ties in {compared}");
        assert!(ties[0] + ties[2] > 0, "{ties:?}");
    }

    #[test]
    fn plain_fields_write_what_the_default_formatter_writes() {
        let text = || {
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(false)
                .without_time()
        };
        let default = Buffer::default();
        log_samples(text().with_writer(default.clone()));
        let plain = Buffer::default();
        log_samples(text().fmt_fields(PlainFields).with_writer(plain.clone()));
        let default = String::from_utf8(default.0.lock().unwrap().clone()).unwrap();
        let plain = String::from_utf8(plain.0.lock().unwrap().clone()).unwrap();
        assert_eq!(plain, default);
        assert_eq!(plain.lines().count(), 4, "{plain}");
        assert!(
            plain.contains(
                r#"request{request_id="1b2c" url.path="/v1/chat/completions" endpoint="echo"}: request method="POST" display=shown_by_Display endpoint="support \"bot\"" status=200 stream=false latency_ms=0.07 upstream_ms=1.0 tiny=1e-5 small=-0.0001 zero=0.0 negative_zero=-0.0 below_plain=9.99e-5 infinite=inf large=9999999999999998.0 huge=1e16 nan=NaN retries=0 offset=-3 quoted="tab\there" unicode="café" prompt_tokens=8 type="x""#
            ),
            "{plain}"
        );
        assert!(
            plain.contains(r"upstream said \x1b[31mno\u{9b} twice attempt=2"),
            "{plain}"
        );
    }

    #[test]
    fn an_event_is_one_line_whatever_its_fields_hold() {
        let plain = Buffer::default();
        let layer = tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(false)
            .without_time()
            .fmt_fields(PlainFields)
            .with_writer(plain.clone());
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            let error = "cannot load config:\n  - endpoints[1]: unknown route\r";
            let request_id = "zz status=200";
            tracing::error!(%error, request_id = %request_id, kind = %"route", "reload failed;\nstill serving");
        });
        let plain = String::from_utf8(plain.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            plain,
            "ERROR reload failed;\\nstill serving error=\"cannot load config:\\n  - endpoints[1]: unknown route\\r\" request_id=\"zz status=200\" kind=route\n"
        );
    }
}
