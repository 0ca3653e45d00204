//! `hub deploy-hook` (internal): the deploy repository's pre-receive hook.

use anyhow::Result;
use hub::home::Home;
use std::io::Write;
use std::path::Path;

pub fn run(dir: &Path) -> Result<()> {
    let home = Home::open(dir)?;
    let stdin = std::io::stdin();
    // A pusher who went away closes the pipe: the pipeline goes on to a defined end (a
    // release stored and announced, or refused) instead of dying on a write.
    let mut out = std::io::stdout();
    hub::deploy::hook(&home, stdin.lock(), &mut |line| {
        let _ = writeln!(out, "{line}");
    })?;
    Ok(())
}
