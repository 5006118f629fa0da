//! The API's errors, and the only place where an error becomes an HTTP status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::daemon::control::ControlError;

/// Why a request was not served. Every response carrying one has the body
/// `{"error":"<one sentence>"}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The request is malformed (body, query, path).
    #[error("{0}")]
    BadRequest(String),
    /// No such endpoint, command or resource (besides unknown modules).
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// A request that changes state came over TCP without the right token.
    #[error("this request needs the API token: send the header `Authorization: Bearer <token>` with the token of {0}")]
    Unauthorized(String),
    /// The module is installed and loaded but is not primary here (health check).
    #[error("module {module} is {state} on this node, not primary")]
    NotPrimary { module: String, state: String },
    #[error("module {module} did not answer the {command} command within {seconds} s; it may still apply it")]
    CommandTimeout { module: String, command: &'static str, seconds: u64 },
    #[error("the verify of module {module} did not finish within {seconds} s")]
    VerifyTimeout { module: String, seconds: u64 },
    #[error("this daemon cannot load or drop modules while it runs; restart it instead")]
    ReloadUnavailable,
    #[error("the daemon did not finish reloading within {0} s")]
    ReloadTimeout(u64),
    /// Something on this node failed (an unreadable log file, ...).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Control(ControlError::UnknownModule(_)) => StatusCode::NOT_FOUND,
            ApiError::Control(
                ControlError::Refused(_) | ControlError::NotReplicated(_) | ControlError::Verify { .. },
            ) => StatusCode::CONFLICT,
            ApiError::Control(ControlError::Broken { .. } | ControlError::Gone(_)) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) | ApiError::NotPrimary { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::CommandTimeout { .. } | ApiError::VerifyTimeout { .. } | ApiError::ReloadTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ApiError::ReloadUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.to_string() });
        let mut response = (self.status(), Json(body)).into_response();
        if let ApiError::Unauthorized(_) = self {
            response
                .headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        response
    }
}
