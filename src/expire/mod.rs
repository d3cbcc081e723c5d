//! Retention: `pitr expire` deletes what the policy no longer needs, and never what it does.
//!
//! `plan` decides from the catalog alone (backups, WAL, timeline histories) which backups and
//! WAL files go; `run` lists the repository, plans, and deletes in order: manifests first (a
//! backup without its manifest does not exist), then WAL, then chunks no remaining manifest
//! references, then index entries of deleted segments. A run that stops half-way leaves only
//! objects a later run collects. Chunk collection is skipped while a backup is in progress (its
//! marker under `locks/backup/`), since that backup may reuse any chunk the catalog showed it;
//! a backup in turn waits for a running expire's marker to go before it reads the catalog.

pub mod plan;
pub mod run;
