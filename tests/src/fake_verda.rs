//! A fake Verda FLUX.2 [klein] endpoint: `POST /{model}/generate`, validating requests with the
//! same rules as Verda (400 with the JSON error shape), checking the bearer token (401), and then
//! answering as its current [`Mode`] says: image bytes, the base64 JSON form, or one of the
//! failures a real upstream shows (503 with Retry-After, 500, hang, slow, malformed, oversized).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine as _;
use kleingate_protocol::{GenerateRequest, Limits, Model, ValidationError};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    /// Raw image bytes with `X-Seed` / `X-Has-Nsfw-Content`.
    Image,
    /// `{"image": base64, "seed": n, "has_nsfw_content": b}`.
    Json,
    /// 400 whatever the request (a backend that disagrees with our validation).
    BadRequest,
    /// 503 "model not loaded", with `Retry-After` seconds when given.
    Unavailable { retry_after: Option<u64> },
    /// 500 "generation failed".
    ServerError,
    /// 401: our token is wrong.
    Unauthorized,
    /// Accept the request and never answer.
    Hang,
    /// Answer with the image after this delay.
    Slow(Duration),
    /// 200 `image/jpeg` whose body is not an image.
    Malformed,
    /// 200 with an image body of this many bytes.
    Huge(usize),
}

struct Shared {
    mode: Mutex<Mode>,
    image: Bytes,
    token: Option<String>,
    calls: AtomicUsize,
    next_seed: AtomicU64,
    last_body: Mutex<Option<Value>>,
    last_auth: Mutex<Option<String>>,
}

pub struct FakeVerda {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// A JPEG-looking body of `len` bytes (valid SOI marker, deterministic filler).
pub fn fake_jpeg(len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xE0]);
    let mut x: u32 = 0x1234_5678;
    while v.len() < len.saturating_sub(2) {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        v.push((x >> 24) as u8);
    }
    v.extend_from_slice(&[0xFF, 0xD9]);
    Bytes::from(v)
}

impl FakeVerda {
    /// Serve `image` (an encoded jpeg/png/webp) in `Mode::Image`; require `token` if given.
    pub async fn start_with(image: Bytes, token: Option<&str>) -> FakeVerda {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::serve_on(listener, image, token)
    }

    pub async fn start() -> FakeVerda {
        Self::start_with(fake_jpeg(4096), None).await
    }

    pub fn serve_on(listener: TcpListener, image: Bytes, token: Option<&str>) -> FakeVerda {
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Image),
            image,
            token: token.map(str::to_owned),
            calls: AtomicUsize::new(0),
            next_seed: AtomicU64::new(1000),
            last_body: Mutex::new(None),
            last_auth: Mutex::new(None),
        });
        let app = Router::new()
            .route("/{model}/generate", post(generate))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeVerda { addr, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, m: Mode) {
        *self.shared.mode.lock().unwrap() = m;
    }

    /// Requests that reached the generate route (including refused ones).
    pub fn calls(&self) -> usize {
        self.shared.calls.load(Ordering::SeqCst)
    }

    pub fn last_body(&self) -> Option<Value> {
        self.shared.last_body.lock().unwrap().clone()
    }

    pub fn last_auth(&self) -> Option<String> {
        self.shared.last_auth.lock().unwrap().clone()
    }

    pub fn image(&self) -> Bytes {
        self.shared.image.clone()
    }

    /// Stop listening: later connections are refused, as from a dead host.
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for FakeVerda {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn error(status: StatusCode, code: &str, message: &str, field: Option<&str>) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message, "field": field}})),
    )
        .into_response()
}

fn validation(e: ValidationError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    error(status, e.code.as_str(), &e.message, e.field.as_deref())
}

async fn generate(
    State(s): State<Arc<Shared>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    s.calls.fetch_add(1, Ordering::SeqCst);
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    *s.last_auth.lock().unwrap() = auth.clone();
    *s.last_body.lock().unwrap() = serde_json::from_slice(&body).ok();
    let Some(model) = Model::from_id(&model) else {
        return error(StatusCode::NOT_FOUND, "not_found", "unknown model", None);
    };
    if let Some(token) = &s.token {
        if auth.as_deref() != Some(&format!("Bearer {token}")) {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "invalid API key",
                None,
            );
        }
    }
    let mode = s.mode.lock().unwrap().clone();
    let req = match GenerateRequest::from_json(&body, Some(model), model, &Limits::default()) {
        Ok(r) => r,
        Err(e) => return validation(e),
    };
    match mode {
        Mode::BadRequest => error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "upstream says no",
            Some("prompt"),
        ),
        Mode::Unavailable { retry_after } => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "model not loaded",
                None,
            );
            if let Some(secs) = retry_after {
                r.headers_mut().insert("retry-after", secs.into());
            }
            r
        }
        Mode::ServerError => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "generation failed",
            None,
        ),
        Mode::Unauthorized => error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "invalid API key",
            None,
        ),
        Mode::Hang => std::future::pending().await,
        Mode::Slow(d) => {
            tokio::time::sleep(d).await;
            image(&s, &req, s.image.clone(), false)
        }
        Mode::Malformed => {
            ([("content-type", "image/jpeg")], "this is not an image").into_response()
        }
        Mode::Huge(n) => image(&s, &req, fake_jpeg(n), false),
        Mode::Json => image(&s, &req, s.image.clone(), true),
        Mode::Image => image(&s, &req, s.image.clone(), req.enable_base64_output),
    }
}

fn image(s: &Shared, req: &GenerateRequest, bytes: Bytes, as_json: bool) -> Response {
    let seed = req
        .seed
        .unwrap_or_else(|| s.next_seed.fetch_add(1, Ordering::SeqCst));
    // A prompt mentioning "nsfw" is flagged, so tests can see the flag travel.
    let nsfw = req.enable_safety_checker && req.prompt.contains("nsfw");
    let ct = kleingate_protocol::OutputFormat::sniff(&bytes)
        .map_or("application/octet-stream", |f| f.content_type());
    if as_json {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        return axum::Json(json!({"image": b64, "seed": seed, "has_nsfw_content": nsfw}))
            .into_response();
    }
    (
        [
            ("content-type", ct.to_owned()),
            ("x-seed", seed.to_string()),
            ("x-has-nsfw-content", nsfw.to_string()),
        ],
        bytes,
    )
        .into_response()
}
