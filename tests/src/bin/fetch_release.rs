//! A second, independent libp2p process for tests: fetches a release's manifest and all
//! its chunks from a peer by digest, verifies everything against the trust root, and
//! writes the image.
//!
//! Usage: `fetch_release PEER_ADDR ROOT_FILE MANIFEST_DIGEST CHANNEL OUT_FILE`; with
//! `UNIFLEET_FETCH_KEY=device.key` in its environment it asks as that device (its
//! libp2p identity), else as a stranger.
#![allow(clippy::print_stdout)]

use anyhow::{bail, Context, Result};
use proto::manifest::{verify_manifest, Expectations, ImageVerifier, Platform};
use proto::root::TrustedRoot;
use std::io::Write;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [peer, root, digest, channel, out] = args.as_slice() else {
        bail!("usage: fetch_release PEER_ADDR ROOT_FILE MANIFEST_DIGEST CHANNEL OUT_FILE");
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let root = TrustedRoot::bootstrap(&std::fs::read(root)?, now)?;
    let digest: proto::Digest = digest.parse()?;
    let addr: net::Multiaddr = peer.parse()?;
    let peer_id = net::peer_of(&addr).context("peer address needs /p2p/<id>")?;
    let mut seed = [0u8; 32];
    seed[0] = 0xF7;
    seed[1..9].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
    if let Some(key) = std::env::var_os("UNIFLEET_FETCH_KEY") {
        let text = std::fs::read_to_string(&key).context("reading UNIFLEET_FETCH_KEY")?;
        seed = proto::SecretKey::from_text(&text)?.seed();
    }
    let mut cfg = net::NetConfig::new(net::keypair_from_seed(seed), root.fleet());
    cfg.bootstrap = vec![addr];
    let (client, mut events) = net::start(cfg, &net::tasks::Tasks::new())?;
    // Wait (bounded) for the connection before asking.
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(ev) = events.recv().await {
            if matches!(ev, net::NetEvent::PeerConnected(p) if p == peer_id) {
                break;
            }
        }
    })
    .await
    .context("connecting to the peer")?;
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let started = std::time::Instant::now();
    let manifest_bytes = client.fetch(peer_id, digest).await?;
    proto::blob::check(&digest, &manifest_bytes)?;
    let expect = Expectations {
        app: None,
        channel,
        platform: Platform::QemuX86_64,
        installed_release: None,
    };
    let verified = verify_manifest(&manifest_bytes, &root, &expect, now)?;
    let m = verified.manifest();
    let mut iv = ImageVerifier::new(m);
    let mut file = std::fs::File::create(out)?;
    // Eight requests in flight (the per-peer bound a device serves); verified and written in order.
    use futures::StreamExt;
    let mut chunks =
        futures::stream::iter(m.chunks.iter().map(|c| client.fetch(peer_id, c.digest))).buffered(8);
    while let Some(bytes) = chunks.next().await {
        let bytes = bytes?;
        iv.push(&bytes)?;
        file.write_all(&bytes)?;
    }
    iv.finish()?;
    println!(
        "verified {} {} release {}: {} bytes in {} chunks; transfer_us={}",
        m.app,
        m.version,
        m.release,
        m.image_size,
        m.chunks.len(),
        started.elapsed().as_micros()
    );
    Ok(())
}
