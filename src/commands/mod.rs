//! The commands: each turns settings and arguments into calls on the repository.
//!
//! Commands hold no storage or crypto code of their own. They decide what to read or write and
//! report the outcome; `repository` and `envelope` do the work.

pub mod archive_get;
pub mod archive_push;
pub mod keygen;
pub mod list;
pub mod wal_list;
