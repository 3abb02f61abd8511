//! Credentials the control plane hands out: agents' certificates for join
//! tokens (and their renewals), the tokens themselves, revocations.
//!
//! Kept in the store, outside the registry (no watch sees them):
//! - `/auth/tokens/<id>`: a join token's secret as a SHA-256, its expiry
//!   and its pool (JSON). Never the secret itself.
//! - `/auth/revoked/<subject>`: the time (unix seconds) before which every
//!   certificate of that subject is refused; `host:NAME` for an agent,
//!   `user:NAME` for an admin or viewer (a bare name, from earlier
//!   versions, is a host's).
//! - `/auth/ca`: the CA certificate the replicas on this store share (its
//!   key is never stored: see [`Pki::check_shared_ca`]).
use crate::authz::{self, Caller, Scope, Target, Verb};
use crate::error::ApiError;
use crate::state::ApiState;
use crate::store::{Compare, Op};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use testbus_pki::{Ca, JoinToken, Role, Subject};
use testbus_proto::{
    CreateTokenRequest, CreateTokenResponse, Credentials, JoinRequest, RenewRequest, Resource, RevokeRequest,
    RevokeResponse,
};
use tonic::{Request, Response, Status};

const TOKENS: &str = "/auth/tokens/";
/// Dashboard logins live apart from join tokens: a replica of an older
/// version, which knows no `role`, finds none of them where it looks for
/// join tokens, so it cannot take one as an unrestricted join token.
const VIEWER_TOKENS: &str = "/auth/viewer-tokens/";
const REVOKED: &str = "/auth/revoked/";
const SHARED_CA: &str = "/auth/ca";
/// Tokens kept at most (expired ones are dropped first), of those for any
/// host or a pool's guests.
const MAX_TOKENS: usize = 1000;
/// The same, of those for one host each (one per host at a time: a pool
/// guest's, made at each clean).
const MAX_HOST_TOKENS: usize = 10_000;

/// The CA and what the API needs to know of credentials.
pub struct Pki {
    /// None when the server was given a certificate of another CA without
    /// its key: it then cannot sign, and agents cannot join it.
    pub ca: Option<Ca>,
    /// The CA clients are verified against (PEM).
    pub client_ca: String,
    pub agent_ttl: Duration,
    /// Hosts and users whose certificates issued before a time are
    /// refused; with the store revision of the revocation (join tokens
    /// made before it do not join that host again).
    revoked: RwLock<HashMap<Subject, (SystemTime, u64)>>,
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
        let subject = Subject::parse_stored(kv.key.trim_start_matches(REVOKED));
        // Unreadable: everything of that subject is refused.
        let secs: u64 = String::from_utf8_lossy(&kv.value).parse().unwrap_or(u64::MAX / 4);
        self.revoked.write().insert(subject, (UNIX_EPOCH + Duration::from_secs(secs), kv.mod_revision));
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

    fn revoked_since(&self, subject: &Subject) -> Option<SystemTime> {
        self.revoked.read().get(subject).map(|r| r.0)
    }

    /// The store revision `subject` was last revoked at.
    fn revoked_at_revision(&self, subject: &Subject) -> Option<u64> {
        self.revoked.read().get(subject).map(|r| r.1)
    }
}

/// The one gate of every handler: who calls (a revoked certificate is
/// refused here), and whether they may `verb` objects of `kind`.
pub fn authorize<T>(pki: Option<&Pki>, req: &Request<T>, verb: Verb, target: Target) -> Result<Scope, Status> {
    authorize_caller(pki, &Caller::of(req), verb, target)
}

/// [`authorize`], for a caller already known (plain HTTP requests).
pub fn authorize_caller(pki: Option<&Pki>, caller: &Caller, verb: Verb, target: Target) -> Result<Scope, Status> {
    if let (Caller::Certified { issued, .. }, Some(subject), Some(pki)) = (caller, caller.subject(), pki) {
        // Certificates say when they were issued to the second: one
        // issued in the second of the revocation is refused too.
        if pki.revoked_since(&subject).is_some_and(|since| *issued <= since) {
            return Err(ApiError::PermissionDenied(format!(
                "{}: this certificate was revoked; join again with a new token",
                caller.describe()
            ))
            .into());
        }
    }
    authz::admit(caller, verb, target)
}

