//! hamirror: high availability for hypervisor hosts.
//!
//! # Layout
//! - [`config`]: `cluster.xml` and `userconfig.xml`, parsed and validated.
//! - [`module`]: the module state machine (sans-IO): failover rules, generations, swaps.
//! - [`cluster`]: the cluster key, the authenticated heartbeat wire format and its UDP transport.
//! - [`quorum`]: the split-brain checker (ICMP ping of the witnesses).
//! - [`daemon`]: the node daemon: one supervisor task per module turning actions into I/O,
//!   user scripts, checkers, persisted state, logs.
//! - [`api`]: the admin HTTP API (Unix socket and TCP) and the health-check URL.
//! - [`cli`]: the client commands.
//! - [`replication`]: mountover, sync protocol, dirty-zone maps, resync (being built).
//! - [`vm`]: `vm register`: a domain's XML, its files, the module that protects them.
//! - [`paths`]: where files live.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod hypervisor;
pub mod module;
pub mod paths;
pub mod peer;
pub mod quorum;
pub mod replication;
pub mod vm;
