//! pitr: PostgreSQL WAL archiving and point-in-time recovery on object storage.
//!
//! Modules follow the data flow and depend only downward: `wal` names and validates what
//! Postgres hands over, `envelope` turns plaintext into a compressed, encrypted object and back,
//! `keyring` holds the keys, `config` resolves settings, `storage` is the one contract every
//! store backend meets (object_store behind it), `repository` keeps objects in a store
//! (identity, envelopes, the key layout); the use-cases `archive` (push, get, prefetch, the
//! outage spool), `backup` and `restore` sit on the repository; `daemon` composes them;
//! `commands` are the entry points the CLI calls. `scripts/module-graph.sh` checks the
//! layering; docs/ARCHITECTURE.md walks through the modules.

pub mod archive;
pub mod backup;
pub mod buffer_pool;
pub mod check;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod durable;
pub mod envelope;
pub mod expire;
pub mod keyring;
pub mod postgres;
pub mod progress;
pub mod repository;
pub mod restore;
pub mod storage;
pub mod verify;
pub mod wal;
