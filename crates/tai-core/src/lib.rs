//! tai-core: the domain types every TAI layer shares, and nothing that does I/O.
//!
//! Registered names of the supervision tree, the error codes of the public
//! contract, signals, receipts (hashing, signing, verification), the messages
//! the layers send each other, and the node configuration (a pure
//! `load(text, env)`). Depends on
//! no other TAI crate; every other TAI crate may depend on it.

pub mod alert;
pub mod config;
pub mod error;
pub mod kaizen;
pub mod msg;
pub mod names;
pub mod receipt;
pub mod signal;
pub mod telemetry;
pub mod trace;

pub use error::{ApiError, ErrorCode};
