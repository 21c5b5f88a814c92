//! `/ui/experiments/{name}`: pairs of images from two variants for the same prompt and seed, side
//! by side, with buttons to vote. A vote sends thumbs up for the chosen image and thumbs down for
//! the other to `POST /v1/feedback`; the variant names are shown only after the vote, and which
//! side a variant lands on alternates between pairs, so a rater is not led by names or position.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{Html, IntoResponse, Response};

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

/// How many of the newest pairs the page shows.
const PAIRS: usize = 20;

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub async fn experiment_page(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    let Ok(Path(name)) = name else {
        return ApiError::not_found("no such experiment").into_response();
    };
    if !state.experiments.configs.contains_key(&name) {
        return ApiError::not_found(format!("no experiment `{name}`")).into_response();
    }
    let Some(store) = &state.experiments.store else {
        return ApiError::not_found("no experiments are configured").into_response();
    };
    let pairs = match store.pairs(&name, PAIRS).await {
        Ok(p) => p,
        Err(e) => {
            return ApiError::storage_failed("could not read the experiment", e).into_response()
        }
    };
    let exp = escape(&name);
    let mut body = String::new();
    if pairs.is_empty() {
        body.push_str("<p id=\"empty\">No pairs yet. Pairs appear for experiments with <code>shadow = true</code>.</p>");
    }
    for (i, p) in pairs.iter().enumerate() {
        let (l, r) = if i % 2 == 0 {
            (&p.left, &p.right)
        } else {
            (&p.right, &p.left)
        };
        let side = |(id, variant): &(String, String), other: &str, which: &str| {
            format!(
                "<figure><img src=\"/v1/experiments/{exp}/images/{id}\" alt=\"{which}\">\
                 <figcaption class=\"variant\" hidden>{v}</figcaption>\
                 <button class=\"vote\" data-win=\"{id}\" data-lose=\"{other}\">{which} is better</button></figure>",
                id = escape(id),
                v = escape(variant),
                other = escape(other),
            )
        };
        body.push_str(&format!(
            "<section class=\"pair\" data-pair=\"{i}\"><h2>{prompt}</h2><p>seed {seed}</p><div class=\"images\">{a}{b}</div><p class=\"status\"></p></section>",
            prompt = escape(&p.prompt),
            seed = p.seed.map_or("random".into(), |s| s.to_string()),
            a = side(l, &r.0, "Left"),
            b = side(r, &l.0, "Right"),
        ));
    }
    Html(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kleingate experiment {exp}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; }}
.images {{ display: flex; gap: 1rem; }}
figure {{ margin: 0; }}
img {{ max-width: 45vw; display: block; }}
.pair {{ border-bottom: 1px solid #ccc; padding: 1rem 0; }}
</style></head>
<body><h1>Experiment {exp}</h1>
{body}
<script>
document.querySelectorAll('button.vote').forEach(b => b.addEventListener('click', async () => {{
  const pair = b.closest('.pair');
  pair.querySelectorAll('button').forEach(x => x.disabled = true);
  const send = (id, thumbs) => fetch('/v1/feedback', {{method: 'POST',
    headers: {{'content-type': 'application/json'}},
    body: JSON.stringify({{request_id: id, thumbs}})}});
  const [w, l] = await Promise.all([send(b.dataset.win, 'up'), send(b.dataset.lose, 'down')]);
  pair.querySelector('.status').textContent = (w.ok && l.ok) ? 'Vote recorded' : 'Vote failed';
  pair.querySelectorAll('.variant').forEach(v => v.hidden = false);
}}));
</script></body></html>"#
    ))
    .into_response()
}

/// Where a login may send the browser afterwards: only back into the UI (no open redirect).
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with("/ui/")
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/_.-".contains(&b)) =>
        {
            n
        }
        _ => "/ui/login",
    }
}

/// `GET /ui/login?next=...`: a form for the API key, since a browser cannot send a bearer token
/// with `<img>` and page loads.
pub async fn login_page(axum::extract::RawQuery(q): axum::extract::RawQuery) -> Response {
    let next = q.as_deref().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "next")
            .map(|(_, v)| v.into_owned())
    });
    let next = escape(safe_next(next.as_deref()));
    Html(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kleingate: sign in</title></head>
<body><h1>kleingate</h1>
<form method="post" action="/ui/login">
<label>API key <input type="password" name="key" autocomplete="off" required></label>
<input type="hidden" name="next" value="{next}">
<button type="submit">Sign in</button>
</form></body></html>"#
    ))
    .into_response()
}

/// `POST /ui/login`: check the key and keep it in an HttpOnly, SameSite=Strict cookie (scripts
/// cannot read it; other sites cannot make the browser send it).
pub async fn login(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match crate::headers::read_body(body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    if crate::headers::cross_site(&headers) {
        return ApiError::new(
            ErrorCode::CrossSiteLogin,
            "sign in from this gateway's own page",
        )
        .into_response();
    }
    let mut key = None;
    let mut next = None;
    for (k, v) in url::form_urlencoded::parse(&body) {
        match &*k {
            "key" => key = Some(v.into_owned()),
            "next" => next = Some(v.into_owned()),
            _ => {}
        }
    }
    let target = safe_next(next.as_deref()).to_owned();
    let key = key.unwrap_or_default();
    if state.auth.enabled() && state.auth.check(key.trim()).is_none() {
        state
            .metrics
            .rejected
            .with_label_values(&["unauthorized"])
            .inc();
        return ApiError::new(ErrorCode::Unauthorized, "the API key is not valid").into_response();
    }
    let mut resp = axum::response::Redirect::to(&target).into_response();
    // Behind a TLS-terminating proxy the cookie is marked Secure, so it never travels in clear.
    let secure = headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    let cookie = format!(
        "{}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age=43200{}",
        crate::auth::COOKIE,
        key.trim(),
        if secure { "; Secure" } else { "" }
    );
    if let Ok(v) = axum::http::HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(axum::http::header::SET_COOKIE, v);
    }
    resp
}
