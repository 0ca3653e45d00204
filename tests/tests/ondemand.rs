//! On-demand unikernels. Cold starts through the front proxy: with no
//! instance running, a connection boots one (QEMU through libvirt) and is held until it is
//! healthy, then answered by it; after the idle time the instance goes away again.

use anyhow::Result;
use std::io::Write;
use std::time::Duration;
use unifleet_tests::fleet::{running_domains, wait_for, Fleet};
use unifleet_tests::read_until;

const URI: &str = "qemu:///system";

#[test]
fn sequential_cold_starts_are_all_answered() -> Result<()> {
    let mut fleet = Fleet::new(URI)?;
    fleet.start_hub(&[])?;
    let name = format!("od-{}", std::process::id());
    let d = fleet.add_device(&name, "hello", &[])?;
    let port = fleet.devices[d].serve_on_demand(
        "hello",
        "min = 0\nmax_local = 2\nidle_secs = 0\nstable_window_secs = 1\npanic_window_secs = 1",
    )?;
    fleet.start_device(d)?;
    let img = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&img, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 1, "Active", Duration::from_secs(60))?;

    let prefix = format!("uf-{name}-hello-od");
    let cold_starts = 100;
    for k in 0..cold_starts {
        wait_for("zero on-demand instances", Duration::from_secs(30), || {
            running_domains(URI, &prefix).is_empty().then_some(())
        })?;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        s.write_all(b"hello?\n")?;
        let answer = read_until(&mut s, "HELLO hello 1.0.0", Duration::from_secs(20))
            .map_err(|e| e.context(format!("cold start {k}")))?;
        assert!(answer.contains("HELLO hello 1.0.0"));
    }
    // Every one of them was a cold start: one instance booted per connection.
    let log = fleet.devices[d].log_text();
    let boots = log
        .lines()
        .filter(|l| l.contains("starting on-demand instance"))
        .count();
    assert_eq!(boots, cold_starts, "100 of 100 sequential cold starts");
    Ok(())
}

/// A fleet with one device serving `hello` on demand; returns (fleet, device, proxy port).
fn on_demand_device(tag: &str, extra: &str) -> Result<(Fleet, usize, u16)> {
    unifleet_tests::fleet::on_demand_fleet(
        URI,
        &format!("{tag}-{}", std::process::id()),
        &format!("min = 0\nmax_local = 2\nidle_secs = 2\nstable_window_secs = 2\npanic_window_secs = 1\n{extra}"),
    )
}

#[test]
fn a_new_release_rolls_on_demand_instances_over() -> Result<()> {
    let (fleet, d, port) = on_demand_device("odr", "")?;
    // A client holds a connection to a 1.0.0 instance.
    let mut old = std::net::TcpStream::connect(("127.0.0.1", port))?;
    old.set_read_timeout(Some(Duration::from_millis(200)))?;
    old.write_all(b"one\n")?;
    read_until(&mut old, "HELLO hello 1.0.0", Duration::from_secs(30))?;
    // Release 2 arrives and is activated by the updater.
    let v2 = fleet.testimage("hello", "1.0.1", &[])?;
    fleet.publish(&v2, "hello", "1.0.1", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 2, "Active", Duration::from_secs(60))?;
    // New connections go to the new release ...
    let mut new = std::net::TcpStream::connect(("127.0.0.1", port))?;
    new.set_read_timeout(Some(Duration::from_millis(200)))?;
    new.write_all(b"two\n")?;
    read_until(&mut new, "HELLO hello 1.0.1", Duration::from_secs(30))?;
    // ... while the old one drains: its connection still works, on 1.0.0.
    old.write_all(b"still there?\n")?;
    let said = read_until(&mut old, "HELLO hello 1.0.0", Duration::from_secs(10))?;
    assert!(!said.contains("1.0.1"), "{said}");
    drop(old);
    let first = format!("uf-{}-hello-od1", fleet.devices[d].name);
    wait_for(
        "the drained 1.0.0 instance to stop",
        Duration::from_secs(20),
        || (!unifleet_tests::fleet::domain_running(URI, &first)).then_some(()),
    )?;
    Ok(())
}

/// Waits for the proxy to close `s` without an answer (read returns end of stream).
fn closed_unanswered(s: &mut std::net::TcpStream, within: Duration) -> Result<()> {
    use std::io::Read;
    s.set_read_timeout(Some(within))?;
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        other => anyhow::bail!("expected the proxy to close the connection, got {other:?}"),
    }
}

/// Connections held for an instance that cannot come (here: no instance may run) are not
/// held for ever, nor without bound: beyond `max_held` a connection is closed at once,
/// and each held one is closed after `hold_secs`, both said in the log and counted.
#[test]
fn held_connections_have_a_deadline_and_a_bound() -> Result<()> {
    let (fleet, d, port) = unifleet_tests::fleet::on_demand_fleet(
        "test:///default",
        &format!("held-{}", std::process::id()),
        "max_local = 0\nmax_remote = 0\nhold_secs = 1\nmax_held = 2",
    )?;
    let connect = || -> Result<std::net::TcpStream> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.write_all(b"hello?\n")?;
        Ok(s)
    };
    // Whichever of the three the pool hears of last is refused at once; the other two
    // after the deadline.
    let (mut first, mut second, mut third) = (connect()?, connect()?, connect()?);
    closed_unanswered(&mut third, Duration::from_secs(10))?;
    closed_unanswered(&mut first, Duration::from_secs(10))?;
    closed_unanswered(&mut second, Duration::from_secs(10))?;
    let log = fleet.devices[d].log_text();
    assert!(
        log.contains("connections are already held waiting for an instance"),
        "{log}"
    );
    assert!(log.contains("no instance became ready within 1 s"), "{log}");
    let m = fleet.devices[d].metrics_addr().expect("metrics on");
    assert_eq!(
        unifleet_tests::metric(&m, "unifleet_device_ondemand_refused_total")?,
        3
    );
    Ok(())
}
