//! Logs and traces. Logs go to stderr (`RUST_LOG`); with `[telemetry] endpoint` set, the
//! `tracing` spans of a request (the request, each backend attempt, the local engine's stages)
//! are also exported as OpenTelemetry traces over OTLP/HTTP. A client's W3C `traceparent` is the
//! parent of its request's span and every upstream call carries the attempt's own, so a
//! kleingate GPU worker's spans join the gateway's trace. Log lines inside a request carry its
//! `trace_id`.
//!
//! With telemetry off (the default) nothing is exported and no span is made for OpenTelemetry;
//! a client's `traceparent` and `tracestate` still pass to the upstream unchanged, and the logs
//! still carry the client's trace id.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::http::{HeaderMap, Method};
use bytes::{Bytes, BytesMut};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Status, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// `[telemetry]`: OpenTelemetry trace export. Off unless `endpoint` is set.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP collector, e.g. `http://otel-collector:4318`: spans are sent (protobuf) to
    /// `{endpoint}/v1/traces`. Unset: no export. Headers for the collector (credentials) come
    /// from the standard `OTEL_EXPORTER_OTLP_HEADERS` variable, never from this file.
    pub endpoint: Option<String>,
    /// The share of new traces kept, 0 to 1 (by trace id, so every service that uses the same
    /// ratio keeps the same traces).
    pub sampling_ratio: f64,
    /// Whether a client's `traceparent` decides for its own request (its "sampled" flag): on,
    /// a client that traces its call gets the gateway's spans in its trace whatever the ratio.
    /// Off, only `sampling_ratio` decides (the trace id is still the client's).
    pub follow_client_sampling: bool,
    /// `service.name` of the exported spans (tell replicas apart by the `service.instance.id`
    /// resource attribute, from `OTEL_RESOURCE_ATTRIBUTES`).
    pub service_name: String,
    /// How long one export may take before it is given up.
    pub export_timeout_secs: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            endpoint: None,
            sampling_ratio: 1.0,
            follow_client_sampling: true,
            service_name: "kleingate".into(),
            export_timeout_secs: 10.0,
        }
    }
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(format!(
                "telemetry.sampling_ratio must be between 0 and 1; got {}",
                self.sampling_ratio
            ));
        }
        if self.service_name.trim().is_empty() {
            return Err("telemetry.service_name must not be empty".into());
        }
        if !(self.export_timeout_secs > 0.0 && self.export_timeout_secs <= 300.0) {
            return Err(format!(
                "telemetry.export_timeout_secs must be positive and at most 300; got {}",
                self.export_timeout_secs
            ));
        }
        if let Some(e) = &self.endpoint {
            match url::Url::parse(e) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => {
                    return Err(format!(
                        "telemetry.endpoint must be an http:// or https:// URL (the collector's OTLP/HTTP address, e.g. http://otel-collector:4318); got `{e}`"
                    ))
                }
            }
        }
        Ok(())
    }

    /// Where the spans are posted: the endpoint with the OTLP traces path.
    pub fn traces_url(&self) -> Option<String> {
        self.endpoint.as_ref().map(|e| {
            let e = e.trim_end_matches('/');
            if e.ends_with("/v1/traces") {
                e.to_owned()
            } else {
                format!("{e}/v1/traces")
            }
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("the trace exporter could not be built: {0}")]
    Exporter(String),
    #[error("a global log subscriber is already installed")]
    AlreadyInstalled,
}

/// Set once the OpenTelemetry layer is installed: spans get OpenTelemetry data, parents and
/// attributes only then.
static EXPORTING: AtomicBool = AtomicBool::new(false);

fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// What [`install`] set up; [`Telemetry::shutdown`] sends the spans still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    flush_timeout: Duration,
}

impl Telemetry {
    /// Export what is buffered and stop. Blocks (up to the export timeout, and a retry); call it
    /// from outside the runtime's worker threads while the runtime still runs (exports are sent
    /// on it).
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown_with_timeout(self.flush_timeout) {
                tracing::warn!(error = %e, "flushing the last spans failed");
            }
        }
    }
}

