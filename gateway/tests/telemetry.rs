//! Traces, end to end: two `kleingate` processes export over OTLP/HTTP to a receiver this test
//! runs (it decodes the protobuf export requests with the OpenTelemetry protocol's own message
//! types). A gateway falls back from a dead backend to a second kleingate, a worker with the
//! tiny local engine; the client's `traceparent` must be the root of one trace that holds the
//! gateway's request and attempt spans and the worker's request and engine-stage spans.
#![cfg(feature = "local")]

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as SpanStatus;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

const KLEIN_TINY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../backends/local/tests/data/klein-tiny/pipeline"
);
const NSFW_TINY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../backends/local/tests/data/nsfw-tiny"
);

/// A span as received, with the `service.name` of the process that sent it.
#[derive(Clone, Debug)]
struct Got {
    service: String,
    span: Span,
}

type Store = Arc<Mutex<Vec<Got>>>;

/// An OTLP/HTTP traces receiver on 127.0.0.1: protobuf in, the (empty) protobuf answer out;
/// anything else is refused as a collector would.
async fn receiver() -> (SocketAddr, Store) {
    async fn traces(
        State(store): State<Store>,
        headers: HeaderMap,
        body: Bytes,
    ) -> (StatusCode, [(&'static str, &'static str); 1], Vec<u8>) {
        let status = accept(&store, &headers, body);
        let answer = ExportTraceServiceResponse::default().encode_to_vec();
        (status, [("content-type", "application/x-protobuf")], answer)
    }
    fn accept(store: &Store, headers: &HeaderMap, body: Bytes) -> StatusCode {
        if headers.get("content-type").and_then(|v| v.to_str().ok())
            != Some("application/x-protobuf")
        {
            return StatusCode::UNSUPPORTED_MEDIA_TYPE;
        }
        let Ok(req) = ExportTraceServiceRequest::decode(body) else {
            return StatusCode::BAD_REQUEST;
        };
        let mut got = store.lock().unwrap();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| text(kv.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push(Got {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        StatusCode::OK
    }
    let store: Store = Arc::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(traces))
        .with_state(store.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, store)
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| text(kv.value.as_ref()?.value.as_ref()?))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sigterm_and_wait(child: &mut Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "kleingate exited with {s}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("kleingate did not exit within 60 s of SIGTERM");
}

/// The children of `parent` among `spans`, by name.
fn children<'a>(spans: &'a [Got], parent: &Span) -> HashMap<String, Vec<&'a Span>> {
    let mut out: HashMap<String, Vec<&Span>> = HashMap::new();
    for g in spans {
        if g.span.parent_span_id == parent.span_id && g.span.trace_id == parent.trace_id {
            out.entry(g.span.name.clone()).or_default().push(&g.span);
        }
    }
    out
}

fn one<'a>(map: &HashMap<String, Vec<&'a Span>>, name: &str) -> &'a Span {
    match map.get(name).map(Vec::as_slice) {
        Some([s]) => s,
        other => panic!(
            "expected one `{name}` span, got {other:?}; names: {:?}",
            map.keys().collect::<Vec<_>>()
        ),
    }
}

