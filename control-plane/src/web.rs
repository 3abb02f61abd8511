//! Plain HTTP served beside gRPC on the same listeners (axum routes merged
//! with tonic's): `/metrics` in Prometheus's text format. A caller is
//! admitted as for the API (`auth::authorize_caller`): a viewer's or an
//! admin's certificate, the local socket, or an `--insecure` listener.
use crate::api::ApiState;
use crate::authz::{Caller, Verb};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

pub fn routes(st: ApiState) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |req: axum::extract::Request| {
            let st = st.clone();
            async move { metrics(st, req).await }
        }),
    )
}

async fn metrics(st: ApiState, req: axum::extract::Request) -> Response {
    let caller = req.extensions().get::<Caller>().cloned().unwrap_or(Caller::Anonymous);
    if let Err(s) = crate::auth::authorize_caller(st.pki.as_deref(), &caller, Verb::Get, "metrics") {
        let code =
            if s.code() == tonic::Code::Unauthenticated { StatusCode::UNAUTHORIZED } else { StatusCode::FORBIDDEN };
        return (code, format!("{}\n", s.message())).into_response();
    }
    match st.metrics.render(st.store.as_ref()).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}
