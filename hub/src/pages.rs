//! The dashboard's HTML, rendered on the server from a [`Snapshot`] (pure: data in,
//! markup out). Every page reads without JavaScript; with it, htmx's SSE extension swaps
//! the `devices` and `rollouts` fragments in as `hub serve` sends them.

use crate::inventory::DeviceEntry;
use crate::rollout::RolloutStatus;
use crate::trust::human_ago;
use crate::view::{DevicePage, Filter, ReleaseRow, Snapshot};
use maud::{html, Markup, DOCTYPE};
use proto::rollout::share_text;
use proto::status::{human_bytes, human_secs};

/// The page frame: title, navigation, the vendored scripts, and a banner for each
/// warning the operator must act on (a trust root expired or expiring).
fn page(fleet: &str, warnings: &[String], title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · unifleet " (fleet) }
                link rel="stylesheet" href="/assets/style.css";
                script src="/assets/htmx.min.js" defer {}
                script src="/assets/sse.min.js" defer {}
            }
            body {
                header {
                    strong { "unifleet · " (fleet) }
                    nav {
                        a href="/" { "Devices" }
                        a href="/releases" { "Releases" }
                        a href="/rollouts" { "Rollouts" }
                    }
                }
                @for w in warnings { p class="banner" role="alert" { (w) } }
                main { h1 { (title) } (body) }
            }
        }
    }
}

/// `/`: every device, filtered by tag and state, live.
pub fn devices(s: &Snapshot, filter: &Filter) -> Markup {
    let query = serde_urlencoded(filter);
    page(
        &s.fleet,
        &s.warnings,
        "Devices",
        html! {
            form method="get" action="/" class="filter" {
                label { "Tag " input name="tag" value=(filter.tag); }
                label { "State " input name="state" value=(filter.state) placeholder="active, held, rolled-back…"; }
                button type="submit" { "Filter" }
            }
            div hx-ext="sse" sse-connect={ "/events?" (query) } {
                div id="devices" sse-swap="devices" { (devices_table(s, filter)) }
            }
        },
    )
}

/// The devices table (also sent alone as the `devices` event).
pub fn devices_table(s: &Snapshot, filter: &Filter) -> Markup {
    let shown: Vec<&DeviceEntry> = s.devices.iter().filter(|e| filter.matches(e)).collect();
    html! {
        p class="count" { (shown.len()) " of " (s.devices.len()) " device(s)" }
        table {
            thead { tr {
                th { "Device" } th { "Tags" } th { "App" } th { "Running" } th { "Target" }
                th { "State" } th { "Last seen" } th { "From peers" } th { "From hub" } th { "Reachable" }
                th { "Hosted" }
            } }
            tbody {
                @for e in shown {
                    tr data-device=(e.device) data-state=(e.state) {
                        td { a href={ "/devices/" (e.device) } { (e.device) } }
                        td { (e.tags.join(", ")) }
                        td { (e.app) " (" (e.channel) ")" }
                        td { (e.release.map_or("-".into(), |r| format!("r{r}"))) " " (e.version.clone().unwrap_or_default()) }
                        td { (target(s, e)) }
                        td class={ "state " (e.state) } { (e.state) @if !e.detail.is_empty() { " " small { (e.detail) } } }
                        td title=(crate::trust::human_time(e.last_seen)) { (human_ago(e.last_seen, s.now)) }
                        td { (human_bytes(e.bytes_from_peers)) }
                        td { (human_bytes(e.bytes_from_hub)) }
                        td { (e.network.map_or("unknown", |n| n.reachability.label())) }
                        (hosted_cell(e))
                    }
                }
            }
        }
    }
}

/// What an on-demand app uses of the hosted host: instances now, instance time and
/// connections since the agent started, or why the host is not used.
fn hosted_cell(e: &DeviceEntry) -> Markup {
    let (Some(c), Some(h)) = (&e.ondemand, &e.hosted) else {
        return html! { td { "-" } };
    };
    html! {
        td class="hosted" title=(h.summary()) {
            (c.remote) " running, " (human_secs(h.instance_ms / 1000)) ", " (h.connections) " conns"
            @if let Some(why) = &h.down { br; small class="hosted-down" { "unavailable: " (why) } }
        }
    }
}

