//! `hub serve --http ADDR`: the fleet dashboard (server-rendered pages, live through
//! Server-Sent Events) and its JSON API.
//!
//! Reading needs nothing; changing state (pause, halt, resume) needs the API token in
//! `keys/http.token`, as `Authorization: Bearer TOKEN` or the cookie `/login` sets.
//! `SameSite=Strict` keeps the cookie from other *sites*, but a site is the host without
//! its port: a page served on another port of the same host (an app behind the on-demand
//! proxy on 127.0.0.1:8080) was same-site, and its auto-submitting form halted a rollout.
//! So a request that carries the cookie and changes state must also come from this
//! dashboard's own origin (`Origin`, else `Referer`, naming the `Host` it was sent to),
//! and every answer forbids framing and foreign scripts ([`guard`]). Changes go through
//! the same code as `hub rollout`, then the running hub is told to reload, as the CLI
//! does.

use crate::home::{Home, WriteError};
use crate::inventory::Inventory;
use crate::rollout::{HoldChange, RolloutError};
use crate::store::Store;
use crate::view::{DevicePage, Filter, Snapshot, ViewError};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use futures::{Stream, StreamExt};
use proto::rollout::HoldKind;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often open pages are sent what changed.
const LIVE_EVERY: Duration = Duration::from_secs(1);
const COOKIE: &str = "unifleet_token";

struct Dashboard {
    home: Home,
    token: String,
    stop: CancellationToken,
    /// The newest snapshot for open pages: one task reads the home once a second while
    /// any page is open, however many there are.
    live: tokio::sync::watch::Receiver<Option<Arc<Snapshot>>>,
}

type Shared = Arc<Dashboard>;

/// Why the dashboard could not start.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    // getrandom's error is not always a std error (its `std` feature): named, not chained.
    #[error("making the dashboard's API token: {0}")]
    Random(getrandom::Error),
    #[error(transparent)]
    WriteToken(#[from] WriteError),
    #[error("reading the API token {}", path.display())]
    ReadToken {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the dashboard cannot listen on {addr} (--http)")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the dashboard's address")]
    Address(#[source] std::io::Error),
}

/// The API token, made (32 random bytes, hex, mode 0600) on first use.
pub fn token(home: &Home) -> Result<String, DashboardError> {
    let path = home.dir.join("keys/http.token");
    if !path.exists() {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(DashboardError::Random)?;
        crate::home::write_secret_text(&path, &hex::encode(bytes))?;
    }
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().to_string()),
        Err(source) => Err(DashboardError::ReadToken { path, source }),
    }
}

/// The inventory as `hub serve` last wrote it (the dashboard reads no inventory file for
/// its live pages).
pub type LiveInventory = tokio::sync::watch::Receiver<Arc<Inventory>>;

/// The dashboard's listener (`--http ADDR`).
pub async fn bind(addr: &str) -> Result<tokio::net::TcpListener, DashboardError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DashboardError::Bind {
            addr: addr.into(),
            source,
        })
}

/// Serves the dashboard on `listener` on the hub's cancellation tree.
pub fn start(
    listener: tokio::net::TcpListener,
    home: Home,
    inventory: LiveInventory,
    tasks: &net::tasks::Tasks,
) -> Result<(), DashboardError> {
    let (live_tx, live) = tokio::sync::watch::channel(None);
    let state = Arc::new(Dashboard {
        token: token(&home)?,
        home,
        stop: tasks.token().clone(),
        live,
    });
    let reader = state.clone();
    tasks.spawn(async move { refresh(reader, live_tx, inventory).await });
    tracing::info!(
        "dashboard on http://{}/ (API token in {})",
        listener.local_addr().map_err(DashboardError::Address)?,
        state.home.dir.join("keys/http.token").display()
    );
    let app = router(state);
    let stop = tasks.token().clone();
    tasks.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!("dashboard: {e}");
        }
    });
    Ok(())
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(devices_page))
        .route("/releases", get(releases_page))
        .route("/rollouts", get(rollouts_page))
        .route("/devices/:name", get(device_page))
        .route("/events", get(events))
        .route("/provenance/:digest", get(provenance))
        .route("/login", get(login_page).post(login))
        .route(
            "/rollouts/:app/:channel/:release/:action",
            post(rollout_form),
        )
        .route("/api/devices", get(api_devices))
        .route("/api/releases", get(api_releases))
        .route("/api/rollouts", get(api_rollouts))
        .route(
            "/api/rollouts/:app/:channel/:release/:action",
            post(rollout_api),
        )
        .route("/assets/:file", get(asset))
        .layer(axum::middleware::from_fn(guard))
        .with_state(state)
}

