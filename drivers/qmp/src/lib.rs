//! strata-qmp: an async client for the QEMU Machine Protocol over a Unix socket.
//!
//! - [`QmpClient::connect`] reads the greeting (exposing [`QemuVersion`]) and
//!   negotiates capabilities.
//! - One background task reads newline-delimited JSON: replies are matched to
//!   requests by `id`, events go to a broadcast channel
//!   ([`QmpClient::subscribe_events`]). When the socket closes, pending
//!   requests fail with [`QmpError::Disconnected`] and event streams end.
//! - Typed replies ([`types`]) and typed event payloads ([`KnownEvent`]) are
//!   tolerant of newer QEMU versions (unknown fields ignored, unknown enum
//!   values decode as `Unknown`).
//! - [`QmpClient::send_fd`] passes a descriptor with SCM_RIGHTS (`getfd`).
//!
//! Every command sent, reply received (with elapsed ms) and event is logged
//! with `tracing::debug!`.
//!
//! This crate knows nothing about the rest of Strata.

mod client;
mod error;
pub mod event;
mod fdpass;
mod protocol;
pub mod types;

pub use client::{AskedOnOpening, HeldCommands, QmpClient, SentCommands, DEFAULT_TIMEOUT};
pub use error::QmpError;
pub use event::{KnownEvent, QmpEvent};
pub use types::QemuVersion;
