//! Credentials the control plane hands out: agents' certificates for join
//! tokens (and their renewals), the tokens themselves, revocations.
//!
//! Kept in the store, outside the registry (no watch sees them):
//! - `/auth/tokens/<id>`: a join token's secret as a SHA-256, its expiry
//!   and its pool (JSON). Never the secret itself.
//! - `/auth/revoked/<host>`: the time (unix seconds) before which every
//!   certificate of that host is refused.
//! - `/auth/ca`: the CA certificate the replicas on this store share (its
//!   key is never stored: see [`Pki::check_shared_ca`]).
use crate::api::ApiState;
use crate::authz::{self, Caller, Scope, Verb};
use crate::error::ApiError;
use crate::store::{Compare, Op};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use testbus_pki::{Ca, JoinToken, Role};
use testbus_proto::{
    CreateTokenRequest, CreateTokenResponse, Credentials, JoinRequest, RenewRequest, RevokeRequest, RevokeResponse,
};
use tonic::{Request, Response, Status};

const TOKENS: &str = "/auth/tokens/";
/// Dashboard logins live apart from join tokens: a replica of an older
/// version, which knows no `role`, finds none of them where it looks for
/// join tokens, so it cannot take one as an unrestricted join token.
const VIEWER_TOKENS: &str = "/auth/viewer-tokens/";
const REVOKED: &str = "/auth/revoked/";
const SHARED_CA: &str = "/auth/ca";
/// Tokens kept at most (expired ones are dropped first).
const MAX_TOKENS: usize = 1000;

/// The CA and what the API needs to know of credentials.
pub struct Pki {
    /// None when the server was given a certificate of another CA without
    /// its key: it then cannot sign, and agents cannot join it.
    pub ca: Option<Ca>,
    /// The CA clients are verified against (PEM).
    pub client_ca: String,
    pub agent_ttl: Duration,
    /// Hosts whose certificates issued before a time are refused.
    revoked: RwLock<HashMap<String, SystemTime>>,
}

impl Pki {
    pub fn new(ca: Option<Ca>, client_ca: String, agent_ttl: Duration) -> Pki {
        Pki { ca, client_ca, agent_ttl, revoked: RwLock::default() }
    }

    /// Loads the revocations kept in the store; returns the revision they
    /// were read at.
    pub async fn load(&self, store: &dyn crate::store::Store) -> Result<u64, Status> {
        let (kvs, rev) = store.list(REVOKED).await.map_err(ApiError::from)?;
        for kv in &kvs {
            self.note_revocation(kv);
        }
        Ok(rev)
    }

    fn note_revocation(&self, kv: &crate::store::KeyValue) {
        let host = kv.key.trim_start_matches(REVOKED).to_string();
        // Unreadable: everything of that host is refused.
        let secs: u64 = String::from_utf8_lossy(&kv.value).parse().unwrap_or(u64::MAX / 4);
        self.revoked.write().insert(host, UNIX_EPOCH + Duration::from_secs(secs));
    }

