//! Client authentication and per-key permissions.
//!
//! Clients send `Authorization: Bearer <key>` (as they do to Verda) or, from the vote page in a
//! browser, the `kleingate_key` cookie set by `/ui/login`. Keys are stored as SHA-256 digests only:
//! keys are random 256-bit tokens made by `kleingate keys new`, so a fast hash is enough (there is
//! no low-entropy password to stretch) and checking stays cheap on every request. A presented key is
//! hashed and compared against every stored digest in constant time, without stopping at a match,
//! so response timing tells nothing about how much of a digest matched or which entry did.
//!
//! Keys are never logged: the only thing that leaves this module is the key's configured *name*.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kleingate_protocol::Model;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{ApiError, ErrorCode};

pub const COOKIE: &str = "kleingate_key";

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// On by default as soon as any key is configured (here or in `keys_file`); `false` switches
    /// auth off for local use, `true` without keys refuses every request.
    pub enabled: Option<bool>,
    /// A TOML file with more `[[keys]]` entries, so keys can live in a Kubernetes Secret apart
    /// from the rest of the configuration. Re-read when it changes (checked every
    /// `reload_secs`), so keys are added and revoked without a restart; a file that does not
    /// load leaves the previous keys in force. Its presence turns auth on.
    pub keys_file: Option<String>,
    /// How often `keys_file` is checked for changes.
    #[serde(default = "default_reload_secs")]
    pub reload_secs: f64,
    pub keys: Vec<KeyConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: None,
            keys_file: None,
            reload_secs: default_reload_secs(),
            keys: Vec::new(),
        }
    }
}

fn default_reload_secs() -> f64 {
    10.0
}

impl AuthConfig {
    pub fn validate(&self) -> Result<(), String> {
        // The upper bound is checked with every other span of time in `Config::validate`.
        if self.reload_secs < 0.1 {
            return Err("auth.reload_secs must be at least 0.1 s".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Who this key belongs to: used for budgets, rate limits, experiment assignment and logs.
    pub name: String,
    /// Hex SHA-256 of the key (`kleingate keys hash`), never the key itself.
    pub sha256: String,
    /// Models this key may ask for; absent = all.
    #[serde(default)]
    pub models: Option<Vec<Model>>,
    /// Backends this key's requests may be routed to; absent = all.
    #[serde(default)]
    pub backends: Option<Vec<String>>,
    /// Whether this key may pick a backend with `X-Kleingate-Backend` (also subject to
    /// `routing.allow_backend_header`).
    #[serde(default)]
    pub backend_header: bool,
    /// May read experiment results and images and use the vote page (they show other clients'
    /// prompts and images). Feedback on a result needs only its result id.
    #[serde(default)]
    pub experiments: bool,
    /// May see operations detail: `last_error` and health messages in `/v1/backends` (they can
    /// name upstream addresses and file paths).
    #[serde(default)]
    pub operations: bool,
    /// Overrides `[admission]` for this key.
    #[serde(default)]
    pub requests_per_sec: Option<f64>,
    #[serde(default)]
    pub burst: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeyConfig>,
}

/// An authenticated client, put in the request's extensions by [`authenticate`].
#[derive(Clone, Debug)]
pub struct Principal {
    pub name: Arc<str>,
    models: Option<BTreeSet<Model>>,
    backends: Option<BTreeSet<String>>,
    pub backend_header: bool,
    pub experiments: bool,
    pub operations: bool,
    pub requests_per_sec: Option<f64>,
    pub burst: Option<u32>,
}

impl Principal {
    pub fn allows_model(&self, m: Model) -> bool {
        self.models.as_ref().is_none_or(|s| s.contains(&m))
    }

    pub fn allows_backend(&self, b: &str) -> bool {
        self.backends.as_ref().is_none_or(|s| s.contains(b))
    }

    /// The backends this key is limited to (sorted), `None` when it may use all.
    pub fn backend_scope(&self) -> Option<Vec<&str>> {
        self.backends
            .as_ref()
            .map(|s| s.iter().map(String::as_str).collect())
    }

    /// Could this key join a variant: its model and backend, where it sets them, are allowed.
    pub fn allows_variant(&self, v: &crate::experiments::Variant) -> bool {
        v.model.is_none_or(|m| self.allows_model(m))
            && v.backend.as_ref().is_none_or(|b| self.allows_backend(b))
    }
}

type KeyTable = Vec<([u8; 32], Arc<Principal>)>;

/// The loaded key table, replaced whole when `keys_file` changes.
pub struct Auth {
    enabled: bool,
    cfg: AuthConfig,
    backend_names: Vec<String>,
    keys: std::sync::RwLock<Arc<KeyTable>>,
    file: std::sync::Mutex<FileState>,
}

/// What `keys_file` held, by content digest (`None`: missing): what is in force, and a new
/// version seen once and waiting for a second look (a file caught half-written is not loaded).
#[derive(Default)]
struct FileState {
    loaded: Option<[u8; 32]>,
    pending: Option<Option<[u8; 32]>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth.keys_file {path}: {message}")]
    File { path: String, message: String },
    #[error("auth key `{name}`: {message}")]
    Key { name: String, message: String },
}

pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new random key: 32 bytes from the OS generator, hex, with a prefix that makes leaked keys
/// easy to recognise in logs and secret scanners.
pub fn new_key() -> String {
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("kg_{hex}")
}

fn parse_digest(name: &str, s: &str) -> Result<[u8; 32], AuthError> {
    let bad = |m: &str| AuthError::Key {
        name: name.to_owned(),
        message: m.to_owned(),
    };
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(
            "sha256 must be 64 hex digits (the key's digest from `kleingate keys hash`, not the key)",
        ));
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .map_err(|_| bad("sha256 must be 64 hex digits"))?;
    }
    Ok(out)
}

impl Auth {
    pub fn from_config(cfg: &AuthConfig, backend_names: &[&str]) -> Result<Auth, AuthError> {
        let text = match &cfg.keys_file {
            Some(path) => Some(read_keys_file(path)?),
            None => None,
        };
        let keys = Self::load(cfg, backend_names, text.as_deref())?;
        Ok(Auth {
            enabled: cfg
                .enabled
                .unwrap_or(!keys.is_empty() || cfg.keys_file.is_some()),
            cfg: cfg.clone(),
            backend_names: backend_names.iter().map(|s| (*s).to_owned()).collect(),
            keys: std::sync::RwLock::new(Arc::new(keys)),
            file: std::sync::Mutex::new(FileState {
                loaded: text.map(|t| Sha256::digest(t.as_bytes()).into()),
                pending: None,
            }),
        })
    }