/// The newest release of a device's (app, channel): what it is meant to run.
fn target(s: &Snapshot, e: &DeviceEntry) -> String {
    s.rollouts
        .iter()
        .find(|r| r.release.app == e.app && r.release.channel == e.channel)
        .map_or("-".into(), |r| format!("r{}", r.release.release))
}

/// `/releases`: per app and channel, newest first, with staging evidence, waves and who
/// runs each.
pub fn releases(s: &Snapshot) -> Markup {
    page(
        &s.fleet,
        &s.warnings,
        "Releases",
        html! {
            table {
                thead { tr {
                    th { "App" } th { "Channel" } th { "Release" } th { "Version" } th { "Platforms" }
                    th { "Staging" } th { "Waves" } th { "Signed" } th { "Source" } th { "Running on" }
                } }
                tbody {
                    @for r in &s.releases {
                        tr {
                            td { (r.app) } td { (r.channel) } td { "r" (r.release) } td { (r.version) }
                            td { (r.platforms.join(", ")) } td { (r.staging) } td { (r.waves) }
                            td title=(crate::trust::human_time(r.created_at)) { (human_ago(r.created_at, s.now)) }
                            td { (source(r)) }
                            td { (r.running.len()) @if !r.running.is_empty() { ": " (r.running.join(", ")) } }
                        }
                    }
                }
            }
        },
    )
}

/// Where a release came from: the pushed commit, with links to its build log and SBOM;
/// `prebuilt` for an image given to `hub publish`.
fn source(r: &ReleaseRow) -> Markup {
    let link = |d: &Option<proto::Digest>, text: &str| {
        html! { @if let Some(d) = d { " " a href={ "/provenance/" (d.to_hex()) } { (text) } } }
    };
    html! {
        @match &r.commit {
            Some(c) => { code title=(c) { (c.get(..12).unwrap_or(c)) } (link(&r.log, "log")) (link(&r.sbom, "SBOM")) }
            None => "prebuilt",
        }
    }
}

/// `/rollouts`: per app and channel, the newest release wave by wave, live, with the
/// pause, halt and resume buttons.
pub fn rollouts(s: &Snapshot, signed_in: bool) -> Markup {
    page(
        &s.fleet,
        &s.warnings,
        "Rollouts",
        html! {
            @if !signed_in {
                p class="note" { "Reading only. " a href="/login" { "Sign in with the API token" } " to pause, halt or resume." }
            }
            div hx-ext="sse" sse-connect="/events" {
                div id="rollouts" sse-swap="rollouts" { (rollouts_panel(s, signed_in)) }
            }
        },
    )
}

/// The rollouts (also sent alone as the `rollouts` event).
pub fn rollouts_panel(s: &Snapshot, signed_in: bool) -> Markup {
    html! {
        @if s.rollouts.is_empty() { p { "No releases yet." } }
        @for r in &s.rollouts { (rollout(r, s.now, signed_in)) }
    }
}

