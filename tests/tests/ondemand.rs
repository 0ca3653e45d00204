//! Issue: on-demand unikernels (in progress). Cold starts through the front proxy: with no
//! instance running, a connection boots one (QEMU through libvirt) and is held until it is
//! healthy, then answered by it; after the idle time the instance goes away again.

use anyhow::Result;
use std::io::Write;
use std::time::Duration;
use unifleet_tests::fleet::{running_domains, wait_for, Fleet};
use unifleet_tests::{free_port, read_until};

const URI: &str = "qemu:///system";

#[test]
fn sequential_cold_starts_are_all_answered() -> Result<()> {
    let mut fleet = Fleet::new(URI)?;
    fleet.start_hub(&[])?;
    let name = format!("od-{}", std::process::id());
    let d = fleet.add_device(&name, "hello", &[])?;
    let port = free_port()?;
    let cfg = fleet.devices[d].config();
    let mut text = std::fs::read_to_string(&cfg)?;
    text.push_str(&format!(
        "\n[[ondemand]]\napp = \"hello\"\nlisten = \"127.0.0.1:{port}\"\nmin = 0\nmax_local = 2\nidle_secs = 1\nstable_window_secs = 1\npanic_window_secs = 1\n"
    ));
    std::fs::write(&cfg, text)?;
    fleet.start_device(d)?;
    let img = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&img, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 1, "Active", Duration::from_secs(60))?;

    let prefix = format!("uf-{name}-hello-od");
    let cold_starts = 10;
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
    Ok(())
}