impl ApiState {
    pub fn authorize<T>(&self, req: &Request<T>, verb: Verb, target: Target) -> Result<Scope, Status> {
        authorize(self.pki.as_deref(), req, verb, target)
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
    /// "viewer" or "admin": a dashboard login, never a join. Empty: an
    /// agent's.
    #[serde(default)]
    role: String,
    /// Joins left; None: unlimited.
    #[serde(default)]
    uses_left: Option<u32>,
}

/// A live token as stored: where, at which revision (a use is a
/// compare-and-swap on it), and made at which (a host revoked since then
/// does not join with it).
struct LiveToken {
    key: String,
    revision: u64,
    created: u64,
    token: StoredToken,
}

/// The role of a token that logs a browser in to the dashboard, to read.
pub const VIEWER_TOKEN: &str = "viewer";
/// The role of a token that logs a browser in to the dashboard with an
/// admin's rights (its Cancel and Rerun buttons).
pub const ADMIN_TOKEN: &str = "admin";

/// The stored token `text` names under `prefix`, if its secret is right
/// and it is live.
async fn live_token(st: &ApiState, ca: &Ca, prefix: &str, text: &str) -> Result<LiveToken, Status> {
    let bad = |m: String| Status::from(ApiError::Unauthenticated(format!("token: {m}")));
    let token: JoinToken =
        text.parse().map_err(|e: testbus_pki::NotAJoinToken| Status::invalid_argument(format!("token: {e}")))?;
    if token.ca != ca.fingerprint() {
        return Err(bad("it names another CA than this control plane's".into()));
    }
    let key = format!("{prefix}{}", token.id);
    let kv = st.store.get(&key).await.map_err(ApiError::from)?;
    let (revision, created) = kv.as_ref().map(|kv| (kv.mod_revision, kv.create_revision)).unwrap_or_default();
    match kv.and_then(|kv| serde_json::from_slice::<StoredToken>(&kv.value).ok()) {
        Some(s) if s.hash == token.secret_hash() && s.expires > unix_now() && s.uses_left != Some(0) => {
            Ok(LiveToken { key, revision, created, token: s })
        }
        _ => Err(bad(
            "unknown, wrong, used up, revoked or expired; create one with `testbus-control-plane token create`".into(),
        )),
    }
}

/// Whether `text` is a live dashboard login token; the role it logs in
/// with (viewer or admin) and when it expires (seconds since the epoch)
/// if so.
pub async fn check_dashboard_token(st: &ApiState, text: &str) -> Result<(testbus_pki::Role, u64), Status> {
    // Whatever is wrong with it, a refused login says how to get one that
    // works (a join token, say, was only "not a viewer token").
    const MAKE_ONE: &str = "create one with `testbus-control-plane token create --viewer` (or --admin)";
    let auth = AuthService::new(st.clone());
    let t = live_token(st, auth.ca()?, VIEWER_TOKENS, text).await.map(|t| t.token).map_err(|e| match e.code() {
        tonic::Code::Unauthenticated => {
            Status::from(ApiError::Unauthenticated(format!("token: not a live viewer token; {MAKE_ONE}")))
        }
        tonic::Code::InvalidArgument => Status::invalid_argument(format!("{}; {MAKE_ONE}", e.message())),
        _ => e,
    })?;
    match t.role.as_str() {
        VIEWER_TOKEN => Ok((testbus_pki::Role::Viewer, t.expires)),
        ADMIN_TOKEN => Ok((testbus_pki::Role::Admin, t.expires)),
        _ => Err(ApiError::Unauthenticated(format!("token: a join token, not a viewer token; {MAKE_ONE}")).into()),
    }
}

/// Ends a dashboard session: the login token `text` (checked: only its
/// holder can end it) is deleted, so no copy of the cookie logs in again.
pub async fn end_dashboard_session(st: &ApiState, text: &str) -> Result<(), Status> {
    let auth = AuthService::new(st.clone());
    let live = live_token(st, auth.ca()?, VIEWER_TOKENS, text).await?;
    st.store.txn(vec![], vec![Op::Delete(live.key)]).await.map_err(ApiError::from)?;
    Ok(())
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

    /// The token `text`, if `host` may join with it now: live, an agent's,
    /// for that host (a pool's token: for a name of that pool's guests
    /// exactly), made after the host's last revocation.
    async fn check_token(&self, text: &str, host: &str) -> Result<LiveToken, Status> {
        let bad = |m: String| Status::from(ApiError::Unauthenticated(format!("token: {m}")));
        let live = live_token(&self.st, self.ca()?, TOKENS, text).await?;
        let s = &live.token;
        if !s.role.is_empty() {
            return Err(bad(format!("it is a {} token: it logs in to the dashboard, it joins nothing", s.role)));
        }
        if !s.pool.is_empty() && !testbus_proto::pool::is_guest_of(&s.pool, host) {
            return Err(bad(format!("it is for guests of pool {:?} (hosts named {}-XXXXX)", s.pool, s.pool)));
        }
        if !s.host.is_empty() && s.host != host {
            return Err(bad(format!("it is for host {:?} only", s.host)));
        }
        let revoked = self.pki()?.revoked_at_revision(&Subject::host(host));
        if revoked.is_some_and(|at| live.created < at) {
            return Err(bad(format!("host {host:?} was revoked after this token was made; join it with a new token")));
        }
        Ok(live)
    }

    /// One join's use of a token with a count: compare-and-swap on the
    /// revision it was read at, so two joins never share the last use; a
    /// used-up token is deleted.
    async fn use_token(&self, live: LiveToken) -> Result<(), Status> {
        let Some(left) = live.token.uses_left else { return Ok(()) };
        let op = if left <= 1 {
            Op::Delete(live.key.clone())
        } else {
            let next = StoredToken { uses_left: Some(left - 1), ..live.token };
            Op::Put(live.key.clone(), serde_json::to_vec(&next).unwrap_or_default())
        };
        let out = self
            .st
            .store
            .txn(vec![Compare::ModRevision(live.key, live.revision)], vec![op])
            .await
            .map_err(ApiError::from)?;
        if !out.succeeded {
            return Err(Status::aborted("token: used by another join at the same moment; try again"));
        }
        Ok(())
    }

    /// A join for a host whose lease another agent holds is refused, as a
    /// second agent's registration is, unless it takes the host over.
    async fn check_lease(&self, host: &str, take_over: bool) -> Result<(), Status> {
        if take_over {
            return Ok(());
        }
        let h = match self.st.load::<testbus_proto::Host>(host).await {
            Ok((h, _)) => h,
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(()),
            Err(s) => return Err(s),
        };
        let s = h.status();
        if s.agent_id.is_empty() || !testbus_proto::states::lease_live(s, SystemTime::now()) {
            return Ok(());
        }
        let ago = testbus_proto::time::since(&s.lease_renew_time).as_secs();
        Err(Status::failed_precondition(format!(
            "host {host} is held by another agent (agent {}, lease renewed {ago}s ago); stop that agent, or \
             start this one with --take-over",
            s.agent_id
        )))
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
            VIEWER_TOKEN | ADMIN_TOKEN if r.pool.is_empty() && r.host_name.is_empty() => r.role.clone(),
            VIEWER_TOKEN | ADMIN_TOKEN => {
                return Err(Status::invalid_argument("role: a dashboard login token names no pool and no host"))
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "role: {other:?} is not \"agent\", \"viewer\" or \"admin\""
                )))
            }
        };
        if r.uses > 1_000_000 {
            return Err(Status::invalid_argument(format!("uses: {} is more than 1000000 (0: unlimited)", r.uses)));
        }
        let token = JoinToken::new(&self.ca()?.fingerprint());
        let prefix = if role.is_empty() { TOKENS } else { VIEWER_TOKENS };
        // Expired and used-up tokens go first, and so do earlier tokens of
        // the same one host (a pool makes one per clean of a guest: only
        // the newest is of use). Tokens for one host each are counted apart
        // from the others, so that tokens an admin made never stop a pool
        // from cleaning its guests; a store full of live ones refuses more.
        let (kvs, _) = self.st.store.list(prefix).await.map_err(ApiError::from)?;
        let now = unix_now();
        let mut ops = Vec::new();
        let mut live = 0;
        for kv in &kvs {
            match serde_json::from_slice::<StoredToken>(&kv.value) {
                Ok(t)
                    if t.expires > now
                        && t.uses_left != Some(0)
                        && (r.host_name.is_empty() || t.host != r.host_name) =>
                {
                    live += usize::from(t.host.is_empty() == r.host_name.is_empty());
                }
                _ => ops.push(Op::Delete(kv.key.clone())),
            }
        }
        let cap = if r.host_name.is_empty() { MAX_TOKENS } else { MAX_HOST_TOKENS };
        if live >= cap {
            return Err(Status::resource_exhausted(format!(
                "{live} tokens of this kind are live; at most {cap} (they expire by themselves, or \
                 `testbus-control-plane token revoke` them)"
            )));
        }
        let expires = now + ttl.as_secs();
        let stored = StoredToken {
            hash: token.secret_hash(),
            expires,
            pool: r.pool,
            host: r.host_name,
            role,
            uses_left: (r.uses > 0).then_some(r.uses),
        };
        ops.push(Op::Put(format!("{prefix}{}", token.id), serde_json::to_vec(&stored).unwrap_or_default()));
        self.st.store.txn(vec![], ops).await.map_err(ApiError::from)?;
        Ok(CreateTokenResponse {
            token: token.to_string(),
            expires: testbus_proto::time::format(UNIX_EPOCH + Duration::from_secs(expires)),
        })
    }
}

