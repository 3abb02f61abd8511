//! The testbus control plane: the gRPC API over a [`store::Store`], the
//! watch fan-out [`hub::Hub`], process output, and (by default) the
//! controllers, run in-process and talking to the API through its own
//! unix socket like any other client.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod authz;
pub mod blobs;
pub mod error;
pub mod hub;
pub mod leader;
pub mod metrics;
pub mod output;
pub mod quota;
pub mod server;
pub mod state;
pub mod store;
pub mod sync;
pub mod sync_index;
pub mod web;
