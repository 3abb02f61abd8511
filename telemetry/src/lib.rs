#![forbid(unsafe_code)]
//! The one logging setup of every testbus daemon: on stderr, `info` and up
//! (`RUST_LOG` overrides), without the HTTP/2 and tower internals that
//! would drown them; human-readable lines, or one JSON object per line
//! (`--log-format json`) for log collectors.
pub const DEFAULT_FILTER: &str = "info,h2=warn,tower=warn";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// For people: one line per event, colour only at a terminal.
    #[default]
    Text,
    /// One JSON object per event: `timestamp`, `level`, `target`,
    /// `message` and the event's fields (`host`, `process`, `test`, ...)
    /// at the top level, and the span it happened in.
    Json,
}

/// A `--log-format` that is not one of the two.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a log format: text or json")]
pub struct NotALogFormat(pub String);

impl std::str::FromStr for LogFormat {
    type Err = NotALogFormat;
    fn from_str(s: &str) -> Result<LogFormat, NotALogFormat> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(NotALogFormat(s.into())),
        }
    }
}

/// Installs the global subscriber; call once, first thing in `main`.
pub fn init_logging(format: LogFormat) {
    let filter = || tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_FILTER.into());
    match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            // Colour only for a person at a terminal, never into a log file.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .init(),
    }
}

/// Serves `registry` in Prometheus's text format at `http://ADDR/metrics`
/// (a daemon's `--metrics-listen`) until `stop`. Plain HTTP, for loopback
/// or a management network; the control plane serves its own metrics on
/// its API listeners instead.
pub async fn serve_metrics(
    addr: std::net::SocketAddr,
    registry: std::sync::Arc<prometheus_client::registry::Registry>,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let lis = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut out = String::new();
                // Writing to a String cannot fail.
                let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out)
            }
        }),
    );
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(lis, app).with_graceful_shutdown(stop.cancelled_owned()).await {
            tracing::warn!(error = %e, "the metrics listener failed");
        }
    }))
}
