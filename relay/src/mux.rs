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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_stalled_stream_does_not_stall_the_others_and_half_close_works() {
        let (a, b) = tokio::io::duplex(64 << 10);
        let (client_in, _) = mpsc::channel(8);
        let (opener, _t1) = start(a, yamux::Mode::Client, client_in);
        let (server_in, mut accepted) = mpsc::channel(8);
        let (_o2, _t2) = start(b, yamux::Mode::Server, server_in);

        // Stream 1: the far side never reads it; its writer fills the
        // stream's window and waits.
        let mut slow = opener.open().await.unwrap();
        let flood = tokio::spawn(async move {
            let chunk = vec![1u8; 64 << 10];
            for _ in 0..64 {
                if slow.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let _slow_far = accepted.recv().await.unwrap();

        // Stream 2 still carries 1 MiB both ways, and its half-close
        // reaches the far side as EOF while the other direction goes on.
        // (yamux announces a stream with its first bytes.)
        let fast = opener.open().await.unwrap();
        let data = vec![7u8; 1 << 20];
        let d = data.clone();
        let near = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(fast);
            let send = async move {
                w.write_all(&d).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut back = Vec::new();
            let (_, n) = tokio::join!(send, r.read_to_end(&mut back));
            n.unwrap();
            back
        });
        let mut fast_far = tokio::time::timeout(Duration::from_secs(5), accepted.recv()).await.unwrap().unwrap();
        let echo = tokio::spawn(async move {
            let mut got = Vec::new();
            fast_far.read_to_end(&mut got).await.unwrap();
            fast_far.write_all(&got).await.unwrap();
            fast_far.shutdown().await.unwrap();
            got.len()
        });
        let done = tokio::time::timeout(Duration::from_secs(10), near)
            .await
            .expect("the fast stream is not held up by the stalled one")
            .unwrap();
        assert_eq!(echo.await.unwrap(), data.len());
        assert!(done == data);
        assert!(!flood.is_finished(), "the stalled stream's writer is held by flow control");
    }
}
