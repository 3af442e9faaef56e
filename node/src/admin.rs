//! The admin HTTP server: `/metrics` (Prometheus text), `/health` (200 only when this node is a
//! member with a known leader, else 503), `/status` (JSON) and `/` (a small HTML status page).
//! It reads node state; it must never change it.

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::cluster::RaftView;

#[derive(Clone)]
struct AdminState {
    view: RaftView,
    prometheus: PrometheusHandle,
}

/// Serve the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    view: RaftView,
    prometheus: PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics_text))
        .route("/health", get(health))
        .route("/status", get(status))
        .with_state(AdminState { view, prometheus });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

pub async fn bind(addr: &str) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

async fn metrics_text(State(s): State<AdminState>) -> Response {
    s.prometheus.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.prometheus.render()).into_response()
}

async fn health(State(s): State<AdminState>) -> Response {
    let st = s.view.status();
    if st.healthy {
        (
            StatusCode::OK,
            format!("ok: member of a cluster led by {}\n", st.leader.map(|l| l.to_string()).unwrap_or_default()),
        )
            .into_response()
    } else {
        let why = match (st.role, st.leader) {
            (haven_proto::NodeRole::Uninitialized, _) => "not a member of an initialised cluster",
            (_, None) => "no known leader",
            _ => "not a member of the current configuration",
        };
        (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {why}\n")).into_response()
    }
}

async fn status(State(s): State<AdminState>) -> Json<haven_proto::NodeStatus> {
    Json(s.view.status())
}

async fn index(State(s): State<AdminState>) -> Html<String> {
    let st = s.view.status();
    let rows: String = st
        .members
        .iter()
        .map(|m| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                m.id,
                if m.voter { "voter" } else { "learner" },
                m.addr,
                if Some(m.id) == st.leader { "leader" } else { "" }
            )
        })
        .collect();
    Html(format!(
        "<!doctype html><title>Haven {id}</title><h1>Haven {id}</h1>\
         <p>role {role:?}, term {term}, leader {leader}, applied {applied}, healthy {healthy}</p>\
         <table border=1><tr><th>id</th><th>role</th><th>address</th><th></th></tr>{rows}</table>\
         <p><a href=/metrics>metrics</a> · <a href=/status>status JSON</a> · <a href=/health>health</a></p>",
        id = st.id,
        role = st.role,
        term = st.term,
        leader = st.leader.map(|l| l.to_string()).unwrap_or_else(|| "none".into()),
        applied = st.last_applied_index.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
        healthy = st.healthy,
    ))
}
