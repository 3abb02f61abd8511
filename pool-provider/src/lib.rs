//! testbus-pool-provider: the interface between the HostPool controller and
//! the substrates its guests are made on.
//!
//! The controller (`testbus-controllers::pools`) decides *how many* guests
//! a pool has and *when* one is made, cleaned or removed; a [`Provider`]
//! carries each of those out on one substrate and knows nothing of plans,
//! tests or backoff. Each provider lives in a crate of its own, the only
//! crate that knows its substrate's API (`testbus-pool-libvirt`, ...); the
//! control plane registers them by name in [`Providers`], and a pool's
//! `spec.provider` picks one. A new substrate is a new crate and one
//! `Providers::register` line.
//!
//! Ownership: a provider object serves every pool with the same
//! [`ProviderKind::key`] (one libvirt connection per URI) and lives as long
//! as the controllers do. It owns the host side of its guests' links (relay
//! processes, devices), killed when it is dropped; a restarted control plane
//! finds its guests again with [`Provider::guests`] and links them anew.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use testbus_proto::pool::SnapshotAction;
use testbus_proto::{HostPool, Resource};

pub use async_trait::async_trait;

/// What the host side of a guest's link needs: the relay that carries it,
/// and where it goes.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The `testbus-relay` binary that carries each guest's link.
    pub relay: PathBuf,
    /// The control plane's address for the relays: its TLS listener
    /// (`tcp:IP:PORT`), or without TLS its local socket.
    pub upstream: String,
    /// Whether guests join with a token (the upstream is a TLS listener)
    /// rather than speak plain to the local socket.
    pub tls: bool,
    /// The `vhost-device-vsock` binary that serves libvirt vsock guests'
    /// device (found on PATH when the control plane starts).
    pub vsock_device: PathBuf,
}

/// Connections one guest's relay carries at once (`--max-clients`).
pub const GUEST_MAX_CLIENTS: u32 = 16;

impl LinkConfig {
    /// The relay carrying one guest's link, from `downstream` (its
    /// `--downstream` endpoint) to the control plane; it ends with its
    /// stdin, a pipe the caller holds (so with the control plane), and is
    /// killed when its handle is dropped.
    pub fn relay(&self, downstream: &str, transport: &str, log: std::fs::File) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.relay);
        c.arg("--downstream")
            .arg(downstream)
            .args(["--upstream", &self.upstream, "--transport", transport, "--exit-with-stdin"])
            // An agent needs a connection or two: code in the guest cannot
            // use up the control plane's connections through its relay.
            .args(["--max-clients", &GUEST_MAX_CLIENTS.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        c
    }
}

/// One guest to make, clean or remove: its pool decides the rest.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub name: String,
    pub pool: Arc<HostPool>,
    /// The guest's own directory on this machine (logs, sockets, disks),
    /// removed with it.
    pub state_dir: PathBuf,
    /// Its address on the pool's network (ADDR/PREFIX), when it has one.
    pub address: Option<String>,
    /// How long it may take from nothing to waiting for its link.
    pub boot: Duration,
}

/// Why a provider could not make, clean, link or remove a guest: said on
/// the guest and the pool, and logged (the pool backs off after failures
/// in a row).
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The substrate (its API, or the image and disks it works on), as it
    /// said it.
    #[error("{0}")]
    Substrate(String),
    /// A file or a process of the guest's on this machine.
    #[error("{what}: {source}")]
    Local {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The guest did not come up in time (it did not boot, had no line, or
    /// its agent did not register), or it stopped.
    #[error("{0}")]
    NotUp(String),
    /// The control plane's API refused or failed (a join token, the guest's
    /// Host).
    #[error("{0}")]
    Api(String),
    /// The provider cannot do this (a snapshot of a container).
    #[error("{0}")]
    Unsupported(String),
}

impl GuestError {
    /// Maps an I/O error on `what` (a file, a process) to a local one.
    pub fn local(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> GuestError {
        let what = what.to_string();
        move |source| GuestError::Local { what, source }
    }
}

/// What a guest is doing, as its substrate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// It runs; `linked`: its link (as last made) still carries it.
    Up { linked: bool },
    /// Between two runs of its own (a snapshot being taken or loaded):
    /// looked at again later, never taken for dead.
    Busy,
    /// It stopped, or something it cannot run without ended: it is
    /// replaced.
    Down(String),
}

/// How a guest's link starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkStart {
    /// The guest has just started clean: it is given its go (time and join
    /// token) where its substrate needs one.
    Go,
    /// The guest runs on (its relay died, the control plane restarted): the
    /// link is made again, nothing else.
    Again,
}

