//! The OpenAPI 3.1 document of the API, made from the code: the request body from the protocol's
//! field list and limits, the answers from the types the routes return (utoipa), every error
//! from [`ErrorCode`] with its status. Served at `GET /openapi.json` (with the gateway's
//! configured limits) and written to `docs/openapi.json` by `kleingate openapi` (the defaults;
//! CI checks it is current).

use std::collections::BTreeMap;

use kleingate_protocol::{ErrorBody, ErrorCode, ImageJson, Limits, Model};
use serde_json::{json, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, RefOr, Schema};
use utoipa::ToSchema;

use super::experiments::Results;
use super::feedback::{Feedback, Recorded};
use super::info::{BackendList, ModelList, Status};
use ErrorCode::*;

/// Who may call a route.
#[derive(Clone, Copy, PartialEq)]
enum Access {
    /// Open: probes, scrapers, the document itself.
    Open,
    /// An API key (when auth is on).
    Key,
    /// A key with `experiments = true`.
    Experiments,
}

/// The errors every route behind the API key can answer.
const KEYED: &[ErrorCode] = &[Unauthorized, MethodNotAllowed];

/// The errors of the generate routes.
static GENERATE: &[ErrorCode] = &[
    InvalidRequest,
    InvalidJson,
    UnknownBackend,
    BackendCannotServe,
    SafetyCheckerUnavailable,
    UnknownExperiment,
    BackendHeaderNotAllowed,
    ModelNotAllowed,
    BackendNotAllowed,
    UnknownModel,
    BodyTimeout,
    TooLarge,
    UnsupportedMediaType,
    BudgetExceeded,
    RateLimited,
    GenerationFailed,
    BadGateway,
    Overloaded,
    NoBackend,
    NoBackendAvailable,
    Timeout,
];

/// `GET /openapi.json`: the document with this gateway's limits.
pub(super) async fn serve(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<crate::state::AppState>>,
) -> axum::Json<Value> {
    axum::Json(document(&state.config.limits))
}

