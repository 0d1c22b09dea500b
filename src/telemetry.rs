//! Logging and tracing set-up for the process: log lines (text or JSON) on stderr, and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, every span (requests, chain steps) exported over OTLP/HTTP
//! (`OTEL_EXPORTER_OTLP_PROTOCOL=http/json` for JSON, protobuf otherwise).

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes log lines and exported spans when dropped (at the end of `main`).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    _log_writer: crate::log_writer::Guard,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("could not flush OTLP spans: {error}");
        }
    }
}

pub fn init(json: bool) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr, coloured only on a terminal, written in batches by a background thread
    // so that a slow stderr never stalls a request. Not lossy: a full buffer waits rather than
    // drops lines.
    let (writer, log_writer) = crate::log_writer::batched(std::io::stderr())?;
    let logs = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = if json {
        logs.json().flatten_event(true).boxed()
    } else {
        logs.boxed()
    };
    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => Some(otlp_provider()?),
        _ => None,
    };
    let spans = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("switchyard")));
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(spans)
        .try_init()?;
    Ok(Telemetry {
        provider,
        _log_writer: log_writer,
    })
}

fn otlp_provider() -> anyhow::Result<SdkTracerProvider> {
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
        Ok("http/json") => Protocol::HttpJson,
        _ => Protocol::HttpBinary,
    };
    // The endpoint comes from OTEL_EXPORTER_OTLP_ENDPOINT (`/v1/traces` is appended).
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("switchyard")
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}