    /// Re-read `keys_file` and load it if its content changed and has stayed the same for two
    /// checks in a row: `Ok(Some(n))` with the number of keys now in force, `Ok(None)` when there
    /// is nothing new. On an error (missing, malformed) the previous keys stay.
    pub fn reload_if_changed(&self) -> Result<Option<usize>, AuthError> {
        let Some(path) = self.cfg.keys_file.as_deref() else {
            return Ok(None);
        };
        let text = read_keys_file(path);
        let digest: Option<[u8; 32]> = text
            .as_ref()
            .ok()
            .map(|t| Sha256::digest(t.as_bytes()).into());
        let mut st = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if digest == st.loaded {
            st.pending = None;
            return Ok(None);
        }
        if st.pending != Some(digest) {
            st.pending = Some(digest);
            return Ok(None);
        }
        // Remember this version even if it fails, so a broken file is reported once, not at
        // every check; the next change is tried again.
        st.loaded = digest;
        st.pending = None;
        let names: Vec<&str> = self.backend_names.iter().map(String::as_str).collect();
        let keys = Self::load(&self.cfg, &names, Some(&text?))?;
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        Ok(Some(n))
    }

    pub fn reload_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.cfg.reload_secs)
    }

    /// The key table from the config's keys and `file_text`, the keys file's content.
    fn load(
        cfg: &AuthConfig,
        backend_names: &[&str],
        file_text: Option<&str>,
    ) -> Result<KeyTable, AuthError> {
        let mut entries = cfg.keys.clone();
        if let (Some(path), Some(text)) = (&cfg.keys_file, file_text) {
            let f: KeysFile = toml::from_str(text).map_err(|e| AuthError::File {
                path: path.clone(),
                message: e.to_string(),
            })?;
            entries.extend(f.keys);
        }
        let mut keys = Vec::with_capacity(entries.len());
        let mut names = BTreeSet::new();
        for k in entries {
            let bad = |m: String| AuthError::Key {
                name: k.name.clone(),
                message: m,
            };
            if k.name.trim().is_empty() {
                return Err(bad("the name is empty".into()));
            }
            if !names.insert(k.name.clone()) {
                return Err(bad("two keys have this name".into()));
            }
            let digest = parse_digest(&k.name, &k.sha256)?;
            if keys.iter().any(|(d, _)| *d == digest) {
                return Err(bad("the same key digest is configured twice".into()));
            }
            if let Some(bs) = &k.backends {
                if let Some(b) = bs.iter().find(|b| !backend_names.contains(&b.as_str())) {
                    return Err(bad(format!(
                        "backends names `{b}`, which is not configured"
                    )));
                }
            }
            if k.requests_per_sec
                .is_some_and(|r| !(r > 0.0 && r.is_finite()))
            {
                return Err(bad("requests_per_sec must be a positive number".into()));
            }
            keys.push((
                digest,
                Arc::new(Principal {
                    name: Arc::from(k.name.as_str()),
                    models: k.models.map(|v| v.into_iter().collect()),
                    backends: k.backends.map(|v| v.into_iter().collect()),
                    backend_header: k.backend_header,
                    experiments: k.experiments,
                    operations: k.operations,
                    requests_per_sec: k.requests_per_sec,
                    burst: k.burst,
                }),
            ));
        }
        Ok(keys)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The principal whose key this is. Every stored digest is compared, in constant time each.
    pub fn check(&self, key: &str) -> Option<Arc<Principal>> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut found = None;
        for (d, p) in keys.iter() {
            if bool::from(d.ct_eq(&digest)) {
                found = Some(p.clone());
            }
        }
        found
    }
}

