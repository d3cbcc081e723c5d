//! pitr: PostgreSQL WAL archiving and point-in-time recovery on object storage.
//!
//! Modules follow the data flow: `wal` names and validates what Postgres hands over, `envelope`
//! turns plaintext into a compressed, encrypted object and back, `keyring` holds the keys,
//! `repository` keeps objects (identity, envelopes, the key layout) in a store behind the
//! `storage` contract, `outage_spool` keeps encoded WAL locally while the
//! store is unreachable, `config` resolves settings, and `commands` are
//! the entry points the CLI calls. docs/ARCHITECTURE.md walks through them.

pub mod backup;
pub mod buffer_pool;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod durable;
pub mod envelope;
pub mod keyring;
pub mod outage_spool;
pub mod postgres;
pub mod prefetch;
pub mod progress;
pub mod repository;
pub mod restore;
pub mod storage;
pub mod wal;
