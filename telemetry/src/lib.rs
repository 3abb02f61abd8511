#![forbid(unsafe_code)]
//! The one logging setup of every testbus daemon: human-readable lines on
//! stderr, `info` and up (`RUST_LOG` overrides), without the HTTP/2 and
//! tower internals that would drown them.
pub const DEFAULT_FILTER: &str = "info,h2=warn,tower=warn";

/// Installs the global subscriber; call once, first thing in `main`.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_FILTER.into()),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never into a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
