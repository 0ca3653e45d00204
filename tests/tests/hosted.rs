//! Bursting to a hosted host that is another machine: its own libvirtd and virtlogd in a
//! network namespace (`scripts/hosted-libvirt.sh`), reached over libvirt's TLS transport
//! across a routed link, with the image uploaded into its storage pool through libvirt and
//! clients' traffic routed to the guest's own address there. The device serves locally up
//! to `max_local`, then bursts.

use anyhow::{bail, Context, Result};
use std::io::BufReader;
use std::net::TcpStream;
use std::time::Duration;
use unifleet_tests::fleet::{run, running_domains, wait_for};
use unifleet_tests::hosted::{burst_fleet, client, lines, two_clients, Burst, HOSTED_MAC, URI};
use unifleet_tests::http::answer_of;

#[test]
fn a_burst_goes_to_a_hosted_host_over_tls_with_its_image_uploaded_and_traffic_routed() -> Result<()>
{
    let mut b = burst_fleet("hb", 1, 2, |h| h.table.clone())?;
    let res = burst_and_back(&mut b);
    res.map_err(|e| e.context(format!("device log:\n{}", b.log())))
}

fn burst_and_back(b: &mut Burst) -> Result<()> {
    // The first client is answered locally; the second, with the local maximum
    // reached, by an instance on the hosted host, over the routed link.
    let [(local, mine), (hosted, theirs)] = two_clients(b.port)?;
    assert!(!mine.ends_with("00:71:e2"), "local first: {mine}");
    assert_eq!(
        theirs, HOSTED_MAC,
        "the second client reaches the hosted guest"
    );
    let on_host = b.host.domains(&b.hosted_prefix)?;
    assert_eq!(on_host.len(), 1, "{on_host:?}");
    assert!(
        running_domains(URI, &on_host[0]).is_empty(),
        "it is not a local domain"
    );
    // The domain names only paths on that host: the kernel is the uploaded volume.
    let xml = b.host.virsh(&["dumpxml", &on_host[0]])?;
    let volumes = b.host.volumes()?;
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    let vol_path = b
        .host
        .virsh(&["vol-path", "--pool", "unifleet", &volumes[0]])?;
    assert!(
        xml.contains(&format!("<kernel>{}</kernel>", vol_path.trim())),
        "{xml}"
    );
    assert!(
        xml.contains(&b.fleet.devices[b.d].name),
        "metadata names the device: {xml}"
    );
    assert!(
        !xml.contains(&b.fleet.devices[b.d].dir.display().to_string()),
        "{xml}"
    );
    assert_eq!(
        lines(&b.log(), "image uploaded to the hosted host and checked"),
        1
    );

    // The hosted libvirtd restarts under a live connection: the guest keeps serving it.
    b.host.restart_libvirtd()?;
    let mut hosted = hosted;
    assert_eq!(answer_of(&mut hosted, "1.0.0")?, HOSTED_MAC);
    drop((hosted, local));
    // Scaled down, the hosted one first, through the daemon's new connection: none leaks.
    b.no_hosted_domains(Duration::from_secs(60))?;
    wait_for("no local instance", Duration::from_secs(60), || {
        running_domains(URI, &b.prefix).is_empty().then_some(())
    })?;
    let log = b.log();
    let stops: Vec<bool> = log
        .lines()
        .filter(|l| l.contains("stopping on-demand instance app="))
        .map(|l| l.contains("at=Remote"))
        .collect();
    assert_eq!(stops, [true, false], "hosted first: {log}");
    // The first call after the restart found the old connection dead: it failed, and the
    // domain waited for a sweep. It is made again on a new connection.
    assert_eq!(lines(&log, "stopping on-demand instance:"), 0, "{log}");

    // A second burst boots from the same volume: nothing is uploaded again.
    let [_, (_hosted, theirs)] = two_clients(b.port)?;
    assert_eq!(theirs, HOSTED_MAC);
    assert_eq!(
        lines(&b.log(), "image uploaded to the hosted host and checked"),
        1
    );
    assert_eq!(b.host.volumes()?.len(), 1);

    // What the hosted host served is in the signed reports, at the hub.
    let name = b.fleet.devices[b.d].name.clone();
    let h = wait_for("hosted use at the hub", Duration::from_secs(60), || {
        let inv = b.fleet.inventory().ok()?;
        let e = inv
            .as_object()?
            .values()
            .find(|e| e["device"] == name.as_str())?;
        let h = e["hosted"].clone();
        (h["connections"].as_u64()? >= 1 && h["instance_ms"].as_u64()? > 0).then_some(h)
    })?;
    assert!(h["down"].is_null(), "{h}");
    assert_eq!(b.metric("unifleet_device_ondemand_remote_instances")?, 1);
    assert_eq!(b.metric("unifleet_device_ondemand_boots_total")?, 4);
    let devices = run(b.fleet.hub_cmd()?.arg("devices"))?;
    assert!(devices.contains("of instance time"), "{devices}");

    // The agent killed mid-burst and started again: what it left there is found by its
    // metadata and stopped.
    b.fleet.devices[b.d].proc.as_mut().context("agent")?.kill9();
    b.fleet.start_device(b.d)?;
    b.no_hosted_domains(Duration::from_secs(60))?;
    assert!(b
        .log()
        .contains("stopping a domain of this device the hosted host still runs"));

    // A new release retires the old image on the hosted host.
    b.publish("1.0.1", 2)?;
    wait_for(
        "the release 1 image deleted from the hosted host",
        Duration::from_secs(30),
        || {
            b.host
                .volumes()
                .ok()?
                .iter()
                .all(|v| !v.contains("-r1-"))
                .then_some(())
        },
    )?;
    Ok(())
}