/// What every answer says about where it may be used: scripts, styles and connections
/// from this origin only, never in a frame, no content-type guessing.
const SECURITY_HEADERS: [(header::HeaderName, &str); 4] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::REFERRER_POLICY, "same-origin"),
];

/// Refuses a state-changing request that carries the sign-in cookie but comes from
/// another origin (see the module doc); adds [`SECURITY_HEADERS`] to every answer.
async fn guard(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let changes = !matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if changes && !from_own_origin(request.headers()) {
        tracing::warn!(
            "dashboard: refused a cross-origin {} {} (Origin {:?})",
            request.method(),
            request.uri().path(),
            request.headers().get(header::ORIGIN)
        );
        let refusal = "refused: this request carries the dashboard's sign-in cookie but \
                       comes from a page of another origin\n";
        return (StatusCode::FORBIDDEN, refusal).into_response();
    }
    let mut response = next.run(request).await;
    for (name, value) in SECURITY_HEADERS {
        response
            .headers_mut()
            .insert(name, header::HeaderValue::from_static(value));
    }
    response
}

/// Whether a state-changing request may be acted on: it carries no cookie (an API
/// client's `Authorization`, which no page of another origin can make a browser add, or
/// nothing: the handler answers 401), or `Origin` (else `Referer`) names the host it was
/// sent to.
fn from_own_origin(headers: &HeaderMap) -> bool {
    let cookie = headers.contains_key(header::COOKIE);
    if !cookie || headers.contains_key(header::AUTHORIZATION) {
        return true;
    }
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(host), Some(from)) = (
        text(header::HOST),
        text(header::ORIGIN).or_else(|| text(header::REFERER)),
    ) else {
        return false;
    };
    let rest = from
        .strip_prefix("http://")
        .or_else(|| from.strip_prefix("https://"));
    rest.is_some_and(|r| r == host || r.strip_prefix(host).is_some_and(|p| p.starts_with('/')))
}

/// A page or API answer that could not be made: 500 with the reason, logged.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error(transparent)]
    View(#[from] ViewError),
    #[error("reading the hub's home")]
    Read(#[from] tokio::task::JoinError),
}

impl IntoResponse for Failed {
    fn into_response(self) -> Response {
        let why = proto::Chain(&self);
        tracing::warn!("dashboard: {why}");
        (StatusCode::INTERNAL_SERVER_ERROR, format!("{why}\n")).into_response()
    }
}

/// Reads the home on a blocking thread (git2 and the inventory file). Untracked by the
/// tree on purpose: a read abandoned at shutdown changes nothing.
#[allow(clippy::disallowed_methods)]
async fn read<T: Send + 'static, E: Send + 'static>(
    d: &Shared,
    f: impl FnOnce(&Home) -> Result<T, E> + Send + 'static,
) -> Result<Result<T, E>, tokio::task::JoinError> {
    let home = d.home.clone();
    tokio::task::spawn_blocking(move || f(&home)).await
}

fn signed_in(d: &Dashboard, headers: &HeaderMap) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(&format!("{COOKIE}="))
                .map(str::to_string)
        });
    [bearer.map(str::to_string), cookie]
        .into_iter()
        .flatten()
        .any(|t| same(t.as_bytes(), d.token.as_bytes()))
}

