//! `hub log`.

use super::local;
use anyhow::Result;
use hub::home::Home;
use hub::store::Event;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    json: bool,
    /// Keep printing new events as they are committed.
    #[arg(long)]
    follow: bool,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let Args { json, follow } = args;
    let home = Home::open(dir)?;
    let mut shown = 0;
    loop {
        let events = home.store()?.events()?;
        for e in events.iter().skip(shown) {
            print_event(e, json)?;
        }
        shown = events.len();
        if !follow {
            break;
        }
        // The log lives in git; a new commit is the only signal. Poll it.
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    Ok(())
}

fn print_event(e: &Event, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(e)?);
    } else {
        let what: Vec<String> = [
            e.app.clone(),
            e.channel.clone(),
            e.release.map(|r| format!("r{r}")),
            e.device.clone(),
        ]
        .into_iter()
        .flatten()
        .collect();
        println!("{} {} {} {}", local(e.at), e.kind, what.join(" "), e.detail);
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    Ok(())
}
