//! `hub devices`.

use super::local;
use anyhow::Result;
use hub::home::Home;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    json: bool,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let Args { json } = args;
    let home = Home::open(dir)?;
    let inv = hub::serve::load_inventory(&home);
    let list = hub::trust::revocations(&home.store()?, &home.anchor_root()?)?
        .map(|(l, _)| l)
        .unwrap_or_default();
    let revoked = &list.devices;
    let keys: std::collections::HashMap<String, proto::PublicKey> =
        hub::inventory::load_devices(&home.store()?)?
            .into_values()
            .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&inv)?);
    } else {
        let now = hub::home::now();
        for e in inv.values() {
            let ondemand = e
                .ondemand
                .map_or(String::new(), |c| format!(" on demand: {}", c.summary()));
            let hosted = e
                .hosted
                .as_ref()
                .map_or(String::new(), |h| format!("; hosted: {}", h.summary()));
            let network = e
                .network
                .map_or(String::new(), |n| format!(" {}", n.summary()));
            let assigned = keys.get(&e.device).map_or(&[][..], |k| list.tags_of(k));
            let tags = tags_text(assigned, &e.tags);
            println!(
                "{}{tags} {} release {} {} {} (from peers {}, hub {}; seen {}){network}{ondemand}{hosted}",
                e.device,
                e.app,
                e.release.map_or("-".into(), |r| r.to_string()),
                e.state,
                e.detail,
                proto::status::human_bytes(e.bytes_from_peers),
                proto::status::human_bytes(e.bytes_from_hub),
                proto::status::human_ago(e.last_seen, now)
            );
        }
        for r in revoked {
            println!(
                "{} REVOKED since {} (key {})",
                r.name,
                local(r.at),
                r.key.id().short()
            );
        }
    }
    Ok(())
}

/// A device's tags as `hub devices` shows them: those the operator assigned, and any it
/// declares without being assigned (which target nothing).
fn tags_text(assigned: &[String], declared: &[String]) -> String {
    let unassigned: Vec<&str> = declared
        .iter()
        .filter(|t| !assigned.contains(t))
        .map(String::as_str)
        .collect();
    let mut text = String::new();
    if !assigned.is_empty() {
        text += &format!(" [{}]", assigned.join(", "));
    }
    if !unassigned.is_empty() {
        text += &format!(
            " (declares {}: not assigned, `hub enroll --tag`)",
            unassigned.join(", ")
        );
    }
    text
}
