//! `hub deploy-hook` (internal): the deploy repository's post-receive hook.

use anyhow::Result;
use hub::home::Home;
use std::path::Path;

pub fn run(dir: &Path) -> Result<()> {
    let home = Home::open(dir)?;
    let stdin = std::io::stdin();
    hub::deploy::hook(&home, stdin.lock(), &mut |line| println!("{line}"))?;
    Ok(())
}