fn read_keys_file(path: &str) -> Result<String, AuthError> {
    std::fs::read_to_string(Path::new(path)).map_err(|e| AuthError::File {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Keep `keys_file` current: a changed file is loaded, a broken one logged and ignored.
pub async fn watch_keys_file(state: Arc<crate::AppState>) {
    if state.auth.cfg.keys_file.is_none() {
        return;
    }
    let every = state.auth.reload_interval();
    loop {
        tokio::time::sleep(every).await;
        let st = state.clone();
        match tokio::task::spawn_blocking(move || st.auth.reload_if_changed()).await {
            Ok(Ok(Some(n))) => tracing::info!(keys = n, "auth.keys_file reloaded"),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "auth.keys_file not reloaded; the previous keys stay in force")
            }
            Err(_) => {}
        }
    }
}

/// Where a request's key came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeySource {
    Bearer,
    /// The vote page's sign-in cookie, which a browser attaches to any request to this host.
    Cookie,
}

/// The key a request presents: the bearer token, else the vote page's cookie.
fn presented_key(headers: &HeaderMap) -> Option<(&str, KeySource)> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let (scheme, token) = v.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty())
            .map(|t| (t, KeySource::Bearer));
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == COOKIE)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
        .map(|v| (v, KeySource::Cookie))
}

/// May the sign-in cookie authenticate this API request? Only from this gateway's own pages:
/// a browser attaches the cookie to requests that any page, including another site's or a
/// sibling subdomain's, makes to this host. Browsers say where a request comes from in
/// `Sec-Fetch-Site` (or, older ones, in `Origin` on every POST); a request that changes something
/// must prove it is same-origin, a read with neither header (an image load in an old browser) is
/// let through.
fn cookie_allowed(req: &Request) -> bool {
    let text = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
    let read = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if let Some(site) = text("sec-fetch-site") {
        // `none`: typed into the address bar or opened from a bookmark; a navigation, never a POST.
        return site == "same-origin" || (read && site == "none");
    }
    if text("origin").is_some() {
        return !crate::headers::cross_site(req.headers());
    }
    read
}

/// A 401 with the bearer challenge, counted in `kleingate_rejected_total{reason="unauthorized"}`.
fn unauthorized(state: &crate::AppState, message: &str) -> Response {
    state
        .metrics
        .rejected
        .with_label_values(&["unauthorized"])
        .inc();
    let mut r = ApiError::new(ErrorCode::Unauthorized, message).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"kleingate\""),
    );
    r
}

/// Middleware: 401 without a valid key (when auth is on); otherwise the [`Principal`] goes into
/// the request's extensions for the rate limiter and the handlers.
pub async fn authenticate(
    State(state): State<Arc<crate::AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let auth = &state.auth;
    if !auth.enabled() {
        return next.run(req).await;
    }
    let presented = presented_key(req.headers());
    let path = req.uri().path();
    if presented.is_some_and(|(_, src)| src == KeySource::Cookie)
        && !path.starts_with("/ui/")
        && !cookie_allowed(&req)
    {
        return unauthorized(&state, "the sign-in cookie is accepted only from this gateway's own pages; send `Authorization: Bearer <key>`");
    }
    let principal = presented.map(|(k, _)| auth.check(k));
    if !matches!(principal, Some(Some(_)))
        && path.starts_with("/ui/")
        && req.method() == axum::http::Method::GET
    {
        // A person in a browser, without a key or with a stale one: to the sign-in form, and
        // back here afterwards.
        let next: String = url::form_urlencoded::byte_serialize(path.as_bytes()).collect();
        return axum::response::Redirect::to(&format!("/ui/login?next={next}")).into_response();
    }
    let Some(principal) = principal else {
        return unauthorized(
            &state,
            "an API key is required: send `Authorization: Bearer <key>`",
        );
    };
    match principal {
        Some(p) => {
            req.extensions_mut().insert(p.clone());
            let mut resp = next.run(req).await;
            // For the access log, which sits outside this layer: the key's name, never the key.
            resp.extensions_mut().insert(p);
            resp
        }
        None => unauthorized(&state, "the API key is not valid"),
    }
}

