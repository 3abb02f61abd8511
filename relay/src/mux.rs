//! `MuxSession`: many client connections over one link, with yamux
//! (per-stream flow control and half-close, so one slow stream never stalls
//! the others). The yamux connection must be polled all the time to make
//! progress; one task owns it, accepts inbound streams and opens outbound
//! ones on request through an [`Opener`].
use futures::future::poll_fn;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// A stream of the session, as a tokio byte stream.
pub type MuxStream = Compat<yamux::Stream>;

type OpenRequest = oneshot::Sender<Result<MuxStream, yamux::ConnectionError>>;

/// Opens streams on a running session; cheap to clone.
#[derive(Clone)]
pub struct Opener {
    tx: mpsc::Sender<OpenRequest>,
}

impl Opener {
    pub async fn open(&self) -> std::io::Result<MuxStream> {
        let (tx, rx) = oneshot::channel();
        let gone = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the link is down");
        self.tx.send(tx).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?.map_err(|e| std::io::Error::other(e.to_string()))
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

fn config() -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_num_streams(1024);
    c
}

/// Runs a session over `io` until the link ends. Inbound streams go to
/// `inbound`; `Opener`s made from the returned handle open outbound ones.
pub fn start<T>(
    io: T,
    mode: yamux::Mode,
    inbound: mpsc::Sender<MuxStream>,
) -> (Opener, tokio::task::JoinHandle<Result<(), yamux::ConnectionError>>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<OpenRequest>(64);
    let task = tokio::spawn(async move {
        let mut conn = yamux::Connection::new(io.compat(), config(), mode);
        let mut waiting: Option<OpenRequest> = None;
        let mut requests_open = true;
        poll_fn(|cx| {
            // Outbound requests, one at a time.
            loop {
                if let Some(req) = waiting.take() {
                    match conn.poll_new_outbound(cx) {
                        Poll::Ready(r) => {
                            let _ = req.send(r.map(FuturesAsyncReadCompatExt::compat));
                            continue;
                        }
                        Poll::Pending => {
                            waiting = Some(req);
                            break;
                        }
                    }
                }
                if !requests_open {
                    break;
                }
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(req)) => waiting = Some(req),
                    Poll::Ready(None) => requests_open = false,
                    Poll::Pending => break,
                }
            }
            // Inbound streams, and the connection's own progress.
            loop {
                match conn.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(s))) => {
                        if inbound.try_send(s.compat()).is_err() {
                            tracing::warn!("too many streams waiting to be served; refusing one");
                        }
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    });
    (Opener { tx }, task)
}