/// The log filter: `RUST_LOG`, else `info`; the request and attempt spans (made in this module)
/// always, so that a line logged inside a request shows its `trace_id` at any log level.
fn log_filter() -> tracing_subscriber::EnvFilter {
    let f = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    match "kleingate_gateway::telemetry=info".parse() {
        Ok(d) => f.add_directive(d),
        Err(_) => f,
    }
}

fn log_layer<S>() -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .fmt_fields(LogFields)
        // Logs on stderr, colour only on a terminal; stdout carries the one "listening" line.
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
}

/// Logs only (the CLI's commands other than `serve`).
pub fn install_logs() {
    let _ = tracing_subscriber::registry()
        .with(log_layer().with_filter(log_filter()))
        .try_init();
}

/// Logs, and trace export when `cfg.endpoint` is set. Exports are sent on `rt`.
pub fn install(
    cfg: &TelemetryConfig,
    rt: &tokio::runtime::Handle,
) -> Result<Telemetry, TelemetryError> {
    let Some(url) = cfg.traces_url() else {
        tracing_subscriber::registry()
            .with(log_layer().with_filter(log_filter()))
            .try_init()
            .map_err(|_| TelemetryError::AlreadyInstalled)?;
        return Ok(Telemetry {
            provider: None,
            flush_timeout: Duration::ZERO,
        });
    };
    let timeout = Duration::from_secs_f64(cfg.export_timeout_secs);
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .user_agent(concat!("kleingate/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(OtlpClient {
            client,
            rt: rt.clone(),
        })
        .with_endpoint(url)
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_timeout(timeout)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let ratio = Sampler::TraceIdRatioBased(cfg.sampling_ratio);
    let sampler = if cfg.follow_client_sampling {
        Sampler::ParentBased(Box::new(ratio))
    } else {
        ratio
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .with_attribute(KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION").to_owned(),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("kleingate");
    // Only kleingate's own spans and events, at info and above, whatever RUST_LOG says: the
    // trace does not change with the log level, and library internals stay out of it.
    let ours = tracing_subscriber::filter::Targets::new()
        .with_target("kleingate", tracing::Level::INFO)
        .with_target("kleingate_gateway", tracing::Level::INFO)
        .with_target("kleingate_local", tracing::Level::INFO)
        .with_target("kleingate_verda", tracing::Level::INFO);
    tracing_subscriber::registry()
        .with(log_layer().with_filter(log_filter()))
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(ours),
        )
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(Telemetry {
        provider: Some(provider),
        // One export, one retry of it, and some slack.
        flush_timeout: timeout * 2 + Duration::from_secs(1),
    })
}

/// The span of one request: `{method} {route}`, a server span whose parent is the client's
/// `traceparent`, with `trace_id` as a field so that every log line inside shows it. With
/// telemetry off, the second value is the client's context, to attach to the request's future:
/// upstream calls then pass it on unchanged.
pub(crate) fn request_span(
    method: &Method,
    route: &str,
    request_id: &str,
    headers: &HeaderMap,
) -> (Span, Option<Context>) {
    let client = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let from_client = client.span().span_context().is_valid();
    // Nothing to export and no client trace id to log: no span, so the request path pays nothing.
    if !exporting() && !from_client {
        return (Span::none(), None);
    }
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        trace_id = tracing::field::Empty,
    );
    if !exporting() {
        let trace_id = client.span().span_context().trace_id();
        span.record("trace_id", tracing::field::display(trace_id));
        return (span, Some(client));
    }
    let _ = span.set_parent(client);
    annotate_span(&span, || {
        vec![
            KeyValue::new("http.request.method", method.to_string()),
            KeyValue::new("http.route", route.to_owned()),
            KeyValue::new("kleingate.request_id", request_id.to_owned()),
        ]
    });
    let trace_id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(trace_id));
    (span, None)
}

/// A span for work that outlives its request (a shadow run): in the request's trace, as a
/// child of the current span, without holding the request's span open (its trace would be sent
/// only when the work ends). Carries the request's `trace_id` for the log lines.
pub(crate) fn detached_span() -> Span {
    if !exporting() {
        // Nothing is exported: a plain child (its log lines show the request's fields).
        return tracing::info_span!("shadow_run", trace_id = tracing::field::Empty);
    }
    let cx = Span::current().context();
    let span = tracing::info_span!(parent: None, "shadow_run", trace_id = tracing::field::Empty);
    let trace_id = cx.span().span_context().trace_id();
    let _ = span.set_parent(cx);
    span.record("trace_id", tracing::field::display(trace_id));
    span
}