/// The whole document. `limits` are the ones the request body is validated against.
pub fn document(limits: &Limits) -> Value {
    let mut schemas: Vec<(String, RefOr<Schema>)> = Vec::new();
    add::<ErrorBody>(&mut schemas);
    add::<ImageJson>(&mut schemas);
    add::<ModelList>(&mut schemas);
    add::<BackendList>(&mut schemas);
    add::<Status>(&mut schemas);
    add::<Feedback>(&mut schemas);
    add::<Recorded>(&mut schemas);
    add::<Results>(&mut schemas);
    schemas.push((
        "GenerateBody".into(),
        RefOr::T(kleingate_protocol::schema::generate_body(limits)),
    ));
    let components = ComponentsBuilder::new()
        .schemas_from_iter(schemas)
        .security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        )
        .build();

    let mut paths: BTreeMap<String, Value> = BTreeMap::new();
    let mut put = |path: &str, method: &str, op: Value| {
        let item = paths.entry(path.to_owned()).or_insert_with(|| json!({}));
        item[method] = op;
    };
    let models: Vec<&str> = Model::ALL.iter().map(|m| m.id()).collect();
    let model_param = json!({
        "name": "model", "in": "path", "required": true,
        "description": "The model (another name is 404 `unknown_model`)",
        "schema": {"type": "string", "enum": models},
    });
    for (path, params, id) in [
        ("/{model}/generate", vec![model_param], "generateForModel"),
        ("/generate", vec![], "generate"),
    ] {
        let mut parameters = params;
        parameters.extend(generate_headers());
        put(
            path,
            "post",
            operation(
                id,
                "Generate an image (Verda-compatible)",
                Access::Key,
                parameters,
                Some(json_body("GenerateBody")),
                image_answer(),
                GENERATE,
            ),
        );
    }
    put(
        "/v1/models",
        "get",
        operation(
            "listModels",
            "The models, their defaults and the backends serving them",
            Access::Key,
            vec![],
            None,
            json_answer("ModelList"),
            &[],
        ),
    );
    put(
        "/v1/backends",
        "get",
        operation(
            "listBackends",
            "The backends' health, circuit and load",
            Access::Key,
            vec![],
            None,
            json_answer("BackendList"),
            &[],
        ),
    );
    put(
        "/v1/feedback",
        "post",
        operation(
            "feedback",
            "Vote on an experiment answer",
            Access::Key,
            vec![],
            Some(json_body("Feedback")),
            json_answer("Recorded"),
            &[
                InvalidRequest,
                UnsupportedMediaType,
                TooLarge,
                NotFound,
                RateLimited,
                StorageFailed,
            ],
        ),
    );
    let name = json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string"}, "description": "The experiment"});
    put(
        "/v1/experiments/{name}",
        "get",
        operation(
            "experimentResults",
            "An experiment's results per variant",
            Access::Experiments,
            vec![name.clone()],
            None,
            json_answer("Results"),
            &[NotFound, StorageFailed],
        ),
    );
    put(
        "/v1/experiments/{name}/images/{id}",
        "get",
        operation(
            "experimentImage",
            "A stored image of an experiment with shadow runs",
            Access::Experiments,
            vec![
                name.clone(),
                json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string"}, "description": "The answer's X-Kleingate-Result-Id"}),
            ],
            None,
            binary_answer("The image"),
            &[NotFound, StorageFailed],
        ),
    );
    put(
        "/ui/experiments/{name}",
        "get",
        operation(
            "votePage",
            "The vote page: pairs of images side by side",
            Access::Experiments,
            vec![name],
            None,
            {
                // A browser without a key or the sign-in cookie is sent to the sign-in page.
                let mut ok = html_answer();
                ok["303"] = json!({"description": "No key: a redirect to `/ui/login?next=...`", "headers": {"location": {"required": true, "schema": {"type": "string"}}}});
                ok
            },
            &[NotFound, StorageFailed],
        ),
    );
    put(
        "/ui/login",
        "get",
        operation(
            "loginPage",
            "The vote page's sign-in form",
            Access::Open,
            vec![
                json!({"name": "next", "in": "query", "required": false, "schema": {"type": "string"}, "description": "Where to go after signing in (a path on this gateway)"}),
            ],
            None,
            html_answer(),
            &[MethodNotAllowed],
        ),
    );
    put(
        "/ui/login",
        "post",
        operation(
            "login",
            "Sign in with an API key (sets the page's cookie, then redirects)",
            Access::Open,
            vec![],
            Some(json!({
                "required": true,
                "content": {"application/x-www-form-urlencoded": {"schema": {
                    "type": "object",
                    "properties": {"key": {"type": "string"}, "next": {"type": "string"}},
                    "required": ["key"],
                }}},
            })),
            json!({"303": {"description": "Signed in: a redirect to `next`", "headers": {
                "location": {"schema": {"type": "string"}},
                "set-cookie": {"schema": {"type": "string"}},
            }}}),
            &[
                Unauthorized,
                CrossSiteLogin,
                InvalidRequest,
                TooLarge,
                MethodNotAllowed,
            ],
        ),
    );
    for (path, id, summary, ok) in [
        ("/healthz", "healthz", "Liveness", json_answer("Status")),
        (
            "/readyz",
            "readyz",
            "Readiness: a backend can serve and the gateway is not draining",
            json_answer("Status"),
        ),
        (
            "/metrics",
            "metrics",
            "Prometheus metrics (text format 0.0.4)",
            json!({"200": {"description": "The metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}),
        ),
        (
            "/openapi.json",
            "openapi",
            "This document",
            json!({"200": {"description": "The OpenAPI document", "content": {"application/json": {"schema": {"type": "object"}}}}}),
        ),
    ] {
        let errors: &[ErrorCode] = if path == "/readyz" {
            &[NotReady, MethodNotAllowed]
        } else {
            &[MethodNotAllowed]
        };
        put(
            path,
            "get",
            operation(id, summary, Access::Open, vec![], None, ok, errors),
        );
    }

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "kleingate",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "One Verda-compatible API for the FLUX.2 [klein] image models. Every answer carries X-Request-Id; errors are {\"error\": {\"code\", \"message\", \"field\"}} (docs/api.md).",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": components,
    })
}

/// A type's schema and those it refers to.
fn add<T: ToSchema>(schemas: &mut Vec<(String, RefOr<Schema>)>) {
    schemas.push((T::name().into_owned(), T::schema()));
    T::schemas(schemas);
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn json_body(schema: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema_ref(schema)}}})
}

fn json_answer(schema: &str) -> Value {
    json!({"200": {"description": "OK", "content": {"application/json": {"schema": schema_ref(schema)}}}})
}

fn html_answer() -> Value {
    json!({"200": {"description": "The page", "content": {"text/html": {"schema": {"type": "string"}}}}})
}

fn binary_answer(what: &str) -> Value {
    let binary =
        json!({"schema": {"type": "string", "contentMediaType": "application/octet-stream"}});
    json!({"200": {"description": what, "content": {
        "image/jpeg": binary, "image/png": binary, "image/webp": binary,
    }}})
}