/// Reads until the proxy closes `r`'s connection; fails if it answers instead.
fn closed(r: &mut BufReader<TcpStream>) -> Result<()> {
    use std::io::Read;
    let mut buf = [0u8; 64];
    match r.get_mut().read(&mut buf) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        other => bail!("expected the connection closed, got {other:?}"),
    }
}

/// Three clients at `target = 2`: the third is held (the hosted host takes none), then
/// served by the local instance too once the first leaves.
fn served_locally_twice(b: &Burst) -> Result<()> {
    let (first, mine) = client(b.port, "1.0.0")?;
    let (_second, also) = client(b.port, "1.0.0")?;
    assert_eq!(also, mine);
    let port = b.port;
    let third = std::thread::spawn(move || client(port, "1.0.0"));
    std::thread::sleep(Duration::from_secs(3));
    drop(first);
    let (_third, again) = third.join().expect("client")?;
    assert_eq!(again, mine, "served by the local instance");
    Ok(())
}

/// Waits until the last report says why the hosted host is not used, and that says `what`.
fn down_because(b: &Burst, what: &str) -> Result<String> {
    wait_for(
        &format!("the report saying {what:?}"),
        Duration::from_secs(60),
        || {
            let down = b.hosted_use()["down"].as_str()?.to_string();
            down.contains(what).then_some(down)
        },
    )
}

#[test]
fn a_hosted_host_unreachable_or_refusing_leaves_local_serving_and_says_why() -> Result<()> {
    let mut b = burst_fleet("hu", 2, 30, |h| h.table_with_client("wrong-client"))?;
    let res = faults(&mut b);
    res.map_err(|e| e.context(format!("device log:\n{}", b.log())))
}

fn faults(b: &mut Burst) -> Result<()> {
    // A client certificate of another CA: refused in the TLS handshake, said in the
    // report and by `device status`; every client is answered locally.
    let dev = b.fleet.devices[b.d].config();
    served_locally_twice(b)?;
    down_because(b, "certificate")?;
    let status = run(std::process::Command::new(unifleet_tests::bin("device")?)
        .args(["status", "--config"])
        .arg(&dev))?;
    assert!(status.contains("hosted host unavailable"), "{status}");
    // The device's TLS key is never logged.
    let key = std::fs::read_to_string(b.host.client_dir().join("../wrong-client/clientkey.pem"))?;
    let body = key.lines().nth(1).context("a PEM body")?;
    assert!(!b.log().contains(body));

    // The right certificate, the link down before a burst: local serves, the reason is
    // the route.
    b.fleet.devices[b.d].proc.as_mut().context("agent")?.kill9();
    let text = std::fs::read_to_string(&dev)?.replace("wrong-client", "client");
    std::fs::write(&dev, text)?;
    b.host.link(false)?;
    b.fleet.start_device(b.d)?;
    wait_for("the proxy", Duration::from_secs(60), || {
        TcpStream::connect(("127.0.0.1", b.port)).ok()
    })?;
    served_locally_twice(b)?;
    down_because(b, "203.0.113.194")?;

    // The link back: the pool tries the host again (backoff) and bursts to it.
    b.host.link(true)?;
    let (a1, local) = client(b.port, "1.0.0")?;
    let (_a2, _) = client(b.port, "1.0.0")?;
    let (b1, b2) = wait_for(
        "a burst to the hosted host",
        Duration::from_secs(120),
        || {
            let b1 = client(b.port, "1.0.0")
                .ok()
                .filter(|(_, i)| i == HOSTED_MAC)?;
            let b2 = client(b.port, "1.0.0")
                .ok()
                .filter(|(_, i)| i == HOSTED_MAC)?;
            Some((b1, b2))
        },
    )?;
    // The link down during the burst: the next connection handed to the hosted instance
    // cannot reach it; the instance is given up, the connection still open to it is
    // closed and counted, and the new one is served locally once there is room.
    drop(b1);
    b.host.link(false)?;
    let port = b.port;
    let c = std::thread::spawn(move || client(port, "1.0.0"));
    let (mut b2, _) = b2;
    closed(&mut b2)?;
    drop(a1);
    let (_c, served) = c.join().expect("client")?;
    assert_eq!(served, local, "served by the local instance");
    // The one open connection, closed; not the new one, which found the instance
    // unreachable and was served elsewhere (it was counted too, once).
    assert_eq!(b.metric("unifleet_device_ondemand_lost_total")?, 1);
    down_because(b, "cannot be reached")?;
    // The domain left there while it was unreachable is stopped once it is back.
    b.host.link(true)?;
    b.no_hosted_domains(Duration::from_secs(90))?;
    Ok(())
}