    /// With replicas on one store: follows the revocations the others
    /// write, so that one revoked anywhere is refused everywhere within
    /// moments. Ends with `stop`; a broken watch lists again after a
    /// second.
    pub async fn follow_revocations(
        self: Arc<Self>,
        store: Arc<dyn crate::store::Store>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        use futures::StreamExt;
        loop {
            let watched = async {
                let rev = self.load(store.as_ref()).await.map_err(|s| s.message().to_string())?;
                let mut events = store.watch(REVOKED, rev).await.map_err(|e| e.to_string())?;
                while let Some(ev) = events.next().await {
                    match ev.map_err(|e| e.to_string())? {
                        crate::store::Event::Put(kv) => self.note_revocation(&kv),
                        crate::store::Event::Delete(_) => {}
                    }
                }
                Ok::<(), String>(())
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                r = watched => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "following revocations; again in 1s");
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Replicas on one store share one CA, and each holds its key in its
    /// own data dir: the first replica records its CA certificate in the
    /// store, and a replica with another CA refuses to start. The key is
    /// kept out of the store on purpose: whoever can read etcd (its
    /// backups, its operators) could otherwise sign themselves an admin,
    /// and encrypting it would need a key that must itself be copied to
    /// every replica; copying `pki/ca.key` once is the same effort with one
    /// secret fewer in circulation.
    pub async fn check_shared_ca(&self, st: &ApiState) -> anyhow::Result<()> {
        let ours = self.ca.as_ref().map(|c| c.cert_pem().to_string()).unwrap_or_else(|| self.client_ca.clone());
        let created = st
            .store
            .txn(vec![Compare::ModRevision(SHARED_CA.into(), 0)], vec![Op::Put(SHARED_CA.into(), ours.clone().into())])
            .await?;
        if created.succeeded {
            return Ok(());
        }
        let theirs = st.store.get(SHARED_CA).await?.map(|kv| kv.value).unwrap_or_default();
        if theirs != ours.as_bytes() {
            anyhow::bail!(
                "the other replicas on this store use another CA: copy pki/ca.crt and pki/ca.key from the data \
                 dir of a replica into this one's (or give the same --tls-cert, --tls-key and --client-ca) \
                 before starting it"
            );
        }
        Ok(())
    }

    fn revoked_since(&self, host: &str) -> Option<SystemTime> {
        self.revoked.read().get(host).copied()
    }
}

/// The one gate of every handler: who calls (a revoked certificate is
/// refused here), and whether they may `verb` objects of `kind`.
pub fn authorize<T>(pki: Option<&Pki>, req: &Request<T>, verb: Verb, kind: &str) -> Result<Scope, Status> {
    authorize_caller(pki, &Caller::of(req), verb, kind)
}

/// [`authorize`], for a caller already known (plain HTTP requests).
pub fn authorize_caller(pki: Option<&Pki>, caller: &Caller, verb: Verb, kind: &str) -> Result<Scope, Status> {
    if let (Caller::Certified { name, issued, .. }, Some(pki)) = (caller, pki) {
        // Certificates say when they were issued to the second: one
        // issued in the second of the revocation is refused too.
        if pki.revoked_since(name).is_some_and(|since| *issued <= since) {
            return Err(ApiError::PermissionDenied(format!(
                "{}: this certificate was revoked; join again with a new token",
                caller.describe()
            ))
            .into());
        }
    }
    authz::admit(caller, verb, kind)
}

impl ApiState {
    pub fn authorize<T>(&self, req: &Request<T>, verb: Verb, kind: &str) -> Result<Scope, Status> {
        authorize(self.pki.as_deref(), req, verb, kind)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredToken {
    hash: String,
    expires: u64,
    #[serde(default)]
    pool: String,
    #[serde(default)]
    host: String,
    /// "viewer": a dashboard login, never a join. Empty: an agent's.
    #[serde(default)]
    role: String,
}

/// The role of a token that logs a browser in to the dashboard.
pub const VIEWER_TOKEN: &str = "viewer";

/// The stored token `text` names under `prefix`, if its secret is right
/// and it is live.
async fn live_token(st: &ApiState, ca: &Ca, prefix: &str, text: &str) -> Result<StoredToken, Status> {
    let bad = |m: String| Status::from(ApiError::Unauthenticated(format!("token: {m}")));
    let token: JoinToken = text.parse().map_err(|e: String| Status::invalid_argument(format!("token: {e}")))?;
    if token.ca != ca.fingerprint() {
        return Err(bad("it names another CA than this control plane's".into()));
    }
    let kv = st.store.get(&format!("{prefix}{}", token.id)).await.map_err(ApiError::from)?;
    match kv.and_then(|kv| serde_json::from_slice::<StoredToken>(&kv.value).ok()) {
        Some(s) if s.hash == token.secret_hash() && s.expires > unix_now() => Ok(s),
        _ => Err(bad("unknown, wrong or expired; create one with `testbus-control-plane token create`".into())),
    }
}

/// Whether `text` is a live viewer token (a dashboard login); the time it
/// expires (seconds since the epoch) if so.
pub async fn check_viewer_token(st: &ApiState, text: &str) -> Result<u64, Status> {
    let auth = AuthService::new(st.clone());
    let t = live_token(st, auth.ca()?, VIEWER_TOKENS, text).await.map_err(|e| match e.code() {
        tonic::Code::Unauthenticated => Status::from(ApiError::Unauthenticated(
            "token: not a live viewer token; create one with `testbus-control-plane token create --viewer`".into(),
        )),
        _ => e,
    })?;
    if t.role != VIEWER_TOKEN {
        return Err(ApiError::Unauthenticated("token: not a viewer token".into()).into());
    }
    Ok(t.expires)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[derive(Clone)]
pub struct AuthService {
    st: ApiState,
}

impl AuthService {
    pub fn new(st: ApiState) -> Self {
        AuthService { st }
    }

    fn pki(&self) -> Result<&Arc<Pki>, Status> {
        self.st.pki.as_ref().ok_or_else(|| Status::failed_precondition("this control plane serves without TLS"))
    }

    fn ca(&self) -> Result<&Ca, Status> {
        self.pki()?.ca.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this control plane was given a certificate without its CA's key: it cannot sign certificates",
            )
        })
    }

    fn credentials(&self, cert: String) -> Result<Credentials, Status> {
        Ok(Credentials { certificate: cert, certificate_authority: self.ca()?.cert_pem().to_string() })
    }

    async fn check_token(&self, text: &str, host: &str) -> Result<(), Status> {
        let bad = |m: String| Status::from(ApiError::Unauthenticated(format!("token: {m}")));
        let s = live_token(&self.st, self.ca()?, TOKENS, text).await?;
        if !s.role.is_empty() {
            return Err(bad(format!("it is a {} token: it logs in to the dashboard, it joins nothing", s.role)));
        }
        if !s.pool.is_empty() && !host.starts_with(&format!("{}-", s.pool)) {
            return Err(bad(format!("it is for guests of pool {:?} (hosts named {}-…)", s.pool, s.pool)));
        }
        if !s.host.is_empty() && s.host != host {
            return Err(bad(format!("it is for host {:?} only", s.host)));
        }
        Ok(())
    }

    async fn create_token(&self, r: CreateTokenRequest) -> Result<CreateTokenResponse, Status> {
        let ttl = testbus_proto::duration::parse(&r.ttl).map_err(|e| Status::invalid_argument(format!("ttl: {e}")))?;
        if !(Duration::from_secs(1)..=Duration::from_secs(7 * 86400)).contains(&ttl) {
            return Err(Status::invalid_argument(format!("ttl: {} is not between 1s and 7d", r.ttl)));
        }
        if !r.pool.is_empty() {
            testbus_proto::validate::dns_label(&r.pool).map_err(|e| Status::invalid_argument(format!("pool: {e}")))?;
        }
        if !r.host_name.is_empty() {
            testbus_proto::validate::dns_label(&r.host_name)
                .map_err(|e| Status::invalid_argument(format!("hostName: {e}")))?;
        }
        let role = match r.role.as_str() {
            "" | "agent" => String::new(),
            VIEWER_TOKEN if r.pool.is_empty() && r.host_name.is_empty() => VIEWER_TOKEN.to_string(),
            VIEWER_TOKEN => return Err(Status::invalid_argument("role: a viewer token names no pool and no host")),
            other => return Err(Status::invalid_argument(format!("role: {other:?} is not \"agent\" or \"viewer\""))),
        };
        let token = JoinToken::new(&self.ca()?.fingerprint());
        let prefix = if role.is_empty() { TOKENS } else { VIEWER_TOKENS };
        // Expired tokens go first; a store full of live ones refuses more.
        let (kvs, _) = self.st.store.list(prefix).await.map_err(ApiError::from)?;
        let now = unix_now();
        let mut ops = Vec::new();
        let mut live = 0;
        for kv in &kvs {
            match serde_json::from_slice::<StoredToken>(&kv.value) {
                Ok(t) if t.expires > now => live += 1,
                _ => ops.push(Op::Delete(kv.key.clone())),
            }
        }
        if live >= MAX_TOKENS {
            return Err(Status::resource_exhausted(format!(
                "{live} tokens of this kind are live; at most {MAX_TOKENS} (they expire by themselves)"
            )));
        }
        let expires = now + ttl.as_secs();
        let stored = StoredToken { hash: token.secret_hash(), expires, pool: r.pool, host: r.host_name, role };
        ops.push(Op::Put(format!("{prefix}{}", token.id), serde_json::to_vec(&stored).unwrap_or_default()));
        self.st.store.txn(vec![], ops).await.map_err(ApiError::from)?;
        Ok(CreateTokenResponse {
            token: token.to_string(),
            expires: testbus_proto::time::format(UNIX_EPOCH + Duration::from_secs(expires)),
        })
    }
}

#[tonic::async_trait]
impl testbus_proto::auth_server::Auth for AuthService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<Credentials>, Status> {
        self.st.authorize(&req, Verb::Join, "certificate")?;
        let r = req.into_inner();
        testbus_proto::validate::dns_label(&r.host_name)
            .map_err(|e| Status::invalid_argument(format!("hostName: {e}")))?;
        self.check_token(&r.token, &r.host_name).await?;
        let pki = self.pki()?;
        let cert = self
            .ca()?
            .sign_csr(&r.csr, &r.host_name, Role::Agent, pki.agent_ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(host = %r.host_name, "an agent joined");
        Ok(Response::new(self.credentials(cert)?))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<Credentials>, Status> {
        self.st.authorize(&req, Verb::Renew, "certificate")?;
        let Some(host) = Caller::of(&req).agent().map(str::to_string) else {
            return Err(Status::failed_precondition("only agents renew certificates here"));
        };
        let cert = self
            .ca()?
            .sign_csr(&req.get_ref().csr, &host, Role::Agent, self.pki()?.agent_ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(self.credentials(cert)?))
    }

    async fn create_token(&self, req: Request<CreateTokenRequest>) -> Result<Response<CreateTokenResponse>, Status> {
        self.st.authorize(&req, Verb::CreateToken, "tokens")?;
        self.create_token(req.into_inner()).await.map(Response::new)
    }

    async fn revoke(&self, req: Request<RevokeRequest>) -> Result<Response<RevokeResponse>, Status> {
        self.st.authorize(&req, Verb::Revoke, "certificates")?;
        let host = req.into_inner().host_name;
        testbus_proto::validate::dns_label(&host).map_err(|e| Status::invalid_argument(format!("hostName: {e}")))?;
        let now = unix_now();
        let op = Op::Put(format!("{REVOKED}{host}"), now.to_string().into_bytes());
        self.st.store.txn(vec![], vec![op]).await.map_err(ApiError::from)?;
        if let Some(pki) = &self.st.pki {
            pki.revoked.write().insert(host.clone(), UNIX_EPOCH + Duration::from_secs(now));
        }
        tracing::info!(%host, "certificates revoked");
        Ok(Response::new(RevokeResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_refuses_what_was_issued_before_it_only() {
        let (ca, _) = Ca::create().unwrap();
        let pki = Pki::new(None, ca.cert_pem().into(), Duration::from_secs(60));
        let id = |issued: SystemTime| Caller::Certified { name: "host-a".into(), role: Role::Agent, issued };
        let call = |c: Caller| {
            let mut req = Request::new(());
            req.extensions_mut().insert(c);
            authorize(Some(&pki), &req, Verb::Get, "Host")
        };
        let now = SystemTime::now();
        assert!(call(id(now)).is_ok());
        pki.revoked.write().insert("host-a".into(), now);
        let e = call(id(now - Duration::from_secs(5))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("revoked"), "{e:?}");
        assert!(call(id(now + Duration::from_secs(1))).is_ok(), "issued after the revocation");
    }
}