/// Compares in time independent of where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn devices_page(
    State(d): State<Shared>,
    Query(filter): Query<Filter>,
) -> Result<Html<String>, Failed> {
    let s = read(&d, Snapshot::read).await??;
    Ok(Html(crate::pages::devices(&s, &filter).into_string()))
}

async fn releases_page(State(d): State<Shared>) -> Result<Html<String>, Failed> {
    let s = read(&d, Snapshot::read).await??;
    Ok(Html(crate::pages::releases(&s).into_string()))
}

/// A build log or SBOM a release's provenance names, by its digest (what the store
/// keeps under `provenance/`).
async fn provenance(
    State(d): State<Shared>,
    Path(digest): Path<String>,
) -> Result<Response, Failed> {
    let Ok(digest) = digest.parse::<proto::Digest>() else {
        return Ok((StatusCode::NOT_FOUND, "not a digest\n").into_response());
    };
    let path = crate::publish::provenance_path(&digest);
    let bytes = read(&d, move |h| h.store()?.read(&path).map_err(ViewError::from)).await??;
    Ok(match bytes.filter(|b| proto::Digest::of(b) == digest) {
        // SBOMs are JSON; build logs text.
        Some(b) if b.starts_with(b"{") => (
            [(header::CONTENT_TYPE, "application/vnd.cyclonedx+json")],
            b,
        )
            .into_response(),
        Some(b) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], b).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("no build log or SBOM {digest}\n"),
        )
            .into_response(),
    })
}

async fn rollouts_page(
    State(d): State<Shared>,
    headers: HeaderMap,
) -> Result<Html<String>, Failed> {
    let s = read(&d, Snapshot::read).await??;
    Ok(Html(
        crate::pages::rollouts(&s, signed_in(&d, &headers)).into_string(),
    ))
}

async fn device_page(
    State(d): State<Shared>,
    Path(name): Path<String>,
) -> Result<Response, Failed> {
    let n = name.clone();
    let page = read(&d, move |h| DevicePage::read(h, &n)).await??;
    Ok(match page {
        Some(p) => {
            Html(crate::pages::device(&d.home.config.fleet, &p).into_string()).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            format!("no device {name:?} in this fleet\n"),
        )
            .into_response(),
    })
}

/// Makes a snapshot every [`LIVE_EVERY`] while a page is open (the dashboard's own
/// receiver is not a page), for every open page at once: from the inventory the hub
/// publishes and a store kept open between snapshots (opening it, and reading the
/// inventory file, every second was most of a snapshot's work on a small fleet).
// A snapshot read abandoned at shutdown changes nothing: untracked on purpose.
#[allow(clippy::disallowed_methods)]
async fn refresh(
    d: Shared,
    tx: tokio::sync::watch::Sender<Option<Arc<Snapshot>>>,
    inventory: LiveInventory,
) {
    let mut store = None;
    loop {
        tokio::select! {
            _ = d.stop.cancelled() => return,
            _ = tokio::time::sleep(LIVE_EVERY) => {}
        }
        if tx.receiver_count() <= 1 {
            continue;
        }
        let (home, inv, kept) = (d.home.clone(), inventory.borrow().clone(), store.take());
        let made = tokio::task::spawn_blocking(move || snapshot(&home, kept, inv)).await;
        match made {
            Ok((kept, Ok(s))) => {
                store = kept;
                tx.send_replace(Some(Arc::new(s)));
            }
            Ok((kept, Err(e))) => {
                store = kept;
                tracing::debug!("dashboard: reading a snapshot: {}", proto::Chain(&e));
            }
            Err(e) => tracing::debug!("dashboard: reading a snapshot: {e}"),
        }
    }
}

