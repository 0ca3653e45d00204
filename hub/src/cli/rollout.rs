//! `hub rollout`: where a release stands wave by wave; pause, resume or halt it.

use anyhow::{Context, Result};
use clap::Subcommand;
use hub::home::Home;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct RolloutTarget {
    app: String,
    #[arg(long, default_value = "stable")]
    channel: String,
    /// The release (default: the newest on the channel).
    #[arg(long)]
    release: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The release's waves, when each opens, and its devices per wave by state.
    Status {
        #[command(flatten)]
        target: RolloutTarget,
        #[arg(long)]
        json: bool,
    },
    /// Follow the release until every device it reaches runs it (exit 0) or it is
    /// held (exit 2): progress bars per wave on a terminal, a line per change otherwise.
    Watch {
        #[command(flatten)]
        target: RolloutTarget,
    },
    /// Stop devices that have not installed the release from starting it (devices that
    /// did keep it, and their health-based rollback); `resume` undoes it.
    Pause {
        #[command(flatten)]
        target: RolloutTarget,
        /// Why, for the event log and the devices' status.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Let a paused or halted release go on.
    Resume {
        #[command(flatten)]
        target: RolloutTarget,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Stop the release for good (as the automatic halt does); `resume` can still undo it.
    Halt {
        #[command(flatten)]
        target: RolloutTarget,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

pub fn run(dir: &Path, cmd: Command) -> Result<()> {
    use hub::rollout::HoldChange;
    use proto::rollout::HoldKind;
    let home = Home::open(dir)?;
    let (target, change, reason) = match cmd {
        Command::Status { target, json } => {
            let s = hub::rollout::status(&home, &target.app, &target.channel, target.release)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_rollout(&s);
            }
            return Ok(());
        }
        Command::Watch { target } => return rollout_watch(&home, &target),
        Command::Pause { target, reason } => (target, HoldChange::Hold(HoldKind::Paused), reason),
        Command::Halt { target, reason } => (target, HoldChange::Hold(HoldKind::Halted), reason),
        Command::Resume { target, reason } => (target, HoldChange::Resume, reason),
    };
    let (release, list) = hub::rollout::operator_change(
        &home,
        &target.app,
        &target.channel,
        target.release,
        change,
        &reason,
    )?;
    hub::control::reload_trust(&home, &mut |l| eprintln!("{l}"));
    let verb = match change {
        HoldChange::Hold(k) => k.label(),
        HoldChange::Resume => "resumed",
    };
    println!(
        "{} release {} on {} {verb} (hold list version {})",
        release.app, release.release, release.channel, list.version
    );
    Ok(())
}

fn print_rollout(s: &hub::rollout::RolloutStatus) {
    let now = hub::home::now();
    println!(
        "{} release {} on {}: waves {}, {} of seeds admitted now; signed {}",
        s.release.app,
        s.release.release,
        s.release.channel,
        s.waves,
        proto::rollout::share_text(s.admitted),
        hub::trust::human_ago(s.created_at, now)
    );
    if !s.targets.is_empty() {
        println!(
            "  targets {} ({} device(s) of the channel not targeted)",
            s.targets.join(", "),
            s.not_targeted
        );
    }
    if let Some(p) = s.halt_policy {
        println!(
            "  halts by itself at {}% failed of at least {} attempts",
            p.max_failure_percent, p.min_attempts
        );
    }
    if let Some(h) = &s.hold {
        println!(
            "  {} {}: {}",
            h.kind.label().to_uppercase(),
            hub::trust::human_ago(h.at, now),
            h.reason
        );
    }
    for w in &s.waves_detail {
        let opens = if w.opens_at <= now {
            format!("opened {}", hub::trust::human_ago(w.opens_at, now))
        } else {
            format!("opens in {}", hub::trust::human_secs(w.opens_at - now))
        };
        println!(
            "  wave to {:>7} {opens}: {} pending, {} downloading, {} active, {} failed, {} rolled back",
            proto::rollout::share_text(w.basis_points),
            w.pending,
            w.downloading,
            w.active,
            w.failed,
            w.rolled_back
        );
    }
}

/// `hub rollout watch`: polls the rollout once a second (the hub writes its inventory as
/// often).
fn rollout_watch(home: &Home, target: &RolloutTarget) -> Result<()> {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let bars = indicatif::MultiProgress::new();
    let style =
        indicatif::ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}")
            .context("progress bar template")?
            .progress_chars("=> ");
    let mut shown: Vec<indicatif::ProgressBar> = vec![];
    let mut last = String::new();
    loop {
        let s = hub::rollout::status(home, &target.app, &target.channel, target.release)?;
        let now = hub::home::now();
        let (mut total, mut active) = (0, 0);
        let mut lines = vec![];
        for (i, w) in s.waves_detail.iter().enumerate() {
            let n = w.total();
            total += n;
            active += w.active;
            let opens = if w.opens_at <= now {
                "open".to_string()
            } else {
                format!("opens {}", proto::status::human_ago(w.opens_at, now))
            };
            let msg = format!(
                "{opens}; {} pending, {} downloading, {} failed, {} rolled back",
                w.pending, w.downloading, w.failed, w.rolled_back
            );
            if tty {
                if shown.len() <= i {
                    let bar = bars.add(indicatif::ProgressBar::new(0));
                    bar.set_style(style.clone());
                    bar.set_prefix(format!("to {}", proto::rollout::share_text(w.basis_points)));
                    shown.push(bar);
                }
                shown[i].set_length(u64::from(n));
                shown[i].set_position(u64::from(w.active));
                shown[i].set_message(msg);
            } else {
                lines.push(format!(
                    "wave to {}: {}/{n} active, {msg}",
                    proto::rollout::share_text(w.basis_points),
                    w.active
                ));
            }
        }
        let text = lines.join("; ");
        if !tty && text != last {
            println!("{} release {}: {text}", s.release.app, s.release.release);
            last = text;
        }
        if let Some(h) = &s.hold {
            bars.clear().ok();
            anyhow::bail!(
                "{} release {} is {}: {}",
                s.release.app,
                s.release.release,
                h.kind.label(),
                h.reason
            );
        }
        let all_open = s.waves_detail.iter().all(|w| w.opens_at <= now);
        if all_open && total > 0 && active == total {
            for b in &shown {
                b.finish();
            }
            println!(
                "{} release {} runs on all {total} device(s) it reaches",
                s.release.app, s.release.release
            );
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
