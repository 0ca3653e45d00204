//! `hub status`: the hub's trust state and what needs an operator soon.

use anyhow::Result;
use hub::home::Home;
use std::path::Path;

pub fn run(dir: &Path) -> Result<()> {
    let home = Home::open(dir)?;
    for line in hub::trust::status(&home)? {
        println!("{line}");
    }
    Ok(())
}