/// The id a revocation of a token names: the token's text, or its id.
fn token_id(text: &str) -> Result<String, Status> {
    let text = text.trim();
    if text.len() == 8 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(text.to_lowercase());
    }
    let t: JoinToken = text.parse().map_err(|e: testbus_pki::NotAJoinToken| {
        Status::invalid_argument(format!("token: {e}, or its id (8 hex digits)"))
    })?;
    Ok(t.id)
}

#[tonic::async_trait]
impl testbus_proto::auth_server::Auth for AuthService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<Credentials>, Status> {
        self.st.authorize(&req, Verb::Join, Target::Certificates)?;
        let extensions = req.extensions().clone();
        let r = req.into_inner();
        testbus_proto::validate::dns_label(&r.host_name)
            .map_err(|e| Status::invalid_argument(format!("hostName: {e}")))?;
        let live = self.check_token(&r.token, &r.host_name).await?;
        self.check_lease(&r.host_name, r.take_over).await?;
        let pki = self.pki()?;
        // A pool's guest: its token names the pool, and so does its
        // certificate, which is how the API knows the Host's pool.
        let pool = Some(live.token.pool.clone()).filter(|p| !p.is_empty());
        let cert = self
            .ca()?
            .sign_csr(&r.csr, &r.host_name, Role::Agent, pool.as_deref(), pki.agent_ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.use_token(live).await?;
        crate::authz::ConnInfo::prove(&extensions);
        tracing::info!(host = %r.host_name, pool = pool.as_deref().unwrap_or(""), "an agent joined");
        Ok(Response::new(self.credentials(cert)?))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<Credentials>, Status> {
        self.st.authorize(&req, Verb::Renew, Target::Certificates)?;
        let Caller::Certified { name: host, role: Role::Agent, pool, .. } = Caller::of(&req) else {
            return Err(Status::failed_precondition("only agents renew certificates here"));
        };
        let cert = self
            .ca()?
            .sign_csr(&req.get_ref().csr, &host, Role::Agent, pool.as_deref(), self.pki()?.agent_ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(self.credentials(cert)?))
    }

    async fn create_token(&self, req: Request<CreateTokenRequest>) -> Result<Response<CreateTokenResponse>, Status> {
        self.st.authorize(&req, Verb::CreateToken, Target::Tokens)?;
        self.create_token(req.into_inner()).await.map(Response::new)
    }

    async fn revoke(&self, req: Request<RevokeRequest>) -> Result<Response<RevokeResponse>, Status> {
        self.st.authorize(&req, Verb::Revoke, Target::Certificates)?;
        let r = req.into_inner();
        let subject = match (r.host_name.as_str(), r.user_name.as_str()) {
            (host, "") if !host.is_empty() => {
                testbus_proto::validate::dns_label(host)
                    .map_err(|e| Status::invalid_argument(format!("hostName: {e}")))?;
                Subject::host(host)
            }
            ("", user) if !user.is_empty() => {
                testbus_pki::check_name(user).map_err(|e| Status::invalid_argument(format!("userName: {e}")))?;
                Subject::user(user)
            }
            _ => return Err(Status::invalid_argument("hostName, userName: give one of the two")),
        };
        let now = unix_now();
        let op = Op::Put(format!("{REVOKED}{subject}"), now.to_string().into_bytes());
        let out = self.st.store.txn(vec![], vec![op]).await.map_err(ApiError::from)?;
        if let Some(pki) = &self.st.pki {
            pki.revoked.write().insert(subject.clone(), (UNIX_EPOCH + Duration::from_secs(now), out.revision));
        }
        tracing::info!(%subject, "certificates revoked");
        Ok(Response::new(RevokeResponse {}))
    }

    async fn revoke_token(
        &self,
        req: Request<testbus_proto::RevokeTokenRequest>,
    ) -> Result<Response<testbus_proto::RevokeTokenResponse>, Status> {
        self.st.authorize(&req, Verb::Revoke, Target::Tokens)?;
        let id = token_id(&req.get_ref().token)?;
        let ops = [TOKENS, VIEWER_TOKENS].map(|p| Op::Delete(format!("{p}{id}"))).to_vec();
        let mut found = false;
        for p in [TOKENS, VIEWER_TOKENS] {
            found |= self.st.store.get(&format!("{p}{id}")).await.map_err(ApiError::from)?.is_some();
        }
        if !found {
            return Err(Status::not_found(format!("token: no token {id} (expired tokens are dropped)")));
        }
        self.st.store.txn(vec![], ops).await.map_err(ApiError::from)?;
        tracing::info!(token = %id, "token revoked");
        Ok(Response::new(testbus_proto::RevokeTokenResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_refuses_what_was_issued_before_it_only() {
        let (ca, _) = Ca::create().unwrap();
        let pki = Pki::new(None, ca.cert_pem().into(), Duration::from_secs(60));
        let id =
            |issued: SystemTime| Caller::Certified { name: "host-a".into(), role: Role::Agent, issued, pool: None };
        let call = |c: Caller| {
            let mut req = Request::new(());
            req.extensions_mut().insert(c);
            authorize(Some(&pki), &req, Verb::Get, testbus_proto::Kind::Host.into())
        };
        let now = SystemTime::now();
        assert!(call(id(now)).is_ok());
        pki.revoked.write().insert(Subject::host("host-a"), (now, 1));
        let e = call(id(now - Duration::from_secs(5))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("revoked"), "{e:?}");
        assert!(call(id(now + Duration::from_secs(1))).is_ok(), "issued after the revocation");
        // Hosts and users are named apart: host-a's revocation is not user
        // host-a's, and a user's is not a host's.
        let user = |name: &str, role| Caller::Certified {
            name: name.into(),
            role,
            issued: now - Duration::from_secs(5),
            pool: None,
        };
        assert!(call(user("host-a", Role::Admin)).is_ok());
        pki.revoked.write().insert(Subject::user("alice"), (now, 2));
        assert!(call(user("alice", Role::Viewer)).is_err());
        assert!(call(Caller::Certified {
            name: "alice".into(),
            role: Role::Agent,
            issued: now - Duration::from_secs(5),
            pool: None
        })
        .is_ok());
    }
}
