//! tai-core: the domain types every TAI layer shares, and nothing that does I/O.
//!
//! Registered names of the supervision tree, the error codes of the public
//! contract, and the node configuration (a pure `load(text, env)`). Depends on
//! no other TAI crate; every other TAI crate may depend on it.

pub mod config;
pub mod error;
pub mod names;

pub use error::{ApiError, ErrorCode};
