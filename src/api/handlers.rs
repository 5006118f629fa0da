//! One function per endpoint: parse and validate, hand one command to [`Control`], reply.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::{oneshot, RwLock};

use super::error::ApiError;
use crate::daemon::control::{Control, ControlError, ModuleRequest, ModuleView, ReloadReport};
use crate::daemon::logs;
use crate::module::AdminCommand;
use crate::replication::status::VerifyReport;

/// How long a command waits for the module's answer.
pub const COMMAND_REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `POST /api/v1/modules/{m}/verify` waits for the report: it reads both copies.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long `POST /api/v1/reload` waits for the daemon's report.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines returned by the log endpoint when `n` is not given.
pub const LOG_LINES_DEFAULT: usize = 100;
/// Most lines the log endpoint returns.
pub const LOG_LINES_MAX: usize = 100_000;
/// The commands of `POST /api/v1/modules/{m}/{command}`.
pub const COMMANDS: [&str; 6] = ["start", "stop", "restart", "swap", "prim", "second"];

/// What every handler sees.
#[derive(Clone)]
pub(super) struct AppState {
    pub control: Arc<RwLock<Control>>,
    /// Required on requests that change state (TCP listener); `None` on the Unix socket.
    pub token: Option<Arc<str>>,
    /// Where the token is, for the error message.
    pub token_hint: Arc<str>,
}

/// Requests other than GET and HEAD need the token when one is set.
pub(super) async fn require_token(State(app): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &app.token {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer);
            if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
                return ApiError::Unauthorized(app.token_hint.to_string()).into_response();
            }
        }
    }
    next.run(req).await
}

/// The token of an `Authorization: Bearer <token>` header value.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Compares without stopping at the first difference, so timing does not leak the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) async fn list(State(app): State<AppState>) -> Json<Vec<ModuleView>> {
    Json(app.control.read().await.list())
}

pub(super) async fn get_module(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ModuleView>, ApiError> {
    let Path(name) = path.map_err(bad_path)?;
    let view = app.control.read().await.get(&name);
    view.map(Json).ok_or(ApiError::Control(ControlError::UnknownModule(name)))
}

pub(super) async fn command(
    State(app): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path((name, command)) = path.map_err(bad_path)?;
    let body = body.map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
    let command = parse_command(&command, &body)?;
    // Take the module's channel and let go of the lock before waiting: a slow module must
    // not hold up reloads or other modules' requests.
    let sender = app.control.read().await.running(&name)?.commands.clone();
    let command_name = command.name();
    let exchange = async {
        let (reply, answer) = oneshot::channel();
        sender.send(ModuleRequest { command, reply }).await.map_err(|_| ControlError::Gone(name.clone()))?;
        answer.await.map_err(|_| ControlError::Gone(name.clone()))?.map_err(ControlError::from)
    };
    match tokio::time::timeout(COMMAND_REPLY_TIMEOUT, exchange).await {
        Ok(Ok(())) => Ok(Json(serde_json::json!({ "ok": true }))),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ApiError::CommandTimeout {
            module: name,
            command: command_name,
            seconds: COMMAND_REPLY_TIMEOUT.as_secs(),
        }),
    }
}

/// Compares both copies of the module's data and answers the report. The lock on [`Control`]
/// is let go before waiting: a comparison takes minutes, and a reload queued behind it would
/// hold up every other request meanwhile.
pub(super) async fn verify(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<VerifyReport>, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoOptions {}
    let Path(name) = path.map_err(bad_path)?;
    let body = body.map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
    let NoOptions {} = parse_body(&body, "the body of verify must be empty or {}")?;
    let sender = app.control.read().await.running(&name)?.verify.clone();
    let sender = sender.ok_or_else(|| ControlError::NotReplicated(name.clone()))?;
    let exchange = async {
        let (reply, answer) = oneshot::channel();
        sender.send(reply).await.map_err(|_| ControlError::Gone(name.clone()))?;
        answer
            .await
            .map_err(|_| ControlError::Gone(name.clone()))?
            .map_err(|error| ControlError::Verify { name: name.clone(), error })
    };
    match tokio::time::timeout(VERIFY_TIMEOUT, exchange).await {
        Ok(report) => Ok(Json(report?)),
        Err(_) => Err(ApiError::VerifyTimeout { module: name, seconds: VERIFY_TIMEOUT.as_secs() }),
    }
}

