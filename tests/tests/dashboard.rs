//! The fleet dashboard in a real browser (issue 18): headless Chromium driven by
//! Playwright (`tests/dashboard/rollout.mjs`; `scripts/setup.sh` installs both) opens a
//! running test fleet's pages, reads them without JavaScript, sees a rollout advance
//! live, presses "Halt" and sees the devices stop. Screenshots are kept in
//! `target/dashboard-screenshots/`.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use unifleet_tests::fleet::{run, running_fleet, wait_for, Fleet};
use unifleet_tests::{bin, free_port};

const CONVERGE: Duration = Duration::from_secs(90);

/// `tests/dashboard/`, where the script and its node_modules are.
fn script_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("dashboard")
}

fn screenshots() -> Result<PathBuf> {
    let target = bin("hub")?
        .parent()
        .and_then(|p| p.parent())
        .context("target directory")?
        .join("dashboard-screenshots");
    // Only this run's pictures: an old one must not pass for a new one.
    let _ = std::fs::remove_dir_all(&target);
    std::fs::create_dir_all(&target)?;
    Ok(target)
}

/// Runs `node rollout.mjs ARGS…`, failing with what it printed.
fn browser(args: &[&str]) -> Result<String> {
    let dir = script_dir();
    if !dir.join("node_modules/playwright-core").exists() {
        bail!(
            "{} has no node_modules: run scripts/setup.sh (npm ci there)",
            dir.display()
        );
    }
    let out = Command::new("node")
        .current_dir(&dir)
        .arg("rollout.mjs")
        .args(args)
        .output()
        .context("running node (scripts/setup.sh installs it)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("the browser test failed: {text}");
    }
    Ok(text)
}

/// A first-wave share admitting the one device of lowest seed.
fn one_device_share(fleet: &Fleet, ids: &[usize]) -> Result<(usize, String)> {
    let mut seeds = vec![];
    for &i in ids {
        let text = std::fs::read_to_string(fleet.devices[i].dir.join("device.pub"))?;
        seeds.push((
            proto::rollout::seed(&proto::PublicKey::from_text(&text)?),
            i,
        ));
    }
    seeds.sort();
    let bp = seeds[0].0 + 1;
    Ok((seeds[0].1, proto::rollout::share_text(bp)))
}

#[test]
fn the_dashboard_shows_a_rollout_live_and_its_halt_button_stops_the_devices() -> Result<()> {
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let http = format!("127.0.0.1:{port}");
    let (fleet, all) = running_fleet(
        "test:///default",
        &["--http", &http],
        "db",
        3,
        &["--tag", "lab"],
    )?;
    let token = std::fs::read_to_string(fleet.hub_dir.join("keys/http.token"))?;
    let out = screenshots()?;
    let out_s = out.to_str().context("screenshot path")?;

    // Release 1: one device now, the rest 20 s later, watched live.
    let (canary, share) = one_device_share(&fleet, &all)?;
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    let waves = format!("{share}@0,100%@20s");
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging", "--waves", &waves])?;
    fleet.wait_all(&[canary], "hello", 1, "Active", CONVERGE)?;
    wait_for(
        "the hub to write its inventory",
        Duration::from_secs(10),
        || {
            let inv = fleet.inventory().ok()?;
            (inv[format!("{}/hello", fleet.devices[canary].name)]["state"] == "active")
                .then_some(())
        },
    )?;
    browser(&["watch", &url, token.trim(), out_s, "3"])?;

    // Release 2: its first device installs it; the operator halts it from the page
    // before the next wave, and the other two hold back.
    let v2 = fleet.testimage("hello", "1.0.1", &[])?;
    let waves = format!("{share}@0,100%@1h");
    fleet.publish(&v2, "hello", "1.0.1", &["--no-staging", "--waves", &waves])?;
    fleet.wait_all(&[canary], "hello", 2, "Active", CONVERGE)?;
    // Issue 31: a page on another port of the same host (same *site*, so SameSite=Strict
    // sends the cookie) submits the halt form as it loads: refused, nothing halted.
    let attacker = attacker_page(&format!("{url}/rollouts/hello/stable/2/halt"))?;
    let said = browser(&["crossport", &url, token.trim(), out_s, &attacker, "2"])?;
    assert!(said.contains("cross-port form answered 403"), "{said}");
    let status = run(fleet.hub_cmd()?.args(["rollout", "status", "hello"]))?;
    assert!(!status.contains("HALTED"), "{status}");
    browser(&["halt", &url, token.trim(), out_s, "2", "2"])?;
    for &i in all.iter().filter(|&&i| i != canary) {
        assert_eq!(
            fleet.devices[i].release_state("hello"),
            Some((1, "Held".into()))
        );
    }
    for shot in [
        "devices-nojs",
        "rollout-first-wave",
        "rollout-done",
        "rollout-halted",
        "devices-held",
        "device-page",
        "cross-port-refused",
    ] {
        assert!(out.join(format!("{shot}.png")).is_file(), "no {shot}.png");
    }

    // Without the token nothing changes; with it, the API resumes the release, and the
    // two wait for their wave again.
    let path = "/api/rollouts/hello/stable/2/resume";
    assert!(post(port, path, None)?.starts_with("HTTP/1.1 401"));
    let ok = post(port, path, Some(token.trim()))?;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let rest: Vec<usize> = all.iter().copied().filter(|&i| i != canary).collect();
    fleet.wait_all(&rest, "hello", 1, "Waiting", Duration::from_secs(20))?;
    Ok(())
}

/// Serves, on another port of 127.0.0.1, a page whose form posts to `target` as soon as
/// it loads (as any app behind the on-demand proxy could); its address.
fn attacker_page(target: &str) -> Result<String> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}/", listener.local_addr()?);
    let body = format!(
        "<html><body><form method=post action=\"{target}\"></form>\
         <script>document.forms[0].submit()</script></body></html>"
    );
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(url)
}

/// A bare HTTP POST with no body; the whole answer.
fn post(port: u16, path: &str, token: Option<&str>) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}