/// The headers a client may send with a generate request.
fn generate_headers() -> Vec<Value> {
    let header = |name: &str, description: &str| json!({"name": name, "in": "header", "required": false, "schema": {"type": "string"}, "description": description});
    vec![
        header(
            "X-Kleingate-Backend",
            "Force a backend by name (if the gateway and the key allow it)",
        ),
        header("X-Kleingate-Experiment", "Join an A/B experiment by name"),
        header(
            "Cache-Control",
            "`no-cache`: skip the cache lookup; `no-store`: also keep the answer out",
        ),
        header(
            "traceparent",
            "W3C trace context: the request's spans join this trace (and it goes on to the upstream); one that does not parse is ignored",
        ),
        header(
            "tracestate",
            "W3C vendor trace state, passed on with `traceparent`",
        ),
    ]
}

/// The image answer of a generate request and its headers.
fn image_answer() -> Value {
    let mut ok =
        binary_answer("The image (by default), or JSON with it in base64 (`enable_base64_output`)");
    ok["200"]["content"]["application/json"] = json!({"schema": schema_ref("ImageJson")});
    let mut headers = kleingate_headers(true);
    headers.insert(
        "x-seed".into(),
        json!({"schema": {"type": "string", "pattern": "^[0-9]+$"}, "description": "The seed the image was made with (absent only if an upstream did not say)"}),
    );
    headers.insert(
        "x-has-nsfw-content".into(),
        json!({"required": true, "schema": {"type": "string", "enum": ["true", "false"]}}),
    );
    headers.insert("x-kleingate-variant".into(), json!({"schema": {"type": "string"}, "description": "The experiment variant that served it"}));
    headers.insert("x-kleingate-result-id".into(), json!({"schema": {"type": "string"}, "description": "The experiment answer's id, for feedback"}));
    ok["200"]["headers"] = Value::Object(headers);
    ok
}

/// Headers on every generate answer that reaches the request path: on every image, and on errors
/// other than those of the layers in front (401, 429 `rate_limited`, 503 `overloaded`, 405).
fn kleingate_headers(required: bool) -> serde_json::Map<String, Value> {
    let mut h = serde_json::Map::new();
    h.insert("x-kleingate-backend".into(), json!({"required": required, "schema": {"type": "string"}, "description": "The backend that answered (`none` when none did)"}));
    h.insert("x-kleingate-cache".into(), json!({"required": required, "schema": {"type": "string", "enum": ["hit", "miss", "coalesced", "bypass", "none"]}}));
    h.insert("x-kleingate-cost".into(), json!({"required": required, "schema": {"type": "string", "pattern": "^[0-9]+\\.[0-9]{6}$"}, "description": "USD this request made a backend spend"}));
    h
}

/// An operation: its answers are `ok` plus one per error status, naming the codes.
fn operation(
    id: &str,
    summary: &str,
    access: Access,
    parameters: Vec<Value>,
    body: Option<Value>,
    ok: Value,
    errors: &[ErrorCode],
) -> Value {
    let mut codes: Vec<ErrorCode> = errors.to_vec();
    if access != Access::Open {
        codes.extend_from_slice(KEYED);
    }
    if access == Access::Experiments {
        codes.push(ExperimentsNotAllowed);
    }
    let mut by_status: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
    for c in codes {
        let list = by_status.entry(c.status()).or_default();
        if !list.contains(&c.as_str()) {
            list.push(c.as_str());
        }
    }
    let mut responses = ok;
    // The generate routes' errors carry the `X-Kleingate-*` headers too (one static list: same
    // address).
    let generate = std::ptr::eq(errors, GENERATE);
    for (status, codes) in by_status {
        let mut headers = if generate {
            kleingate_headers(false)
        } else {
            serde_json::Map::new()
        };
        if status == 429 || status == 503 {
            headers.insert(
                "retry-after".into(),
                json!({"schema": {"type": "string", "pattern": "^[0-9]+$"}, "description": "Seconds to wait, when known"}),
            );
        }
        if status == 401 {
            headers.insert(
                "www-authenticate".into(),
                json!({"schema": {"type": "string"}}),
            );
        }
        responses[status.to_string()] = json!({
            "description": format!("Error: {}", codes.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ")),
            "headers": headers,
            "content": {"application/json": {"schema": schema_ref("ErrorBody")}},
        });
    }
    let mut op = json!({
        "operationId": id,
        "summary": summary,
        "parameters": parameters,
        "responses": responses,
    });
    if let Some(b) = body {
        op["requestBody"] = b;
    }
    if access == Access::Open {
        op["security"] = json!([]);
    }
    op
}