/// The command named in the path, with its optional JSON body.
pub fn parse_command(command: &str, body: &[u8]) -> Result<AdminCommand, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoOptions {}
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PrimOptions {
        #[serde(default)]
        force: bool,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SecondOptions {
        #[serde(default)]
        full: bool,
    }
    let what = |expected: &str| format!("the body of {command} must be {expected}");
    Ok(match command {
        "start" | "stop" | "restart" | "swap" => {
            let NoOptions {} = parse_body(body, &what("empty or {}"))?;
            match command {
                "start" => AdminCommand::Start,
                "stop" => AdminCommand::Stop,
                "restart" => AdminCommand::Restart,
                _ => AdminCommand::Swap,
            }
        }
        "prim" => {
            let o: PrimOptions = parse_body(body, &what(r#"empty or {"force":true|false}"#))?;
            AdminCommand::Prim { force: o.force }
        }
        "second" => {
            let o: SecondOptions = parse_body(body, &what(r#"empty or {"full":true|false}"#))?;
            AdminCommand::Second { full: o.full }
        }
        other => {
            return Err(ApiError::NotFound(format!(
                "unknown command {other:?}: expected one of {}",
                COMMANDS.join(", ")
            )))
        }
    })
}

/// A JSON object of options; an empty body means every option at its default.
fn parse_body<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { body };
    let bad = |why: String| ApiError::BadRequest(format!("{what} ({why})"));
    // Only an object: serde would also fill a struct from an array.
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    if !value.is_object() {
        return Err(bad("a JSON object was expected".to_string()));
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogQuery {
    n: Option<usize>,
    user: Option<bool>,
}

pub(super) async fn log(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> Result<Json<Vec<String>>, ApiError> {
    let Path(name) = path.map_err(bad_path)?;
    let Query(query) = query.map_err(|e| {
        ApiError::BadRequest(format!("the log query takes n=<lines> and user=true|false ({})", e.body_text()))
    })?;
    let n = query.n.unwrap_or(LOG_LINES_DEFAULT);
    if n > LOG_LINES_MAX {
        return Err(ApiError::BadRequest(format!("n must be at most {LOG_LINES_MAX}, not {n}")));
    }
    let file = app.control.read().await.log_path(&name, query.user.unwrap_or(false))?;
    let shown = file.display().to_string();
    let lines = tokio::task::spawn_blocking(move || match logs::tail(&file, n) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        other => other,
    })
    .await
    .map_err(|_| ApiError::Internal(format!("reading {shown} failed")))?
    .map_err(|e| ApiError::Internal(format!("cannot read {shown}: {e}")))?;
    Ok(Json(lines))
}

pub(super) async fn reload(
    State(app): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReloadReport>, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoOptions {}
    let body = body.map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
    let NoOptions {} = parse_body(&body, "the body of reload must be empty or {}")?;
    let sender = app.control.read().await.reload.clone().ok_or(ApiError::ReloadUnavailable)?;
    let exchange = async {
        let (reply, answer) = oneshot::channel();
        sender.send(reply).await.map_err(|_| ApiError::ReloadUnavailable)?;
        answer.await.map_err(|_| ApiError::ReloadUnavailable)
    };
    match tokio::time::timeout(RELOAD_TIMEOUT, exchange).await {
        Ok(report) => Ok(Json(report?)),
        Err(_) => Err(ApiError::ReloadTimeout(RELOAD_TIMEOUT.as_secs())),
    }
}

/// `200 OK` when this node is primary for the module (ALONE or PRIM), `404` otherwise.
pub(super) async fn health(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = path.map_err(bad_path)?;
    let view = app.control.read().await.get(&name);
    let Some(view) = view else {
        return Err(ControlError::UnknownModule(name).into());
    };
    match view.status {
        Some(s) if s.state.is_primary() => {
            Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "OK\n").into_response())
        }
        Some(s) => Err(ApiError::NotPrimary { module: name, state: s.state.to_string() }),
        None => {
            Err(ApiError::NotFound(format!("module {name} is not running on this node because of its configuration")))
        }
    }
}

pub(super) async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("there is no endpoint {method} {}", uri.path()))
}

pub(super) async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{} does not accept {method}", uri.path()))
}

fn bad_path(e: PathRejection) -> ApiError {
    ApiError::BadRequest(format!("the request path is malformed ({})", e.body_text()))
}