/// Join tokens for guests, from the control plane: good for one join as
/// that guest of its pool.
#[async_trait]
pub trait JoinTokens: Send + Sync {
    /// A token for `guest`; None when the control plane serves without TLS
    /// (its relays speak to the local socket, and need none).
    async fn token(&self, guest: &str) -> Result<Option<String>, GuestError>;
}

/// One substrate's guests, for every pool with the same key. Calls may be
/// cancelled (dropped) at any await: a guest left half made is found again
/// by [`Provider::guests`] and removed or relinked.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Whether the substrate answers now (a pool says why when it does not).
    async fn reach(&self) -> Result<(), GuestError>;

    /// The guests the substrate has whose names start with `prefix`.
    async fn guests(&self, prefix: &str) -> Result<Vec<String>, GuestError>;

    /// Makes the guest and starts it, until its agent can be linked (for
    /// libvirt: disk, domain, boot, clean snapshot). `progress` is told
    /// what it waits for.
    async fn create(
        &self,
        spec: &GuestSpec,
        join: &dyn JoinTokens,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(), GuestError>;

    /// Makes the host side of the guest's link (replacing any earlier
    /// one): its agent then registers on its own.
    async fn link(&self, spec: &GuestSpec, start: LinkStart, join: &dyn JoinTokens) -> Result<(), GuestError>;

    /// What the guest does now; one cheap call per guest.
    async fn observe(&self, spec: &GuestSpec) -> Result<Observed, GuestError>;

    /// Whether a used guest of `pool` is made clean in place by
    /// [`Provider::clean`] (then linked with a go); otherwise it is
    /// destroyed and a new one made.
    fn cleans_in_place(&self, pool: &HostPool) -> bool;

    /// Brings the guest back to the state it was in when it first waited
    /// for its link (for a container: a new one in its place, which may
    /// need a new join token).
    async fn clean(&self, spec: &GuestSpec, join: &dyn JoinTokens) -> Result<(), GuestError>;

    /// Whether a running guest found after a restart can be linked again;
    /// why not, if it must be replaced.
    fn relinkable(&self, pool: &HostPool) -> Result<(), String>;

    /// The address on its pool's network a guest found after a restart was
    /// made with (None: it has none, or the provider cannot say), so that
    /// it keeps it and no other guest is given it.
    async fn address(&self, spec: &GuestSpec) -> Result<Option<String>, GuestError> {
        let _ = spec;
        Ok(None)
    }

    /// Stops and removes the guest and everything made for it (its state
    /// dir included). A guest already gone is fine.
    async fn destroy(&self, spec: &GuestSpec) -> Result<(), GuestError>;

    /// Carries out a snapshot request on the guest; its snapshots after.
    async fn snapshot(&self, spec: &GuestSpec, action: SnapshotAction, name: &str) -> Result<Vec<String>, GuestError> {
        let _ = (action, name);
        Err(GuestError::Unsupported(format!("guests of pool {} cannot be snapshotted", spec.pool.name())))
    }

    /// The pool is going and has no guest left: whatever else was made for
    /// it (a network, a view of its image) goes.
    async fn release_pool(&self, pool: &HostPool) -> Result<(), GuestError>;
}

/// A substrate as `spec.provider` names it: opens the provider objects.
pub trait ProviderKind: Send + Sync {
    /// Pools with the same key share one provider object (one libvirt
    /// connection per URI).
    fn key(&self, pool: &HostPool) -> String;
    /// A provider for pools with `pool`'s key; it reaches its substrate on
    /// first use, not here.
    fn open(&self, pool: &HostPool, links: &LinkConfig) -> Arc<dyn Provider>;
}

/// The providers a control plane serves pools with, by `spec.provider`.
#[derive(Clone, Default)]
pub struct Providers(BTreeMap<String, Arc<dyn ProviderKind>>);

impl Providers {
    pub fn register(mut self, name: &str, kind: impl ProviderKind + 'static) -> Providers {
        self.0.insert(name.to_string(), Arc::new(kind));
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn ProviderKind>> {
        self.0.get(name)
    }

    /// Their names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}
