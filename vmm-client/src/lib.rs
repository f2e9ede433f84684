//! vmm's control socket (docs/control-api.md): the wire types both sides
//! use ([`proto`]) and a client for management software.
//!
//! The host parses requests with [`proto::parse_request`], so the host and
//! every client built on this crate read the same protocol.

pub mod proto;
