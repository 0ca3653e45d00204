//! System benchmarks for the hub and the device agent, with real processes on loopback.
//! Each figure is a median (or a peak, where stated) with a baseline measured in the same
//! run. Build in release mode first:
//!
//!     cargo build --release --workspace --bins
//!     cargo run --release -p unifleet-tests --bin bench_system
//!
//! Measures: `hub publish` of a 16 MiB image (no staging) against `fwtool pack` of the
//! same image; broker RSS per MQTT-connected device with 1,000 and 5,000 simulated
//! devices, the hub's embedded broker in plaintext (loopback) and with TLS (each device
//! with its certificate) and mosquitto beside it; the hub's RSS while an enrolled device
//! floods the broker with 8 KiB messages (`flood`); device
//! agent RSS idle and peak during a 16 MiB transfer; chunk transfer throughput from a
//! device (over libp2p, verified) against a plain TCP copy of the same bytes.
#![allow(clippy::print_stdout)]

use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use unifleet_tests::bench::status_kib;
use unifleet_tests::fleet::{run, wait_for, Fleet};

const RUNS: usize = 5;

fn median(v: Vec<f64>) -> f64 {
    unifleet_tests::bench::percentile(&v, 0.5)
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

fn anon_kib(pid: u32) -> u64 {
    status_kib(pid, "RssAnon")
}

fn bench_publish() -> Result<()> {
    let (mut publish, mut pack) = (vec![], vec![]);
    for _ in 0..RUNS {
        let fleet = Fleet::new("test:///default")?;
        let img = fleet.testimage("bench", "1.0.0", &["--pad-mib", "16"])?;
        let t = Instant::now();
        fleet.publish(&img, "bench", "1.0.0", &["--no-staging"])?;
        publish.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        run(Command::new(unifleet_tests::bin("fwtool")?)
            .arg("pack")
            .arg(&img)
            .args([
                "--app",
                "bench",
                "--version",
                "1.0.0",
                "--release",
                "1",
                "--no-staging",
                "--out",
            ])
            .arg(fleet.path("packed")))?;
        pack.push(t.elapsed().as_secs_f64());
    }
    let (p, b) = (median(publish), median(pack));
    println!("| hub publish, 16 MiB, no staging (chunk, sign, git commit) | {:.0} ms | fwtool pack of the same image: {:.0} ms | {:.2}× | ≤ 1 s |", p * 1e3, b * 1e3, p / b);
    Ok(())
}

/// Connects `clients` MQTT clients, `options(i)` each, each subscribed to a release
/// topic as a device is; returns once every one has its CONNACK (the runtime keeps them
/// open).
fn connect_clients(
    rt: &tokio::runtime::Runtime,
    clients: usize,
    options: impl Fn(usize) -> rumqttc::MqttOptions,
) -> Result<()> {
    let connected = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for i in 0..clients {
        let connected = connected.clone();
        let mut opts = options(i);
        opts.set_keep_alive(Duration::from_secs(60));
        rt.spawn(async move {
            let (client, mut el) = rumqttc::AsyncClient::new(opts, 10);
            let _ = client
                .subscribe(
                    format!("unifleet/home/release/stable/app{}/qemu-x86_64", i % 10),
                    rumqttc::QoS::AtLeastOnce,
                )
                .await;
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
    }
    wait_for(
        "all simulated devices connected",
        Duration::from_secs(180),
        || (connected.load(std::sync::atomic::Ordering::Relaxed) >= clients).then_some(()),
    )?;
    // Let the broker settle its per-connection state (subscriptions acknowledged).
    std::thread::sleep(Duration::from_secs(2));
    Ok(())
}

/// A broker's resident memory per connected device: the hub with its embedded broker,
/// plaintext and with TLS, and mosquitto (plaintext, as Debian ships it) beside it.
fn bench_mqtt_rss(clients: usize) -> Result<()> {
    // The hub with its embedded broker on loopback: plaintext, local clients.
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let pid = fleet.hub.as_ref().context("hub started")?.child.id();
    let url = net::broker_tls::BrokerUrl::parse(&fleet.mqtt)?;
    mqtt_rss("hub (embedded broker, plaintext)", pid, clients, |i| {
        net::broker_tls::mqtt_options(&format!("bench-device-{i}"), &url, None)
    })?;
    drop(fleet);

    // With TLS: `clients` enrolled devices, each with its own certificate.
    let (fleet, devices) = tls_fleet_of(clients, &[])?;
    let pid = fleet.hub.as_ref().context("hub started")?.child.id();
    let url = net::broker_tls::BrokerUrl::parse(&fleet.mqtt)?;
    mqtt_rss("hub (embedded broker, TLS)", pid, clients, |i| {
        let tls = devices[i].tls().expect("a client configuration");
        net::broker_tls::mqtt_options(&format!("bench-device-{i}"), &url, Some(tls))
    })?;
    drop(fleet);

    // mosquitto, as Debian ships it, on a port of its own.
    let port = unifleet_tests::free_port()?;
    let mut mosquitto = Command::new("mosquitto")
        .args(["-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mosquitto (scripts/setup.sh installs it)")?;
    wait_for("mosquitto to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })?;
    let measured = mqtt_rss("mosquitto 2 (plaintext)", mosquitto.id(), clients, |i| {
        rumqttc::MqttOptions::new(format!("bench-device-{i}"), "127.0.0.1", port)
    });
    let _ = mosquitto.kill();
    let _ = mosquitto.wait();
    measured
}

/// A simulated device with TLS: its seed, and its certificate from the hub's CA.
struct TlsDevice {
    ca: String,
    cert: String,
    seed: [u8; 32],
}

impl TlsDevice {
    fn tls(&self) -> Result<rustls::ClientConfig> {
        Ok(net::broker_tls::client_config(
            self.ca.as_bytes(),
            self.cert.as_bytes(),
            &self.seed,
        )?)
    }
}

/// A started hub with TLS on its embedded broker and `n` enrolled devices `bench-<i>`
/// (each with its certificate), `serve` its extra arguments.
fn tls_fleet_of(n: usize, serve: &[&str]) -> Result<(Fleet, Vec<TlsDevice>)> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.use_tls()?;
    let home = hub::home::Home::open(&fleet.hub_dir)?;
    let seeds: Vec<[u8; 32]> = (0..n)
        .map(|i| *blake3::hash(&(i as u64).to_le_bytes()).as_bytes())
        .collect();
    let keys: Vec<(String, proto::PublicKey)> = seeds
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                format!("bench-{i}"),
                proto::SecretKey::from_seed(*s).public(),
            )
        })
        .collect();
    hub::enroll::enroll(&home, &keys, None, false)?;
    let ca = hub::broker::pki::BrokerCa::open(&home)?;
    let now = hub::home::now();
    let devices = keys
        .iter()
        .zip(seeds)
        .map(|((name, key), seed)| {
            Ok(TlsDevice {
                ca: ca.pem(),
                cert: ca.issue_client(name, &key.0, now)?,
                seed,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    fleet.start_hub(serve)?;
    Ok((fleet, devices))
}

fn mqtt_rss(
    broker: &str,
    pid: u32,
    clients: usize,
    options: impl Fn(usize) -> rumqttc::MqttOptions,
) -> Result<()> {
    std::thread::sleep(Duration::from_secs(1));
    let (idle, idle_anon) = (rss_kib(pid), anon_kib(pid));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    connect_clients(&rt, clients, options)?;
    let (loaded, loaded_anon) = (rss_kib(pid), anon_kib(pid));
    let per = loaded.saturating_sub(idle) as f64 / clients as f64;
    println!(
        "| {broker} RSS with {clients} MQTT-connected devices | {loaded} KiB ({per:.1} KiB per device; anonymous {loaded_anon} KiB) | idle: {idle} KiB (anonymous {idle_anon} KiB) | | ≤ 16 KiB per device |"
    );
    rt.shutdown_background();
    Ok(())
}

/// An enrolled device floods the broker with 8 KiB messages on its own status topic as
/// fast as its connection takes them, reconnecting whenever it is cut off, for 20 s: how
/// many it sent, how many reached the hub, and the hub's RSS before, at its peak and
/// after.
fn bench_flood() -> Result<()> {
    let metrics = format!("127.0.0.1:{}", unifleet_tests::free_port()?);
    let (fleet, devices) = tls_fleet_of(1, &["--metrics", &metrics])?;
    let pid = fleet.hub.as_ref().context("hub started")?.child.id();
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss_kib(pid);
    let dropped = || unifleet_tests::metric(&metrics, "unifleet_hub_status_dropped_total");
    let before = dropped()?;
    let url = net::broker_tls::BrokerUrl::parse(&fleet.mqtt)?;
    let opts = net::broker_tls::mqtt_options("flood", &url, Some(devices[0].tls()?));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = sent.clone();
    rt.spawn(async move {
        let (client, mut el) = rumqttc::AsyncClient::new(opts, 1000);
        tokio::spawn(async move {
            loop {
                if el.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let payload = vec![b'x'; 8 * 1024];
        loop {
            let topic = "unifleet/home/status/bench-0";
            if client
                .publish(topic, rumqttc::QoS::AtMostOnce, false, payload.clone())
                .await
                .is_ok()
            {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let mut peak = idle;
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    rt.shutdown_background();
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid);
    let reached = dropped()? - before;
    let cut = unifleet_tests::metric(&metrics, "unifleet_hub_mqtt_cut_off_total")?;
    let refused = unifleet_tests::metric(&metrics, "unifleet_hub_mqtt_refused_total")?;
    println!(
        "| hub RSS while an enrolled device floods the broker for 20 s (8 KiB messages; {} handed to its client, {reached} reached the hub; cut off {cut}×, refused {refused}× while cooling) | peak {peak} KiB, after {after} KiB | idle: {idle} KiB | {:.2}× | ≤ idle + 32 MiB |",
        sent.load(std::sync::atomic::Ordering::Relaxed),
        peak as f64 / idle as f64
    );
    Ok(())
}

fn bench_agent_and_transfer() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.serve_strangers()?; // fetch_release has no enrolled key
    fleet.start_hub(&[])?;
    let d = fleet.add_device("bench0", "bench", &[])?;
    fleet.start_device(d)?;
    std::thread::sleep(Duration::from_secs(2));
    let pid = fleet.devices[d].proc.as_ref().unwrap().child.id();
    let idle = rss_kib(pid);
    let idle_anon = anon_kib(pid);
    let img = fleet.testimage("bench", "1.0.0", &["--pad-mib", "16"])?;
    fleet.publish(&img, "bench", "1.0.0", &["--no-staging"])?;
    let (mut peak, mut peak_anon) = (idle, idle_anon);
    wait_for("device active", Duration::from_secs(120), || {
        peak = peak.max(rss_kib(pid));
        peak_anon = peak_anon.max(anon_kib(pid));
        fleet.devices[d]
            .release_state("bench")
            .filter(|(r, s)| *r == 1 && s == "Active")
    })?;
    println!(
        "| device agent RSS (anonymous memory in brackets) | idle {idle} KiB [{idle_anon}], peak {peak} KiB [{peak_anon}] during a 16 MiB download | | | ≤ 16 MiB peak |"
    );

    // Transfer from the device (libp2p, verified, 4 in flight) vs. a plain TCP copy.
    let addr = fleet.device_peer_addr(d)?;
    let rel: serde_json::Value =
        serde_json::from_str(&run(fleet.hub_cmd()?.args(["releases", "--json"]))?)?;
    let digest = rel[0]["manifest"].as_str().unwrap().to_string();
    let size = std::fs::metadata(&img)?.len() as f64;
    let data = std::fs::read(&img)?;
    let (mut p2p, mut tcp) = (vec![], vec![]);
    for _ in 0..RUNS {
        let said = run(Command::new(unifleet_tests::bin("fetch_release")?)
            .arg(&addr)
            .arg(fleet.hub_dir.join("root.bin"))
            .arg(&digest)
            .arg("stable")
            .arg(fleet.path("fetched.img"))
            .stderr(Stdio::null()))?;
        // From the first request to the last verified byte (connection already up).
        let us: f64 = said.rsplit("transfer_us=").next().unwrap().trim().parse()?;
        p2p.push(size / (us / 1e6));
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let payload = data.clone();
        let t = Instant::now();
        let server = std::thread::spawn(move || -> Result<()> {
            let (mut s, _) = listener.accept()?;
            s.write_all(&payload)?;
            Ok(())
        });
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
        let mut got = Vec::with_capacity(data.len());
        c.read_to_end(&mut got)?;
        server.join().unwrap()?;
        tcp.push(size / t.elapsed().as_secs_f64());
        anyhow::ensure!(got.len() == data.len());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let data = std::sync::Arc::new(data);
    let mut bare = vec![];
    for _ in 0..RUNS {
        bare.push(rt.block_on(bare_noise_yamux(data.clone()))?);
    }
    let (p, t, b) = (median(p2p), median(tcp), median(bare));
    println!(
        "| chunk transfer device → peer (libp2p noise+yamux, 8 in flight, every chunk verified) | {:.0} MB/s | plain TCP copy: {:.0} MB/s | {:.1}% | ≥ 60% |",
        p / 1e6,
        t / 1e6,
        p / t * 100.0
    );
    println!(
        "| the same, against a bare noise+yamux connection (8 streams, no requests, no checks) | {:.0} MB/s | bare noise+yamux: {:.0} MB/s | {:.1}% | ≥ 90% |",
        p / 1e6,
        b / 1e6,
        p / b * 100.0
    );
    Ok(())
}

/// The transport alone: one TCP connection with noise and yamux (libp2p's own, as the
/// agents use them), the bytes written over 8 streams at once; bytes per second from the
/// first stream opened to the last byte read.
async fn bare_noise_yamux(data: std::sync::Arc<Vec<u8>>) -> Result<f64> {
    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    use libp2p::core::muxing::{StreamMuxerBox, StreamMuxerExt};
    use libp2p::core::transport::{DialOpts, ListenerId, PortUse, TransportEvent};
    use libp2p::core::{upgrade, Endpoint, Transport};
    const STREAMS: usize = 8;
    fn transport() -> Result<libp2p::core::transport::Boxed<(libp2p::PeerId, StreamMuxerBox)>> {
        let key = libp2p::identity::Keypair::generate_ed25519();
        Ok(
            libp2p::tcp::tokio::Transport::new(libp2p::tcp::Config::default().nodelay(true))
                .upgrade(upgrade::Version::V1)
                .authenticate(libp2p::noise::Config::new(&key)?)
                .multiplex(libp2p::yamux::Config::default())
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
                .boxed(),
        )
    }
    /// Polls the connection (yamux moves every stream's frames from here) until it ends.
    fn drive(mut muxer: StreamMuxerBox) {
        tokio::spawn(async move {
            while futures::future::poll_fn(|cx| muxer.poll_unpin(cx))
                .await
                .is_ok()
            {}
        });
    }
    let mut listener = transport()?;
    listener.listen_on(ListenerId::next(), "/ip4/127.0.0.1/tcp/0".parse()?)?;
    let addr = loop {
        match listener.next().await {
            Some(TransportEvent::NewAddress { listen_addr, .. }) => break listen_addr,
            Some(_) => continue,
            None => anyhow::bail!("the listener closed"),
        }
    };
    let server = tokio::spawn(async move {
        let upgrade = loop {
            match listener.next().await {
                Some(TransportEvent::Incoming { upgrade, .. }) => break upgrade,
                Some(_) => continue,
                None => anyhow::bail!("the listener closed"),
            }
        };
        let (_, mut muxer) = upgrade.await?;
        let mut streams = vec![];
        for _ in 0..STREAMS {
            streams.push(futures::future::poll_fn(|cx| muxer.poll_inbound_unpin(cx)).await?);
        }
        drive(muxer);
        let mut got = 0;
        let reads = streams.into_iter().map(|mut s| async move {
            let mut buf = vec![];
            s.read_to_end(&mut buf).await.map(|_| buf.len())
        });
        for n in futures::future::join_all(reads).await {
            got += n?;
        }
        anyhow::Ok(got)
    });
    let dial = DialOpts {
        role: Endpoint::Dialer,
        port_use: PortUse::New,
    };
    let (_, mut muxer) = transport()?.dial(addr, dial)?.await?;
    let t = Instant::now();
    let mut streams = vec![];
    for _ in 0..STREAMS {
        streams.push(futures::future::poll_fn(|cx| muxer.poll_outbound_unpin(cx)).await?);
    }
    drive(muxer);
    let part = data.len().div_ceil(STREAMS);
    let writes = streams.into_iter().enumerate().map(|(i, mut s)| {
        let data = data.clone();
        async move {
            let end = ((i + 1) * part).min(data.len());
            s.write_all(&data[(i * part).min(end)..end]).await?;
            s.close().await
        }
    });
    for w in futures::future::join_all(writes).await {
        w?;
    }
    let got = server.await??;
    anyhow::ensure!(got == data.len(), "{got} of {} bytes arrived", data.len());
    Ok(got as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let which: Vec<String> = std::env::args().skip(1).collect();
    let all = which.is_empty();
    println!("| measurement | result | baseline (same run) | ratio | target |");
    println!("|---|---|---|---|---|");
    if all || which.iter().any(|w| w == "publish") {
        bench_publish().context("publish benchmark")?;
    }
    if all || which.iter().any(|w| w == "mqtt") {
        for clients in [1000, 5000] {
            bench_mqtt_rss(clients).context("MQTT RSS benchmark")?;
        }
    }
    if all || which.iter().any(|w| w == "flood") {
        bench_flood().context("flood benchmark")?;
    }
    if all || which.iter().any(|w| w == "agent") {
        bench_agent_and_transfer().context("agent benchmark")?;
    }
    Ok(())
}
