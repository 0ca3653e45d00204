//! Devices in homes behind real NAT routers (network namespaces, nftables masquerade, tbf
//! uplinks; `scripts/netns.sh`): LAN neighbours trade first, cone homes punch through to
//! each other (relay v2 + DCUtR) and move chunks directly, the symmetric home falls back
//! to the hub, with the hub gone a LAN still spreads a release, and a home cut off from
//! the hub gets a release over the direct connection it punched before.

use anyhow::Result;
use serde_json::Value;
use std::time::Duration;
use unifleet_tests::fleet::{run, toml_value::V, wait_for, Fleet};
use unifleet_tests::homes::{Homes, HUB_IP};

const HOMES: [&str; 3] = ["a", "b", "c"];

/// A device's network counts from its newest report.
fn network(fleet: &Fleet, i: usize) -> Value {
    fleet.devices[i]
        .report("hello")
        .and_then(|r| r.get("network").cloned())
        .unwrap_or(Value::Null)
}

fn count(n: &Value, field: &str) -> u64 {
    n[field].as_u64().unwrap_or(0)
}

/// The hub in its namespace and the named devices in their homes, started, each holding
/// a slot on the hub's relay (they are all behind NAT).
fn fleet_in_homes(homes: &Homes, names: &[&str]) -> Result<(Fleet, Vec<usize>)> {
    let mut fleet = Fleet::new_in_netns("test:///default", &homes.ns("hub"), HUB_IP)?;
    fleet.start_hub(&[])?;
    let mut ids = vec![];
    for name in names {
        ids.push(fleet.add_device_in(&homes.ns(name), name, "hello")?);
    }
    for &i in &ids {
        start_behind_nat(&mut fleet, i)?;
    }
    Ok((fleet, ids))
}

/// Starts device `i` and waits for it to hold a slot on the hub's relay.
fn start_behind_nat(fleet: &mut Fleet, i: usize) -> Result<()> {
    fleet.start_device(i)?;
    let d = &fleet.devices[i];
    wait_for(
        &format!("{} to reserve a slot on the hub's relay", d.name),
        Duration::from_secs(30),
        || {
            d.log_text()
                .contains("reachable through the hub's relay")
                .then_some(())
        },
    )
}

#[test]
fn homes_behind_nat_trade_on_their_lan_first_punch_between_cone_homes_and_fall_back_to_the_hub(
) -> Result<()> {
    let homes = Homes::up(2, "20mbit")?;
    let names: Vec<String> = HOMES
        .iter()
        .flat_map(|h| (1..=2).map(move |k| format!("{h}{k}")))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (fleet, ids) = fleet_in_homes(&homes, &names)?;
    let image = fleet.testimage("hello", "1.0.0", &["--pad-mib", "4"])?;
    fleet.publish(&image, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&ids, "hello", 1, "Active", Duration::from_secs(180))?;

    let nets: Vec<Value> = ids.iter().map(|&i| network(&fleet, i)).collect();
    let mut table = String::from("device reachability lan direct relayed hub punches failed\n");
    for (name, n) in names.iter().zip(&nets) {
        table.push_str(&format!(
            "{name} {} {} {} {} {} {} {}\n",
            n["reachability"],
            count(n, "bytes_lan"),
            count(n, "bytes_direct"),
            count(n, "bytes_relayed"),
            count(n, "bytes_hub"),
            count(n, "hole_punches"),
            count(n, "hole_punch_failures"),
        ));
    }
    eprintln!("{table}");
    let of = |home: &str| -> Vec<&Value> {
        names
            .iter()
            .zip(&nets)
            .filter(|(n, _)| n.starts_with(home))
            .map(|(_, v)| v)
            .collect()
    };
    for home in HOMES {
        let lan: u64 = of(home).iter().map(|n| count(n, "bytes_lan")).sum();
        assert!(
            lan > 0,
            "home {home}'s devices traded nothing on their LAN:\n{table}"
        );
    }
    for n in &nets {
        assert_eq!(n["reachability"], "Relayed", "{table}");
        assert_eq!(
            count(n, "bytes_relayed"),
            0,
            "chunks crossed the relay:\n{table}"
        );
    }
    let cone: Vec<&Value> = of("a").into_iter().chain(of("c")).collect();
    assert!(
        cone.iter()
            .any(|n| count(n, "hole_punches") > 0 && count(n, "bytes_direct") > 0),
        "no cone-NAT device punched through and fetched directly:\n{table}"
    );
    for n in of("b") {
        // A symmetric NAT is never named across homes: it converged by its LAN and the hub.
        assert_eq!(count(n, "bytes_direct"), 0, "{table}");
        assert!(count(n, "bytes_hub") + count(n, "bytes_lan") > 0, "{table}");
    }

    // What an operator sees: the hub's inventory and `device status`.
    let inventory = fleet.inventory()?;
    for name in &names {
        let entry = inventory
            .as_object()
            .and_then(|m| m.values().find(|e| e["device"] == *name))
            .unwrap_or_else(|| panic!("{name} not in the inventory: {inventory}"));
        assert_eq!(entry["network"]["reachability"], "Relayed", "{entry}");
    }
    let status = run(std::process::Command::new(unifleet_tests::bin("device")?)
        .args(["status", "--config"])
        .arg(fleet.devices[ids[0]].config()))?;
    assert!(
        status.contains("network: reachable relayed; bytes by path: lan"),
        "{status}"
    );
    Ok(())
}

