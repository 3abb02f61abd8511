//! testbus-relay: joins a downstream endpoint, where clients connect, to an
//! upstream endpoint toward the control plane. This version carries each
//! client connection over its own upstream connection (tcp, unix, stdio);
//! multiplexed links over serial lines, vsock and SSH come with the relay's
//! own issue. The relay knows nothing of gRPC: it moves bytes, with
//! half-close, so TLS stays end to end.
#![forbid(unsafe_code)]

mod endpoint;

use anyhow::Context;
use clap::Parser;
use endpoint::Endpoint;
use tokio::io::{AsyncRead, AsyncWrite};

#[derive(Parser, Debug)]
#[command(name = "testbus-relay", version, about = "Carry client connections toward the control plane")]
struct Args {
    /// Where clients connect: tcp:HOST:PORT, unix:/PATH or stdio.
    #[arg(long)]
    downstream: Endpoint,
    /// Toward the control plane: tcp:HOST:PORT or unix:/PATH.
    #[arg(long)]
    upstream: Endpoint,
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn connect(ep: &Endpoint) -> anyhow::Result<Box<dyn Stream>> {
    Ok(match ep {
        Endpoint::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a).await.with_context(|| format!("connecting to {ep}"))?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
        Endpoint::Unix(p) => {
            Box::new(tokio::net::UnixStream::connect(p).await.with_context(|| format!("connecting to {ep}"))?)
        }
        Endpoint::Stdio => Box::new(tokio::io::join(tokio::io::stdin(), tokio::io::stdout())),
    })
}

/// Copies both ways until both sides have closed.
async fn join(mut client: Box<dyn Stream>, upstream: &Endpoint) {
    match connect(upstream).await {
        Ok(mut up) => {
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut up).await {
                tracing::debug!(error = %e, "connection ended");
            }
        }
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "upstream unreachable; dropping client"),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.upstream == Endpoint::Stdio && args.downstream == Endpoint::Stdio {
        anyhow::bail!("--downstream and --upstream cannot both be stdio");
    }
    match &args.downstream {
        Endpoint::Stdio => {
            join(connect(&Endpoint::Stdio).await?, &args.upstream).await;
            Ok(())
        }
        Endpoint::Tcp(a) => {
            let lis =
                tokio::net::TcpListener::bind(a).await.with_context(|| format!("--downstream {}", args.downstream))?;
            loop {
                let (s, _) = lis.accept().await?;
                s.set_nodelay(true)?;
                let up = args.upstream.clone();
                tokio::spawn(async move { join(Box::new(s), &up).await });
            }
        }
        Endpoint::Unix(p) => {
            let _ = std::fs::remove_file(p);
            let lis = tokio::net::UnixListener::bind(p).with_context(|| format!("--downstream {}", args.downstream))?;
            loop {
                let (s, _) = lis.accept().await?;
                let up = args.upstream.clone();
                tokio::spawn(async move { join(Box::new(s), &up).await });
            }
        }
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("testbus-relay: {e:#}");
        std::process::exit(1);
    }
}
