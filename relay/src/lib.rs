//! testbus-relay's parts: endpoints, the serial link layer (`framer`,
//! `link`), the multiplexer (`mux`), and a noisy line for tests and
//! benchmarks (`noise`). The binary (`main.rs`) wires them together.
#![forbid(unsafe_code)]

pub mod endpoint;
pub mod framer;
pub mod link;
pub mod mux;
pub mod noise;