#[test]
fn with_the_hub_down_lan_neighbours_still_spread_a_release() -> Result<()> {
    let homes = Homes::up(2, "20mbit")?;
    let (mut fleet, ids) = fleet_in_homes(&homes, &["a1", "a2"])?;
    let (a1, a2) = (ids[0], ids[1]);
    let v1 = fleet.testimage("hello", "1.0.0", &["--pad-mib", "2"])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&ids, "hello", 1, "Active", Duration::from_secs(120))?;

    // a2 is off while release 2 comes out and a1 installs it; then the hub dies.
    fleet.devices[a2]
        .proc
        .as_mut()
        .expect("a2 runs")
        .terminate(Duration::from_secs(30))?;
    let v2 = fleet.testimage("hello", "1.0.1", &["--pad-mib", "2"])?;
    fleet.publish(&v2, "hello", "1.0.1", &["--no-staging"])?;
    fleet.wait_all(&[a1], "hello", 2, "Active", Duration::from_secs(120))?;
    fleet.kill_hub();

    // a2 comes back: no hub, no broker; it finds a1 by mDNS, learns of release 2 from it
    // and fetches it over the LAN.
    fleet.start_device(a2)?;
    fleet.wait_all(&[a2], "hello", 2, "Active", Duration::from_secs(120))?;
    let n = network(&fleet, a2);
    assert!(count(&n, "bytes_lan") > 0, "{n}");
    assert_eq!(count(&n, "bytes_hub"), 0, "{n}");
    Ok(())
}

#[test]
fn a_home_cut_off_from_the_hub_keeps_its_direct_connection_and_gets_a_release_over_it() -> Result<()>
{
    let homes = Homes::up(1, "20mbit")?;
    // Routers that forget an idle TCP mapping in 40 s, as some home routers do, and
    // agents that close an unused connection after 5 s: a direct connection survives the
    // wait below only if it is kept open and alive.
    const NAT_FORGETS: u32 = 40;
    for home in ["a", "c"] {
        homes.nat_forgets_idle_tcp_after(home, NAT_FORGETS)?;
    }
    let mut fleet = Fleet::new_in_netns("test:///default", &homes.ns("hub"), HUB_IP)?;
    fleet.start_hub(&[])?;
    let a1 = fleet.add_device_in(&homes.ns("a1"), "a1", "hello")?;
    let c1 = fleet.add_device_in(&homes.ns("c1"), "c1", "hello")?;
    for i in [a1, c1] {
        fleet.devices[i].set_config("idle_timeout_secs", V::Int(5))?;
    }

    // a1 has release 1 before c1 starts: the hub names a1 for every chunk, and c1 punches
    // through to it.
    start_behind_nat(&mut fleet, a1)?;
    let v1 = fleet.testimage("hello", "1.0.0", &["--pad-mib", "2"])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[a1], "hello", 1, "Active", Duration::from_secs(120))?;
    start_behind_nat(&mut fleet, c1)?;
    fleet.wait_all(&[c1], "hello", 1, "Active", Duration::from_secs(120))?;
    let n = network(&fleet, c1);
    assert!(
        count(&n, "hole_punches") > 0 && count(&n, "bytes_direct") > 0,
        "c1 did not fetch release 1 from a1 over a punched connection: {n}"
    );

    // Home a loses the hub; long past both timeouts, release 2 comes out. Only c1 can
    // tell a1 of it and send it the chunks, over the connection punched for release 1:
    // a1's NAT lets in no new connection, and the relay that would punch a new one is the
    // hub.
    homes.cut_off_hub("a")?;
    std::thread::sleep(Duration::from_secs(u64::from(NAT_FORGETS) + 10));
    let before = network(&fleet, a1);
    let v2 = fleet.testimage("hello", "1.0.1", &["--pad-mib", "2"])?;
    fleet.publish(&v2, "hello", "1.0.1", &["--no-staging"])?;
    fleet.wait_all(&[a1, c1], "hello", 2, "Active", Duration::from_secs(150))?;
    let after = network(&fleet, a1);
    assert_eq!(
        count(&after, "bytes_hub"),
        count(&before, "bytes_hub"),
        "a1 reached the hub through a cut: {after}"
    );
    assert!(
        count(&after, "bytes_direct") > count(&before, "bytes_direct"),
        "a1 got release 2 but not over its direct connection: {before} → {after}"
    );
    Ok(())
}
