//! The admin HTTP API and the health-check URL (DESIGN.md, "HTTP").
//!
//! Two listeners serve the same routes: the Unix socket `<state>/hamirror.sock` (mode 0600,
//! so root only, no token) and, when asked, a TCP port where every request that changes
//! state needs `Authorization: Bearer <token>` (the token lives in `<home>/api.token`);
//! GETs, including `/health/<m>`, are open. This layer only parses, validates and maps
//! errors to status codes; every decision is taken by the module's supervisor.
//!
//! | Endpoint | Answer |
//! |---|---|
//! | `GET /api/v1/modules` | `[ModuleView]` |
//! | `GET /api/v1/modules/{m}` | `ModuleView`, 404 |
//! | `POST /api/v1/modules/{m}/{command}` | `{"ok":true}`; 400 bad body, 404, 409 refused, 503 broken |
//! | `POST /api/v1/modules/{m}/verify` | `VerifyReport` (waits up to an hour); 404, 409 not replicated or failed, 503 |
//! | `GET /api/v1/modules/{m}/log?n=100&user=false` | `["line", ...]` |
//! | `POST /api/v1/reload` | `ReloadReport` |
//! | `GET /health/{m}` | `OK\n` when ALONE or PRIM, else 404 |
//!
//! Every error body is `{"error":"<one sentence>"}`.

pub mod error;
mod handlers;

pub use error::ApiError;
pub use handlers::{parse_command, COMMANDS, LOG_LINES_DEFAULT, LOG_LINES_MAX, VERIFY_TIMEOUT};

use std::future::{Future, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use tokio::sync::{watch, RwLock};

use crate::daemon::control::Control;
use crate::paths::Paths;
use handlers::AppState;

/// Random bytes in a generated API token (written as hex).
pub const TOKEN_BYTES: usize = 32;

/// The routes, served to one listener. With `token`, every request but GET and HEAD must
/// carry it as a bearer token.
pub fn router(control: Arc<RwLock<Control>>, token: Option<String>) -> Router {
    router_with_hint(control, token, "the daemon's api.token file")
}

fn router_with_hint(control: Arc<RwLock<Control>>, token: Option<String>, hint: &str) -> Router {
    let state = AppState { control, token: token.map(Arc::from), token_hint: Arc::from(hint) };
    Router::new()
        .route("/api/v1/modules", get(handlers::list))
        .route("/api/v1/modules/{m}", get(handlers::get_module))
        .route("/api/v1/modules/{m}/log", get(handlers::log))
        .route("/api/v1/modules/{m}/verify", post(handlers::verify))
        .route("/api/v1/modules/{m}/{command}", post(handlers::command))
        .route("/api/v1/reload", post(handlers::reload))
        .route("/health/{m}", get(handlers::health))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), handlers::require_token))
        .with_state(state)
}

/// Serves the API on the Unix socket `paths.socket()` and, with `tcp`, on that TCP address
/// (token from `paths.api_token()`, created if missing) until `shutdown` completes, then
/// lets the requests in progress finish and removes the socket file.
pub async fn serve(
    control: Arc<RwLock<Control>>,
    paths: &Paths,
    tcp: Option<SocketAddr>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let socket_path = paths.socket();
    let unix = bind_unix(&socket_path)?;
    let tcp = match tcp {
        None => None,
        Some(addr) => {
            let token = load_or_create_token(&paths.api_token())?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            Some((listener, token))
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        // An error means the sender is gone without a shutdown: stop as well.
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let unix_server =
        axum::serve(unix, router(control.clone(), None)).with_graceful_shutdown(stopped(stop_rx.clone())).into_future();
    let result = match tcp {
        None => unix_server.await,
        Some((listener, token)) => {
            let hint = paths.api_token().display().to_string();
            let tcp_server = axum::serve(listener, router_with_hint(control, Some(token), &hint))
                .with_graceful_shutdown(stopped(stop_rx))
                .into_future();
            tokio::try_join!(unix_server, tcp_server).map(|_| ())
        }
    };
    let _ = std::fs::remove_file(&socket_path);
    result
}

/// Binds the admin socket, mode 0600. A socket file left by a daemon that died is removed;
/// one that still answers means another daemon runs, which is an error.
fn bind_unix(path: &Path) -> io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let shown = path.display();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display())))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another hamirror daemon already answers on {shown}"),
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot remove the stale socket {shown}: {e}")))?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{shown} exists and is not a socket: move it away"),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("cannot inspect {shown}: {e}"))),
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {shown}: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot restrict {shown} to root: {e}")))?;
    Ok(listener)
}

/// The TCP token: read from `path`, or generated ([`TOKEN_BYTES`] random bytes as hex) and
/// written there with mode 0600 when the file is missing or empty.
pub fn load_or_create_token(path: &Path) -> io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let shown = path.display();
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("cannot read the API token {shown}: {e}"))),
    }
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    let token = hex::encode(bytes);
    let write = || -> io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(format!("{token}\n").as_bytes())?;
        f.sync_all()
    };
    write().map_err(|e| io::Error::new(e.kind(), format!("cannot write the API token {shown}: {e}")))?;
    Ok(token)
}
