//! A malicious peer for tests: joins the fleet's libp2p network and answers every blob
//! request with corrupted bytes (the right length plus garbage, then garbage of other
//! lengths), as a compromised or broken device might; asked for its newest announcement,
//! it answers with a far newer release of `hello` signed by a key the fleet does not trust.
//!
//! Usage: `evil_peer FLEET PORT [DIAL]` — prints `evil peer: <multiaddr>` once listening;
//! with DIAL (a peer address) it also connects there and floods both gossip topics with
//! garbage and forged messages every 200 ms.
#![allow(clippy::print_stdout)]

use net::{MessageAcceptance, NetConfig, NetEvent};
use proto::blob::{BlobResponse, Want};
use std::io::Write;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let fleet = args.next().unwrap_or_else(|| "home".into());
    let port: u16 = args.next().unwrap_or_else(|| "0".into()).parse()?;
    let mut seed = [0u8; 32];
    seed[..2].copy_from_slice(&port.to_le_bytes());
    seed[31] = 0xEE;
    let mut cfg = NetConfig::new(net::keypair_from_seed(seed), &fleet);
    cfg.listen = vec![format!("/ip4/127.0.0.1/tcp/{port}").parse()?];
    let dial = args.next();
    if let Some(addr) = &dial {
        cfg.bootstrap = vec![addr.parse()?];
    }
    let (client, mut events) = net::start(cfg, &net::tasks::Tasks::new())?;
    if dial.is_some() {
        let c = client.clone();
        tokio::spawn(async move {
            let forged = {
                let mut env = proto::envelope::Envelope::new(b"UFLT\x01\x04garbage".to_vec())
                    .expect("framed");
                env.sign(&proto::SecretKey::from_seed([0x66; 32]))
                    .expect("sign");
                env.encode().expect("encode")
            };
            for i in 0u64.. {
                let _ = c
                    .publish(net::Topic::Announce, format!("garbage {i}").into_bytes())
                    .await;
                let _ = c.publish(net::Topic::Status, forged.clone()).await;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        });
    }
    let mut served = 0u64;
    while let Some(ev) = events.recv().await {
        match ev {
            NetEvent::Listening(addr) => {
                println!("evil peer: {addr}/p2p/{}", client.peer_id());
                std::io::stdout().flush()?;
            }
            NetEvent::BlobWanted {
                want: Want::Announcement,
                reply,
                ..
            } => {
                println!("announced");
                std::io::stdout().flush()?;
                client
                    .respond(reply, BlobResponse::Found(forged_announcement(&fleet)?))
                    .await;
            }
            NetEvent::BlobWanted {
                want: Want::Root | Want::Revocations | Want::Holds,
                reply,
                ..
            } => {
                // A lie for the trust records a device asks each peer for while the broker
                // is down: refused by the device like any other.
                println!("asked for a trust record");
                std::io::stdout().flush()?;
                client
                    .respond(reply, BlobResponse::Found(b"not a root".to_vec()))
                    .await;
            }
            NetEvent::BlobWanted { digest, reply, .. } => {
                served += 1;
                println!("served {served}");
                std::io::stdout().flush()?;
                // Alternate between a plausible-size lie and an oversized flood.
                let len = if served % 2 == 1 {
                    64 * 1024
                } else {
                    300 * 1024
                };
                let garbage: Vec<u8> = (0..len).map(|i| (i as u8) ^ digest.0[i % 32]).collect();
                client.respond(reply, BlobResponse::Found(garbage)).await;
            }
            NetEvent::Gossip { id, source, .. } => {
                client.validate(id, source, MessageAcceptance::Ignore).await
            }
            _ => {}
        }
    }
    Ok(())
}

/// Release 1,000,000 of `hello`, signed by a key that is not the fleet's.
fn forged_announcement(fleet: &str) -> anyhow::Result<Vec<u8>> {
    let ann = proto::announcement::Announcement {
        fleet: fleet.to_string(),
        app: "hello".into(),
        channel: "stable".into(),
        platform: proto::manifest::Platform::QemuX86_64,
        release: 1_000_000,
        version: semver::Version::new(1000, 0, 0),
        manifest: proto::Digest::of(b"evil"),
        issued_at: 0,
        expires_at: u64::MAX / 2,
    };
    let mut env = ann.seal()?;
    env.sign(&proto::SecretKey::from_seed([0x66; 32]))?;
    Ok(env.encode()?)
}