/// A snapshot from `store` (opened if `None`) and `inventory`; the store is handed back
/// to be used again, unless it could not be opened or read.
fn snapshot(
    home: &Home,
    store: Option<Store>,
    inventory: Arc<Inventory>,
) -> (Option<Store>, Result<Snapshot, ViewError>) {
    let store = match store.map_or_else(|| home.store(), Ok) {
        Ok(s) => s,
        Err(e) => return (None, Err(e.into())),
    };
    match crate::rollout::Sources::with(home, store, inventory) {
        Ok(src) => {
            let s = Snapshot::of(&src, &home.config.fleet);
            (Some(src.store), s)
        }
        Err(e) => (None, Err(e.into())),
    }
}

/// The live fragments: the devices table (with the page's filter) and the rollouts
/// panel, each sent when it changed. Ends when the hub stops.
async fn events(
    State(d): State<Shared>,
    Query(filter): Query<Filter>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let signed_in = signed_in(&d, &headers);
    let start = (d.live.clone(), filter, String::new(), String::new());
    let stop = d.stop.clone();
    let stream = futures::stream::unfold(start, move |(mut live, filter, devices, rollouts)| {
        let stop = stop.clone();
        async move {
            tokio::select! {
                _ = stop.cancelled() => return None,
                changed = live.changed() => changed.ok()?,
            }
            let Some(s) = live.borrow_and_update().clone() else {
                return Some((vec![], (live, filter, devices, rollouts)));
            };
            let new_devices = crate::pages::devices_table(&s, &filter).into_string();
            let new_rollouts = crate::pages::rollouts_panel(&s, signed_in).into_string();
            let mut out = vec![];
            if new_devices != devices {
                out.push(Ok(Event::default().event("devices").data(&new_devices)));
            }
            if new_rollouts != rollouts {
                out.push(Ok(Event::default().event("rollouts").data(&new_rollouts)));
            }
            Some((out, (live, filter, new_devices, new_rollouts)))
        }
    })
    .flat_map(futures::stream::iter);
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn login_page(State(d): State<Shared>) -> Html<String> {
    Html(crate::pages::login(&d.home.config.fleet, false).into_string())
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(d): State<Shared>, Form(form): Form<LoginForm>) -> Response {
    if !same(form.token.trim().as_bytes(), d.token.as_bytes()) {
        let page = crate::pages::login(&d.home.config.fleet, true).into_string();
        return (StatusCode::UNAUTHORIZED, Html(page)).into_response();
    }
    let cookie = format!("{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict", d.token);
    ([(header::SET_COOKIE, cookie)], Redirect::to("/rollouts")).into_response()
}

/// The change a button or API call names.
fn change_of(action: &str) -> Option<HoldChange> {
    Some(match action {
        "pause" => HoldChange::Hold(HoldKind::Paused),
        "halt" => HoldChange::Hold(HoldKind::Halted),
        "resume" => HoldChange::Resume,
        _ => return None,
    })
}

/// Why a pause, halt or resume from the dashboard was not done.
#[derive(Debug, thiserror::Error)]
enum ChangeError {
    #[error("sign in (/login) or send Authorization: Bearer TOKEN (keys/http.token)")]
    NotSignedIn,
    #[error("unknown action {0:?}: pause, halt or resume")]
    UnknownAction(String),
    #[error(transparent)]
    Refused(#[from] RolloutError),
    #[error("reading the hub's home")]
    Read(#[from] tokio::task::JoinError),
}

impl IntoResponse for ChangeError {
    fn into_response(self) -> Response {
        let status = match self {
            ChangeError::NotSignedIn => StatusCode::UNAUTHORIZED,
            ChangeError::UnknownAction(_) => StatusCode::NOT_FOUND,
            ChangeError::Refused(_) | ChangeError::Read(_) => StatusCode::CONFLICT,
        };
        (status, format!("{}\n", proto::Chain(&self))).into_response()
    }
}

async fn change(
    d: &Shared,
    headers: &HeaderMap,
    (app, channel, release, action): (String, String, u64, String),
) -> Result<String, ChangeError> {
    if !signed_in(d, headers) {
        return Err(ChangeError::NotSignedIn);
    }
    let change = change_of(&action).ok_or_else(|| ChangeError::UnknownAction(action.clone()))?;
    let done = read(d, move |home| {
        let (key, list) = crate::rollout::operator_change(
            home,
            &app,
            &channel,
            Some(release),
            change,
            "from the dashboard",
        )?;
        crate::control::reload_trust(home, &mut |l| tracing::debug!("{l}"));
        Ok::<_, RolloutError>(format!(
            "{} release {} on {}: {action} (hold list version {})\n",
            key.app, key.release, key.channel, list.version
        ))
    })
    .await??;
    Ok(done)
}

async fn rollout_form(
    State(d): State<Shared>,
    headers: HeaderMap,
    Path(target): Path<(String, String, u64, String)>,
) -> Response {
    match change(&d, &headers, target).await {
        Ok(_) => Redirect::to("/rollouts").into_response(),
        Err(e) => e.into_response(),
    }
}

async fn rollout_api(
    State(d): State<Shared>,
    headers: HeaderMap,
    Path(target): Path<(String, String, u64, String)>,
) -> Response {
    match change(&d, &headers, target).await {
        Ok(done) => done.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn api_devices(State(d): State<Shared>) -> Result<Response, Failed> {
    let s = read(&d, Snapshot::read).await??;
    Ok(Json(s.devices).into_response())
}

async fn api_releases(State(d): State<Shared>) -> Result<Response, Failed> {
    let s = read(&d, Snapshot::read).await??;
    Ok(Json(s.releases).into_response())
}

async fn api_rollouts(State(d): State<Shared>) -> Result<Response, Failed> {
    let s = read(&d, Snapshot::read).await??;
    Ok(Json(s.rollouts).into_response())
}

/// The vendored scripts (htmx 2.0.11 and its SSE extension 2.2.4, BSD-0) and the style.
async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind): (&'static str, &str) = match file.as_str() {
        "htmx.min.js" => (
            include_str!("../assets/htmx-2.0.11.min.js"),
            "text/javascript",
        ),
        "sse.min.js" => (
            include_str!("../assets/htmx-ext-sse-2.2.4.min.js"),
            "text/javascript",
        ),
        "style.css" => (include_str!("../assets/style.css"), "text/css"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(name.clone(), value.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_cookie_from_another_port_is_refused_and_the_own_origin_passes() {
        let host = (header::HOST, "127.0.0.1:8081");
        let cookie = (header::COOKIE, "unifleet_token=t");
        let from = |o: &str| {
            from_own_origin(&headers(&[
                host.clone(),
                cookie.clone(),
                (header::ORIGIN, o),
            ]))
        };
        assert!(from("http://127.0.0.1:8081"));
        assert!(from("https://127.0.0.1:8081"));
        // Same site, another port: what SameSite=Strict let through.
        assert!(!from("http://127.0.0.1:8080"));
        assert!(!from("http://127.0.0.1:80811"));
        assert!(!from("null"));
        // No Origin: the Referer decides; neither: refused.
        let referer = |r: &str| {
            from_own_origin(&headers(&[
                host.clone(),
                cookie.clone(),
                (header::REFERER, r),
            ]))
        };
        assert!(referer("http://127.0.0.1:8081/rollouts"));
        assert!(!referer("http://127.0.0.1:8080/x"));
        assert!(!from_own_origin(&headers(&[host.clone(), cookie.clone()])));
        // No cookie (the handler answers 401), or an API client's token: not a forgery.
        assert!(from_own_origin(&headers(std::slice::from_ref(&host))));
        let api = [host, cookie, (header::AUTHORIZATION, "Bearer t")];
        assert!(from_own_origin(&headers(&api)));
    }
}