fn within(inner: &Span, outer: &Span) {
    assert!(
        inner.start_time_unix_nano >= outer.start_time_unix_nano
            && inner.end_time_unix_nano <= outer.end_time_unix_nano,
        "`{}` is not within `{}`",
        inner.name,
        outer.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_trace_holds_the_gateway_the_worker_and_the_engine_stages() {
    let (otlp, store) = receiver().await;
    let dir = tempfile::tempdir().unwrap();

    // The worker: a kleingate with the tiny local engine and a safety model.
    let worker_cfg = dir.path().join("worker.toml");
    std::fs::write(
        &worker_cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nshutdown_delay_secs = 0\n\
             [telemetry]\nendpoint = \"http://{otlp}\"\nservice_name = \"kleingate-worker\"\n\
             [backends.local]\nkind = \"local\"\nweights = \"{KLEIN_TINY}\"\ndevice = \"cpu\"\n\
             max_sequence_length = 64\nmodels = [\"flux2-klein-4b\"]\n\
             safety_weights = \"{NSFW_TINY}\"\n"
        ),
    )
    .unwrap();
    let (mut worker, worker_url) = common::start(&worker_cfg, "info", None);

    // A port nobody listens on: the gateway's first backend fails to connect.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let gateway_cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &gateway_cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nshutdown_delay_secs = 0\n\
             [telemetry]\nendpoint = \"http://{otlp}/\"\nservice_name = \"kleingate-gateway\"\n\
             [routing]\norder = [\"dead\", \"worker\"]\n\
             [backends.dead]\nkind = \"verda\"\nbase_url = \"http://{dead_addr}\"\n\
             api_key_env = \"KLEINGATE_TELEMETRY_TEST_NO_KEY\"\n\
             [backends.worker]\nkind = \"verda\"\nbase_url = \"{worker_url}\"\n\
             api_key_env = \"KLEINGATE_TELEMETRY_TEST_NO_KEY\"\n"
        ),
    )
    .unwrap();
    let log_path = dir.path().join("gateway.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // Warnings only (and the access log): the trace id must still be on the lines.
    let (mut gateway, gateway_url) =
        common::start(&gateway_cfg, "warn,kleingate::access=info", Some(log));

    let http = reqwest::Client::new();
    // The worker is ready once its engine has loaded.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = http.get(format!("{worker_url}/readyz")).send().await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "the worker never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let body = serde_json::json!({"prompt": "a red fox", "seed": 5, "width": 64, "height": 64,
        "output_format": "png", "enable_safety_checker": true});
    let r = http
        .post(format!("{gateway_url}/flux2-klein-4b/generate"))
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(r.headers()["x-kleingate-backend"], "worker");
    // A request without a trace context starts a trace of its own.
    let r = http
        .post(format!("{gateway_url}/flux2-klein-4b/generate"))
        .json(
            &serde_json::json!({"prompt": "a blue fox", "seed": 6, "width": 64, "height": 64,
            "enable_safety_checker": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Shutting down sends the spans still buffered.
    tokio::task::spawn_blocking(move || {
        sigterm_and_wait(&mut gateway);
        sigterm_and_wait(&mut worker);
    })
    .await
    .unwrap();
    let spans = store.lock().unwrap().clone();
    let tid = |g: &Got| hex(&g.span.trace_id);
    let ours: Vec<Got> = spans
        .iter()
        .filter(|g| tid(g) == trace_id)
        .cloned()
        .collect();

    // The gateway's request span: a server span under the client's.
    let requests: Vec<&Got> = ours
        .iter()
        .filter(|g| g.service == "kleingate-gateway" && g.span.name == "POST /{model}/generate")
        .collect();
    assert_eq!(requests.len(), 1, "{spans:#?}");
    let request = &requests[0].span;
    assert_eq!(hex(&request.parent_span_id), client_span);
    assert_eq!(request.kind, SpanKind::Server as i32);
    for (k, v) in [
        ("http.request.method", "POST"),
        ("http.route", "/{model}/generate"),
        ("http.response.status_code", "200"),
        ("kleingate.model", "flux2-klein-4b"),
        ("kleingate.backend", "worker"),
        ("kleingate.cache", "miss"),
    ] {
        assert_eq!(attr(request, k).as_deref(), Some(v), "{k} on {request:#?}");
    }

    // One child span per backend tried, in order, each with its outcome.
    let attempts = children(&ours, request);
    let dead = one(&attempts, "backend dead");
    let tried = one(&attempts, "backend worker");
    assert_eq!(attempts.len(), 2, "{:?}", attempts.keys());
    assert!(dead.end_time_unix_nano <= tried.start_time_unix_nano);
    assert_eq!(dead.kind, SpanKind::Internal as i32);
    assert_eq!(attr(dead, "kleingate.outcome").as_deref(), Some("connect"));
    assert_eq!(
        dead.status.as_ref().map(|s| s.code),
        Some(SpanStatus::Error as i32)
    );
    assert_eq!(attr(tried, "kleingate.outcome").as_deref(), Some("ok"));
    assert_eq!(
        attr(tried, "kleingate.backend.kind").as_deref(),
        Some("verda")
    );
    within(dead, request);
    within(tried, request);

    // Each attempt's HTTP call: a client span naming the endpoint of the pool it went to.
    let worker_addr = worker_url.trim_start_matches("http://");
    let call = one(&children(&ours, tried), &format!("POST {worker_addr}"));
    assert_eq!(call.kind, SpanKind::Client as i32);
    assert_eq!(attr(call, "server.address").as_deref(), Some(worker_addr));
    within(call, tried);
    one(&children(&ours, dead), &format!("POST {dead_addr}"));
    // The worker joined the trace under the call that reached it.
    let worker_requests: Vec<&Got> = ours
        .iter()
        .filter(|g| g.service == "kleingate-worker" && g.span.parent_span_id == call.span_id)
        .collect();
    assert_eq!(worker_requests.len(), 1, "{ours:#?}");
    let worker_request = &worker_requests[0].span;
    assert_eq!(worker_request.name, "POST /{model}/generate");
    assert_eq!(
        attr(worker_request, "kleingate.backend").as_deref(),
        Some("local")
    );
    let local = one(&children(&ours, worker_request), "backend local");

    // The engine's stages under the worker's attempt, in order; the steps inside the loop.
    let stages = children(&ours, local);
    let order = [
        "queue_wait",
        "text_encoder",
        "denoise",
        "vae_decode",
        "safety",
        "encode_image",
    ];
    let mut last_end = 0;
    for name in order {
        let s = one(&stages, name);
        within(s, local);
        assert!(
            s.start_time_unix_nano >= last_end,
            "{name} overlaps the stage before it"
        );
        last_end = s.end_time_unix_nano;
    }
    let denoise = one(&stages, "denoise");
    assert_eq!(attr(denoise, "steps").as_deref(), Some("4"));
    let steps = children(&ours, denoise);
    let mut steps: Vec<&Span> = steps.get("step").cloned().unwrap_or_default();
    steps.sort_by_key(|s| s.start_time_unix_nano);
    let index: Vec<Option<String>> = steps.iter().map(|s| attr(s, "index")).collect();
    let want: Vec<Option<String>> = (0..4).map(|i| Some(i.to_string())).collect();
    assert_eq!(index, want);
    for s in &steps {
        within(s, denoise);
    }

    // The request without a trace context: a root span of a new trace.
    let roots: Vec<&Got> = spans
        .iter()
        .filter(|g| {
            g.service == "kleingate-gateway"
                && g.span.name == "POST /{model}/generate"
                && g.span.parent_span_id.is_empty()
        })
        .collect();
    assert_eq!(roots.len(), 1, "{spans:#?}");
    assert_ne!(tid(roots[0]), trace_id);
    // Probes are not traced.
    assert!(
        spans.iter().all(|g| !g.span.name.contains("/readyz")),
        "a probe was traced"
    );

    // The gateway's log lines inside the request carry its trace id.
    let mut logs = String::new();
    std::fs::File::open(&log_path)
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    let with_id = |needle: &str| {
        logs.lines()
            .any(|l| l.contains(needle) && l.contains(&format!("trace_id={trace_id}")))
    };
    assert!(with_id("kleingate::access"), "{logs}");
    assert!(with_id("backend attempt failed"), "{logs}");
    assert!(!logs.contains("otel."), "{logs}");
}