/// The answer's status on the request span; a 5xx marks it failed (a 4xx is the client's).
pub(crate) fn record_status(span: &Span, status: u16, code: Option<&str>) {
    if !exporting() {
        return;
    }
    span.set_attribute("http.response.status_code", i64::from(status));
    if status >= 500 {
        span.set_status(Status::error(code.unwrap_or("error").to_owned()));
    }
}

/// Attributes on the current span (OpenTelemetry only): `make` runs only when exporting, so
/// the request path builds no attribute while telemetry is off.
pub(crate) fn annotate(make: impl FnOnce() -> Vec<KeyValue>) {
    if exporting() {
        annotate_span(&Span::current(), make);
    }
}

/// Attributes on `span`, as [`annotate`].
pub(crate) fn annotate_span(span: &Span, make: impl FnOnce() -> Vec<KeyValue>) {
    if exporting() {
        for kv in make() {
            span.set_attribute(kv.key, kv.value);
        }
    }
}

/// The span of one backend attempt, named after the backend (a `verda` backend's HTTP calls
/// are client spans below it, one per endpoint of its pool tried).
pub(crate) fn attempt_span(backend: &str, kind: &str, attempt: usize) -> Span {
    if !exporting() {
        // Only the trace would show it; the logs already name the backend.
        return Span::none();
    }
    let span = tracing::info_span!(
        "backend",
        otel.name = %format_args!("backend {backend}"),
        otel.kind = "internal",
    );
    annotate_span(&span, || {
        vec![
            KeyValue::new("kleingate.backend", backend.to_owned()),
            KeyValue::new("kleingate.backend.kind", kind.to_owned()),
            KeyValue::new("kleingate.attempt", attempt as i64),
        ]
    });
    span
}

/// How an attempt ended: `ok`, or the failure's reason (`timeout`, `unavailable`, ...), which
/// also marks the span failed.
pub(crate) fn attempt_outcome(span: &Span, outcome: &str) {
    if !exporting() {
        return;
    }
    span.set_attribute("kleingate.outcome", outcome.to_owned());
    if outcome != "ok" {
        span.set_status(Status::error(outcome.to_owned()));
    }
}

/// The W3C trace context for an upstream call from the current span: the attempt's own when
/// exporting, else the client's unchanged (if it sent one). See `kleingate_backend::TraceHeaders`.
pub fn trace_headers() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let from_span = Span::current().context();
    let cx = if from_span.span().span_context().is_valid() {
        from_span
    } else {
        Context::current()
    };
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(&mut out));
    }
    out
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut Vec<(&'static str, String)>);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The W3C propagator writes exactly these two.
        let name = match key {
            "traceparent" => "traceparent",
            "tracestate" => "tracestate",
            _ => return,
        };
        self.0.push((name, value));
    }
}

/// The OTLP exporter's HTTP client: the gateway's reqwest, with requests run on the gateway's
/// runtime (the SDK's batch processor exports from a thread of its own, outside any runtime).
#[derive(Debug)]
struct OtlpClient {
    client: reqwest::Client,
    rt: tokio::runtime::Handle,
}

/// A collector's answer is a small protobuf message; more than this is not read.
const MAX_COLLECTOR_ANSWER: usize = 1 << 20;

#[async_trait]
impl opentelemetry_http::HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let client = self.client.clone();
        let send = async move {
            let mut resp = client.execute(request).await?;
            let mut answer = http::Response::builder().status(resp.status());
            for (k, v) in resp.headers() {
                answer = answer.header(k, v);
            }
            let mut body = BytesMut::new();
            while let Some(chunk) = resp.chunk().await? {
                if body.len() + chunk.len() > MAX_COLLECTOR_ANSWER {
                    return Err(opentelemetry_http::ResponseBodyTooLarge::new().into());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(answer.body(body.freeze())?)
        };
        let answer: Result<http::Response<Bytes>, opentelemetry_http::HttpError> =
            self.rt.spawn(send).await?;
        answer
    }
}

