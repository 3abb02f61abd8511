//! The agent's certificate: got once for a join token, kept in the data
//! dir (`tls/`: `ca.crt`, `agent.crt`, `agent.key` 0600), renewed at two
//! thirds of its life. The key is made here and never leaves: the control
//! plane signs a CSR.
//!
//! Ownership: [`Credentials::obtain`] returns the client's TLS settings;
//! [`Credentials::keep_renewed`] (a task the agent runs) replaces them in
//! place, so the client's next connection uses the new certificate.
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use testbus_client::{Client, Tls};
use testbus_pki::{Identity, JoinToken};
use tonic::Code;

/// How long joining is retried while the control plane cannot be reached.
const JOIN_LIMIT: Duration = Duration::from_secs(600);

pub struct Credentials {
    dir: PathBuf,
    pub tls: Tls,
    identity: Identity,
}

fn read(dir: &Path) -> anyhow::Result<Option<(String, String, String)>> {
    let get = |f: &str| std::fs::read_to_string(dir.join(f));
    match (get("ca.crt"), get("agent.crt"), get("agent.key")) {
        (Ok(ca), Ok(c), Ok(k)) => Ok(Some((ca, c, k))),
        (Err(e), _, _) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            Err(e).with_context(|| format!("reading {}", dir.display()))
        }
    }
}

fn identity(cert_pem: &str) -> anyhow::Result<Identity> {
    Ok(testbus_pki::identity_of_pem(cert_pem)?)
}

impl Credentials {
    /// The agent's credentials: those kept in `data_dir` while they are
    /// valid and name `host`, else new ones for `token`. None when there
    /// are neither (the agent then speaks plain to an insecure server or a
    /// local socket).
    pub async fn obtain(
        server: &str,
        host: &str,
        token: Option<&str>,
        take_over: TakeOver,
        data_dir: &Path,
    ) -> anyhow::Result<Option<Credentials>> {
        let dir = data_dir.join("tls");
        let token: Option<JoinToken> = token
            .map(|t| t.parse().map_err(|e: testbus_pki::NotAJoinToken| anyhow::anyhow!("--join-token: {e}")))
            .transpose()?;
        if let Some((ca, cert, key)) = read(&dir)? {
            let id = identity(&cert).context("tls/agent.crt")?;
            // A token for another CA (the control plane's CA was rotated)
            // means joining again.
            let same_ca = token.as_ref().is_none_or(|t| testbus_pki::fingerprint_pem(&ca).is_ok_and(|f| f == t.ca));
            let usable = id.name == host && id.not_after > SystemTime::now() && same_ca;
            if usable {
                let tls = Tls::new(testbus_pki::client_config(&ca, Some((&cert, &key)))?);
                return Ok(Some(Credentials { dir, tls, identity: id }));
            }
            if token.is_none() {
                bail!(
                    "the certificate in {} is for host {:?} and valid until {}: join again with --join-token \
                     (testbus-control-plane token create)",
                    dir.display(),
                    id.name,
                    testbus_proto::time::format(id.not_after)
                );
            }
        }
        let Some(token) = token else {
            if server.split(',').any(|s| s.trim().starts_with("https://") || s.trim().starts_with("unix+tls:")) {
                bail!(
                    "--server {server}: this agent has no certificate yet; give it --join-token (made by \
                     `testbus-control-plane token create`)"
                );
            }
            return Ok(None);
        };
        let (ca, cert, key) = join(server, host, &token, take_over).await?;
        write(&dir, &ca, &cert, &key)?;
        let id = identity(&cert)?;
        tracing::info!(host, until = %testbus_proto::time::format(id.not_after), "joined: got a certificate");
        let tls = Tls::new(testbus_pki::client_config(&ca, Some((&cert, &key)))?);
        Ok(Some(Credentials { dir, tls, identity: id }))
    }

    /// Renews the certificate at two thirds of its life, for ever; errors
    /// are retried (every minute at most) and logged once per attempt.
    pub async fn keep_renewed(mut self, client: Client, stop: tokio_util::sync::CancellationToken) {
        loop {
            let at = testbus_pki::renew_at(&self.identity);
            let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let mut backoff = Duration::from_secs(1);
            loop {
                match self.renew(&client).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!("renewing the certificate failed: {e:#}; retrying in {}s", backoff.as_secs());
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                    }
                }
            }
        }
    }

    async fn renew(&mut self, client: &Client) -> anyhow::Result<()> {
        let (csr, key) = testbus_pki::new_csr(&self.identity.name)?;
        let r = client.auth().renew(testbus_proto::RenewRequest { csr }).await?.into_inner();
        let id = identity(&r.certificate)?;
        write(&self.dir, &r.certificate_authority, &r.certificate, &key)?;
        self.tls.replace(testbus_pki::client_config(&r.certificate_authority, Some((&r.certificate, &key)))?);
        tracing::info!(until = %testbus_proto::time::format(id.not_after), "renewed the certificate");
        self.identity = id;
        Ok(())
    }
}

/// Key first, then the certificate: a crash between leaves a key without
/// its certificate, which `read` treats as a certificate that does not
/// match, never a certificate without its key.
fn write(dir: &Path, ca: &str, cert: &str, key: &str) -> anyhow::Result<()> {
    testbus_pki::write_private(&dir.join("agent.key"), key.as_bytes(), 0o600)?;
    testbus_pki::write_private(&dir.join("ca.crt"), ca.as_bytes(), 0o644)?;
    testbus_pki::write_private(&dir.join("agent.crt"), cert.as_bytes(), 0o644)?;
    Ok(())
}

/// Whether this agent takes its host name over from another agent that
/// holds its lease (`--take-over`), or is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeOver {
    Yes,
    No,
}

/// Asks the control plane at `server` for a certificate, checking that its
/// CA is the one the token names. Retried while it cannot be reached; a
/// refusal is final.
async fn join(
    server: &str,
    host: &str,
    token: &JoinToken,
    take_over: TakeOver,
) -> anyhow::Result<(String, String, String)> {
    let pinned = Tls::new(testbus_pki::pinned_client_config(&token.ca)?);
    let client = Client::lazy_with(server, Some(pinned)).map_err(|e| anyhow::anyhow!("--server: {e}"))?;
    let (csr, key) = testbus_pki::new_csr(host)?;
    let deadline = tokio::time::Instant::now() + JOIN_LIMIT;
    let mut backoff = Duration::from_millis(200);
    loop {
        let req = testbus_proto::JoinRequest {
            token: token.to_string(),
            host_name: host.into(),
            csr: csr.clone(),
            take_over: take_over == TakeOver::Yes,
        };
        match client.auth().join(req).await {
            Ok(r) => {
                let r = r.into_inner();
                if testbus_pki::fingerprint_pem(&r.certificate_authority)? != token.ca {
                    bail!("the control plane answered with another CA than the join token names");
                }
                return Ok((r.certificate_authority, r.certificate, key));
            }
            // The server's CA is not the token's: no retry will change that.
            Err(s) if testbus_client::cause(&s).contains("join token") => {
                bail!("joining {server}: {}", testbus_client::cause(&s))
            }
            Err(s) if s.code() == Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tracing::warn!(
                    "joining {server}: {}; retrying in {:.1}s",
                    testbus_client::cause(&s),
                    backoff.as_secs_f64()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(s) => bail!("joining {server}: {}", s.message()),
        }
    }
}
