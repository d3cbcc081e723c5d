//! The archive use-cases: what happens to one WAL file on its way into the repository and back.
//!
//! `push` validates a file Postgres hands over and makes it durable in the repository (or, while
//! the store is unreachable, in the `outage_spool`); `get` restores one file to where Postgres
//! wants it, verified; `prefetch` fetches the segments recovery will ask for next. Each takes
//! its collaborators as arguments (a repository, an optional spool, counters to report to) and
//! never sees the daemon: the hook commands and the daemon both compose these functions.

pub mod get;
pub mod outage_spool;
pub mod prefetch;
pub mod push;
