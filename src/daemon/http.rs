//! The daemon's HTTP API (axum): liveness, readiness, Prometheus metrics and a JSON status.
//! It binds to localhost unless told otherwise; endpoints that change state need the bearer
//! token from `PITR_HTTP_TOKEN` and are disabled when none is set.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::daemon::Daemon;

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/archive/rescan", post(rescan))
        .with_state(daemon)
}

async fn readyz(State(daemon): State<Arc<Daemon>>) -> Response {
    let checks = daemon.readiness().await;
    let ready = checks.values().all(|check| check == "ok");
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(json!({ "ready": ready, "checks": checks }))).into_response()
}

async fn metrics(State(daemon): State<Arc<Daemon>>) -> Response {
    daemon.archiver.update_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        daemon.metrics.encode(),
    )
        .into_response()
}

async fn status(State(daemon): State<Arc<Daemon>>) -> Json<serde_json::Value> {
    Json(json!({
        "repository": daemon.repository.url,
        "pgdata": daemon.settings.pgdata,
        "archive": daemon.archiver.update_gauges(),
        "prefetch": daemon.prefetcher.status(),
    }))
}

async fn rescan(State(daemon): State<Arc<Daemon>>, headers: HeaderMap) -> Response {
    if let Err(refusal) = authorize(&daemon, &headers) {
        return refusal.into_response();
    }
    daemon.archiver.scan();
    (StatusCode::ACCEPTED, "rescanning archive_status\n").into_response()
}

fn authorize(daemon: &Daemon, headers: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    let Some(expected) = &daemon.settings.http_token else {
        return Err((
            StatusCode::FORBIDDEN,
            "state-changing endpoints are disabled: set PITR_HTTP_TOKEN\n",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    // Compare in constant time so the token cannot be guessed byte by byte.
    let matches = given.is_some_and(|given| {
        given.len() == expected.len()
            && given
                .bytes()
                .zip(expected.bytes())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    });
    if matches {
        Ok(())
    } else {
        Err((
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required (Authorization: Bearer <PITR_HTTP_TOKEN>)\n",
        ))
    }
}

pub const READINESS_TIMEOUT: Duration = Duration::from_secs(5);
