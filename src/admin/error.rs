//! Admin API errors: `{"error":{"code","message"}}` with the right status.

use crate::store::StoreError;
use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("authentication required: send `Authorization: Bearer <token>`")]
    Unauthenticated,
    #[error("invalid or expired token")]
    BadToken,
    #[error("wrong username or password")]
    BadLogin,
    #[error("too many attempts; retry in {0} s")]
    Throttled(u64),
    #[error("admin role required")]
    Forbidden,
    /// Not allowed, with the reason (a user's ceilings, an admin's lock).
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// A field out of bounds; the message names it.
    #[error("{0}")]
    InvalidField(String),
    #[error("{0}")]
    Conflict(String),
    /// A dependency is down (cluster mode: Postgres for the cluster's log).
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated | Self::BadToken | Self::BadLogin => StatusCode::UNAUTHORIZED,
            Self::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Forbidden | Self::Denied(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Invalid(_) | Self::InvalidField(_) => StatusCode::BAD_REQUEST,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::BadToken => "invalid_token",
            Self::BadLogin => "invalid_credentials",
            Self::Throttled(_) => "too_many_attempts",
            Self::Forbidden | Self::Denied(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::Invalid(_) => "invalid_request",
            Self::InvalidField(_) => "invalid_field",
            Self::Conflict(_) => "conflict",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => ApiError::NotFound(m),
            StoreError::Invalid(m) => ApiError::Invalid(m),
            StoreError::Field(m) => ApiError::InvalidField(m),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::Denied(m) => ApiError::Denied(m),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "Admin API internal error.");
        }
        let mut resp = (
            self.status(),
            Json(json!({"error": {"code": self.code(), "message": self.to_string()}})),
        )
            .into_response();
        if let ApiError::Throttled(secs) = self
            && let Ok(v) = secs.to_string().parse()
        {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
        }
        resp
    }
}