/// Log fields as `tracing`'s default format writes them, without the `otel.*` fields (span
/// name, kind, status: they are for the exporter and would repeat on every log line).
struct LogFields;

impl<'w> FormatFields<'w> for LogFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = FieldWriter {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct FieldWriter<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visit for FieldWriter<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        if self.result.is_err() || name.starts_with("otel.") || name.starts_with("log.") {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        self.result = if name == "message" {
            write!(self.writer, "{sep}{value:?}")
        } else {
            write!(
                self.writer,
                "{sep}{}={value:?}",
                name.trim_start_matches("r#")
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_once() {
        let mut c = TelemetryConfig {
            endpoint: Some("http://collector:4318".into()),
            ..Default::default()
        };
        assert_eq!(
            c.traces_url().as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        c.endpoint = Some("http://collector:4318/v1/traces/".into());
        assert_eq!(
            c.traces_url().as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        c.endpoint = None;
        assert_eq!(c.traces_url(), None);
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        for (c, want) in [
            (
                TelemetryConfig {
                    sampling_ratio: 1.5,
                    ..Default::default()
                },
                "telemetry.sampling_ratio",
            ),
            (
                TelemetryConfig {
                    endpoint: Some("collector:4318".into()),
                    ..Default::default()
                },
                "telemetry.endpoint",
            ),
            (
                TelemetryConfig {
                    service_name: " ".into(),
                    ..Default::default()
                },
                "telemetry.service_name",
            ),
            (
                TelemetryConfig {
                    export_timeout_secs: 0.0,
                    ..Default::default()
                },
                "telemetry.export_timeout_secs",
            ),
        ] {
            let e = c.validate().expect_err(want);
            assert!(e.starts_with(want), "{e}");
        }
        assert!(TelemetryConfig::default().validate().is_ok());
    }

    #[test]
    fn without_export_a_clients_trace_context_passes_unchanged() {
        let mut h = HeaderMap::new();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert("traceparent", parent.parse().unwrap());
        h.insert("tracestate", "vendor=opaque".parse().unwrap());
        let (span, cx) = request_span(&Method::POST, "/generate", "r1", &h);
        let cx = cx.expect("the client's context");
        let _g = cx.attach();
        let _e = span.enter();
        let mut got = trace_headers();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("traceparent", parent.to_owned()),
                ("tracestate", "vendor=opaque".to_owned())
            ]
        );
    }

    #[test]
    fn without_a_clients_context_nothing_is_sent_and_bad_ones_are_dropped() {
        let (_, cx) = request_span(&Method::POST, "/generate", "r1", &HeaderMap::new());
        assert!(cx.is_none());
        assert!(trace_headers().is_empty());
        let mut h = HeaderMap::new();
        // All-zero trace ids are invalid (W3C); a malformed header is not forwarded verbatim.
        h.insert(
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let (_, cx) = request_span(&Method::POST, "/generate", "r1", &h);
        assert!(cx.is_none());
    }

    #[test]
    fn log_fields_leave_out_the_exporters_fields() {
        use tracing_subscriber::fmt::MakeWriter;
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        impl<'a> MakeWriter<'a> for Buf {
            type Writer = Buf;
            fn make_writer(&'a self) -> Buf {
                self.clone()
            }
        }
        let buf = Buf::default();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(LogFields)
                .with_ansi(false)
                .with_writer(buf.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "request",
                otel.name = "POST /generate",
                otel.kind = "server",
                trace_id = tracing::field::Empty
            );
            span.record(
                "trace_id",
                tracing::field::display("4bf92f3577b34da6a3ce929d0e0e4736"),
            );
            let _e = span.enter();
            tracing::info!(status = 200, route = "/generate", "done");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(
            out.contains("request{trace_id=4bf92f3577b34da6a3ce929d0e0e4736}:"),
            "{out}"
        );
        assert!(out.contains("done status=200 route=\"/generate\""), "{out}");
        assert!(!out.contains("otel."), "{out}");
    }
}
