//! `pitr keygen`: create a keyring file holding one new random key.

use std::path::Path;

use anyhow::Result;

use crate::keyring::Keyring;

pub fn run(output: &Path) -> Result<()> {
    let keyring = Keyring::generate(output)?;
    println!(
        "wrote keyring {} (mode 0600) with key {}; keep a copy somewhere safe: without it the repository cannot be read",
        output.display(),
        keyring.newest().id
    );
    Ok(())
}