fn rollout(r: &RolloutStatus, now: u64, signed_in: bool) -> Markup {
    let k = &r.release;
    let total: u32 = r
        .waves_detail
        .iter()
        .map(crate::rollout::WaveCounts::total)
        .sum();
    let active: u32 = r.waves_detail.iter().map(|w| w.active).sum();
    let action = |verb: &str| format!("/rollouts/{}/{}/{}/{verb}", k.app, k.channel, k.release);
    html! {
        section class="rollout" data-app=(k.app) data-release=(k.release) {
            h2 { (k.app) " on " (k.channel) ": release " (k.release) }
            p {
                "Waves " code { (r.waves) } ", signed " (human_ago(r.created_at, now))
                ", " (share_text(r.admitted)) " of seeds admitted now."
                @if !r.targets.is_empty() { " Targets " (r.targets.join(", ")) " (" (r.not_targeted) " not targeted)." }
                @if let Some(p) = r.halt_policy { " Halts at " (p.max_failure_percent) "% failed of at least " (p.min_attempts) " attempts." }
            }
            p class="overall" {
                progress value=(active) max=(total.max(1)) {}
                " " span class="active-count" { (active) } " of " (total) " active"
            }
            @if let Some(h) = &r.hold {
                p class={ "hold " (h.kind.label()) } {
                    strong { (h.kind.label().to_uppercase()) } " " (human_ago(h.at, now)) ": " (h.reason)
                }
            }
            table {
                thead { tr { th { "Wave" } th { "Opens" } th { "Pending" } th { "Downloading" } th { "Active" } th { "Failed" } th { "Rolled back" } th {} } }
                tbody {
                    @for w in &r.waves_detail {
                        @let n = w.total();
                        tr {
                            td { "to " (share_text(w.basis_points)) }
                            td { (human_ago(w.opens_at, now)) }
                            td { (w.pending) } td { (w.downloading) } td { (w.active) } td { (w.failed) } td { (w.rolled_back) }
                            td { progress value=(w.active) max=(n.max(1)) {} }
                        }
                    }
                }
            }
            @if signed_in {
                div class="actions" {
                    @if r.hold.is_some() {
                        form method="post" action=(action("resume")) { button name="do" value="resume" { "Resume" } }
                    } @else {
                        form method="post" action=(action("pause")) { button name="do" value="pause" { "Pause" } }
                        form method="post" action=(action("halt")) { button name="do" value="halt" class="danger" { "Halt" } }
                    }
                }
            }
        }
    }
}

/// `/devices/NAME`: the device's entries, its last signed reports and console tails, and
/// its history from the git log.
pub fn device(fleet: &str, d: &DevicePage) -> Markup {
    page(
        fleet,
        &d.warnings,
        &format!("Device {}", d.name),
        html! {
            @for e in &d.entries {
                h2 { (e.app) " on " (e.channel) }
                p {
                    (e.state) " on " (e.release.map_or("nothing yet".into(), |r| format!("release {r}")))
                    ", last seen " (human_ago(e.last_seen, d.now))
                    @if !e.tags.is_empty() { "; tags " (e.tags.join(", ")) }
                    @if let Some(n) = e.network { "; " (n.summary()) }
                }
                @if let Some(c) = &e.ondemand { p class="ondemand" { "On demand: " (c.summary()) } }
                @if let Some(h) = &e.hosted { p class="hosted" { "Hosted: " (h.summary()) } }
            }
            @for r in &d.reports {
                h2 { "Last signed report of " (r.app) " (#" (r.seq) ", " (human_ago(r.at, d.now)) ")" }
                p class="report-state" { (r.state.describe(d.now)) }
                pre class="report" { (serde_json::to_string_pretty(&r.state).unwrap_or_default()) }
                h3 { "Console" }
                pre class="console" { (if r.console_tail.is_empty() { "(empty)" } else { &r.console_tail }) }
            }
            h2 { "History" }
            table {
                thead { tr { th { "When" } th { "Event" } th { "Release" } th { "Detail" } } }
                tbody {
                    @for e in &d.events {
                        tr {
                            td title=(crate::trust::human_time(e.at)) { (human_ago(e.at, d.now)) }
                            td { (e.kind) }
                            td { (e.release.map_or(String::new(), |r| format!("r{r}"))) }
                            td { (e.detail) }
                        }
                    }
                }
            }
        },
    )
}

/// `/login`: the API token, kept in a cookie for the buttons.
pub fn login(fleet: &str, failed: bool) -> Markup {
    page(
        fleet,
        &[],
        "Sign in",
        html! {
            @if failed { p class="hold halted" { "That token is not this hub's." } }
            form method="post" action="/login" {
                label { "API token (in the hub's keys/http.token) " input type="password" name="token" autofocus; }
                button type="submit" { "Sign in" }
            }
        },
    )
}

