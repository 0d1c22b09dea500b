//! End-to-end tests: the gateway on 127.0.0.1 in front of fake upstreams on 127.0.0.1.
//! One test binary; `common` holds the harness.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test harness code may fail loudly

mod anthropic;
mod binary;
mod chains;
mod chat;
mod common;
mod errors;
mod limits;
mod metrics;
mod onnx;
mod redis;
mod routing;
mod server;
mod store;
