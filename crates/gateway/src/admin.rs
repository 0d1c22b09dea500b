//! The admin API: what is loaded, and reloading. Guarded by `[auth] admin_key`; without one it is
//! open only on a gateway without client keys.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::request_log::RequestRecord;
use crate::{AppState, Snapshot};

/// The key id the log line of a request made with the admin key shows (key ids cannot hold
/// parentheses, so no client key has it).
const ADMIN_KEY_ID: &str = "(admin)";

/// `GET /metrics`: OpenMetrics text (what prometheus-client writes and Prometheus scrapes); needs
/// the admin key when `[auth] protect_metrics`.
pub async fn metrics(
    State(state): State<AppState>,
    Extension(record): Extension<Arc<RequestRecord>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let snapshot = state.snapshot();
    if snapshot.protect_metrics {
        authorize(&snapshot, &headers, &record)?;
    }
    Ok((
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics().encode(),
    ))
}

/// `GET /admin/endpoints`: each endpoint's kind, URI, resolved version and hashes.
pub async fn endpoints(
    State(state): State<AppState>,
    Extension(record): Extension<Arc<RequestRecord>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let snapshot = state.snapshot();
    authorize(&snapshot, &headers, &record)?;
    Ok(Json(
        json!({"loaded_at": snapshot.loaded_at, "endpoints": snapshot.endpoint_infos}),
    ))
}

/// `POST /admin/reload`: re-read the config and re-resolve aliases. A broken config keeps the
/// running state and answers 400 with every reason.
pub async fn reload(
    State(state): State<AppState>,
    Extension(record): Extension<Arc<RequestRecord>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state.snapshot(), &headers, &record)?;
    match state.gateway().reload().await {
        Ok(reloaded) => Ok(Json(json!({
            "status": "reloaded",
            "endpoints": reloaded.endpoints,
            "warnings": reloaded.warnings,
        }))),
        Err(error) => {
            tracing::error!(%error, "reload failed; still serving the previous config");
            Err(ApiError::bad_request(
                format!("reload failed, still serving the previous config: {error}"),
                None,
            ))
        }
    }
}

/// Checks `Authorization: Bearer <admin key>` in constant time. Without an admin key the admin
/// API is open only on a gateway that is open anyway (no `[auth]` keys); a gateway with client
/// keys but no admin key keeps it closed.
fn authorize(
    snapshot: &Snapshot,
    headers: &HeaderMap,
    record: &RequestRecord,
) -> Result<(), ApiError> {
    let Some(expected) = &snapshot.admin_key else {
        if snapshot.keys.is_empty() {
            return Ok(());
        }
        return Err(ApiError::forbidden(
            "the admin API is closed: this gateway has [auth] keys but no [auth] admin_key",
        ));
    };
    let given = crate::auth::bearer_token(headers).unwrap_or("");
    // Digests have one length, so the comparison says nothing about the key's length either.
    let (given, expected) = (
        crate::auth::sha256(given.as_bytes()),
        crate::auth::sha256(expected.expose().as_bytes()),
    );
    if bool::from(given.ct_eq(&expected)) {
        record.update(|d| d.key_id = Some(ADMIN_KEY_ID.to_owned()));
        Ok(())
    } else {
        Err(ApiError::unauthorized(
            "the admin API needs `Authorization: Bearer <admin key>`",
        ))
    }
}