/// Route layer for experiment data (results, images, the vote page): with auth on, only keys
/// with `experiments = true`.
pub async fn require_experiments(
    State(state): State<Arc<crate::AppState>>,
    req: Request,
    next: Next,
) -> Response {
    match req.extensions().get::<Arc<Principal>>() {
        Some(p) if !p.experiments => {
            state
                .metrics
                .rejected
                .with_label_values(&["forbidden"])
                .inc();
            ApiError::new(
                ErrorCode::ExperimentsNotAllowed,
                format!(
                    "key `{}` may not read experiments (its experiments is false)",
                    p.name
                ),
            )
            .into_response()
        }
        _ => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, secret: &str) -> KeyConfig {
        KeyConfig {
            name: name.into(),
            sha256: hash_key(secret),
            models: None,
            backends: None,
            backend_header: false,
            experiments: false,
            operations: false,
            requests_per_sec: None,
            burst: None,
        }
    }

    #[test]
    fn finds_the_key_by_digest_and_refuses_others() {
        let cfg = AuthConfig {
            keys: vec![key("a", "secret-a"), key("b", "secret-b")],
            ..Default::default()
        };
        let auth = Auth::from_config(&cfg, &[]).expect("valid");
        assert!(auth.enabled());
        assert_eq!(&*auth.check("secret-b").expect("b").name, "b");
        assert_eq!(&*auth.check("secret-a").expect("a").name, "a");
        assert!(auth.check("secret-c").is_none());
        assert!(auth.check("").is_none());
    }

    #[test]
    fn off_without_keys_unless_forced_and_switchable() {
        assert!(!Auth::from_config(&AuthConfig::default(), &[])
            .expect("ok")
            .enabled());
        let forced = AuthConfig {
            enabled: Some(true),
            ..Default::default()
        };
        assert!(Auth::from_config(&forced, &[]).expect("ok").enabled());
        let off = AuthConfig {
            enabled: Some(false),
            keys: vec![key("a", "x")],
            ..Default::default()
        };
        assert!(!Auth::from_config(&off, &[]).expect("ok").enabled());
    }

    #[test]
    fn config_mistakes_are_errors() {
        let mut plain = key("a", "x");
        plain.sha256 = "x".into();
        let e = Auth::from_config(
            &AuthConfig {
                keys: vec![plain],
                ..Default::default()
            },
            &[],
        );
        assert!(e.err().expect("error").to_string().contains("64 hex"));
        let dup = AuthConfig {
            keys: vec![key("a", "x"), key("a", "y")],
            ..Default::default()
        };
        assert!(Auth::from_config(&dup, &[]).is_err());
        let mut unknown = key("a", "x");
        unknown.backends = Some(vec!["nope".into()]);
        let e = Auth::from_config(
            &AuthConfig {
                keys: vec![unknown],
                ..Default::default()
            },
            &["verda"],
        );
        assert!(e.err().expect("error").to_string().contains("nope"));
    }

    #[test]
    fn keys_from_a_file_join_those_in_the_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys.toml");
        std::fs::write(
            &path,
            format!(
                "[[keys]]\nname = \"worker\"\nsha256 = \"{}\"\nmodels = [\"flux2-klein-9b\"]\n",
                hash_key("from-file")
            ),
        )
        .expect("write");
        let cfg = AuthConfig {
            keys_file: Some(path.display().to_string()),
            keys: vec![key("a", "inline")],
            ..Default::default()
        };
        let auth = Auth::from_config(&cfg, &[]).expect("valid");
        let p = auth.check("from-file").expect("the file's key");
        assert_eq!(&*p.name, "worker");
        assert!(p.allows_model(Model::Klein9b) && !p.allows_model(Model::Klein4b));
        assert!(auth.check("inline").is_some());
        let missing = AuthConfig {
            keys_file: Some(dir.path().join("nope.toml").display().to_string()),
            ..Default::default()
        };
        let e = Auth::from_config(&missing, &[]).err().expect("error");
        assert!(e.to_string().contains("nope.toml"), "{e}");
    }

    #[test]
    fn bearer_or_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; kleingate_key=k2"),
        );
        assert_eq!(presented_key(&h), Some(("k2", KeySource::Cookie)));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k1"));
        assert_eq!(presented_key(&h), Some(("k1", KeySource::Bearer)));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic k1"));
        assert_eq!(presented_key(&h), None);
    }

    #[test]
    fn new_keys_are_random_and_hash_to_64_hex() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        assert!(a.starts_with("kg_") && a.len() == 67);
        assert_eq!(hash_key(&a).len(), 64);
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