/// `tag=a&state=b` for the SSE URL (names are `[a-z0-9._-]`; anything else is dropped).
fn serde_urlencoded(f: &Filter) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
            .collect()
    };
    format!("tag={}&state={}", clean(&f.tag), clean(&f.state))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(device: &str, state: &str, tags: &[&str]) -> DeviceEntry {
        DeviceEntry {
            device: device.into(),
            app: "hello".into(),
            channel: "stable".into(),
            release: Some(1),
            version: Some("1.0.0".into()),
            manifest: None,
            state: state.into(),
            detail: String::new(),
            last_seen: 988,
            seq: 1,
            bytes_from_peers: 2_100_000,
            bytes_from_hub: 0,
            ondemand: None,
            hosted: None,
            network: None,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            failed_release: None,
            platform: None,
        }
    }

    #[test]
    fn the_devices_table_filters_by_tag_and_state_and_speaks_human() {
        let s = Snapshot {
            now: 1000,
            fleet: "home".into(),
            devices: vec![
                entry("d1", "active", &["beta"]),
                entry("d2", "held", &["kitchen"]),
                entry("<script>", "active", &[]),
            ],
            releases: vec![],
            rollouts: vec![],
            warnings: vec![],
        };
        let all = devices_table(&s, &Filter::default()).into_string();
        assert!(all.contains("3 of 3 device(s)"), "{all}");
        assert!(all.contains("12s ago"), "{all}");
        assert!(all.contains("2.1 MB"), "{all}");
        assert!(!all.contains("<script>"), "names are escaped: {all}");
        let beta = devices_table(
            &s,
            &Filter {
                tag: "beta".into(),
                state: String::new(),
            },
        )
        .into_string();
        assert!(beta.contains("1 of 3") && beta.contains("d1") && !beta.contains("d2"));
        let held = devices_table(
            &s,
            &Filter {
                tag: String::new(),
                state: "held".into(),
            },
        )
        .into_string();
        assert!(held.contains("d2") && !held.contains(">d1<"));
    }

    /// Issue 30: what an app's instances on the hosted host served, and why the host is
    /// not used, are in the devices table (escaped: the reason is the device's text).
    #[test]
    fn the_devices_table_shows_hosted_use_and_why_it_is_down() {
        let mut d = entry("d1", "active", &[]);
        d.ondemand = Some(proto::status::OnDemandCounts {
            remote: 1,
            ..Default::default()
        });
        d.hosted = Some(proto::status::HostedUse {
            instance_ms: 200_500,
            connections: 57,
            down: Some("no route to <host>".into()),
        });
        let s = Snapshot {
            now: 1000,
            fleet: "home".into(),
            devices: vec![d, entry("d2", "active", &[])],
            releases: vec![],
            rollouts: vec![],
            warnings: vec![],
        };
        let html = devices_table(&s, &Filter::default()).into_string();
        assert!(html.contains("1 running, 3m 20s, 57 conns"), "{html}");
        assert!(
            html.contains("unavailable: no route to &lt;host&gt;"),
            "{html}"
        );
        assert!(html.contains("<td>-</td>"), "a device without: {html}");
    }

    /// Issue 32: an expired root is a banner on every fleet page, not only a log line.
    #[test]
    fn a_warning_is_a_banner_on_every_page() {
        let s = Snapshot {
            now: 1000,
            fleet: "home".into(),
            devices: vec![],
            releases: vec![],
            rollouts: vec![],
            warnings: vec!["the trust root (version 1) expired on <date>".into()],
        };
        for page in [
            devices(&s, &Filter::default()),
            releases(&s),
            rollouts(&s, false),
        ] {
            let html = page.into_string();
            assert!(
                html.contains(r#"<p class="banner" role="alert">the trust root (version 1) expired on &lt;date&gt;</p>"#),
                "{html}"
            );
        }
        let quiet = Snapshot {
            warnings: vec![],
            ..s
        };
        assert!(!releases(&quiet).into_string().contains("banner"));
    }
}
