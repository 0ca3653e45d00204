//! Which accelerator runs a release under QEMU, chosen by measurement (`domain_type =
//! "auto"`): KVM where the host offers it, unless a boot of the release on this host says
//! TCG is faster — as it is for port-I/O-heavy guests under nested virtualisation, where
//! every exit is expensive (the test kernel took 5.1 s to its first console line under
//! nested KVM here, 0.95 s under TCG).
//!
//! A trial boots the release once under each (to healthy: the release's own probe), one
//! after the other so they do not compete for the CPU, and stops both; the choice and the
//! figures behind it travel with the installed release (`store::Installed::accel`), so
//! restarts and the on-demand pool use it and `device status` says it.

use crate::hypervisor::{Hypervisor, Launch};
pub use crate::hypervisor::{KVM, TCG};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The accelerator a release runs under, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accel {
    /// libvirt's domain type: `kvm` or `qemu` (TCG).
    pub domain_type: String,
    /// For people: what the trial measured ("kvm 5.1 s, tcg 0.9 s to healthy").
    pub why: String,
}

/// What a trial boot under one domain type gave: its time to healthy, or why it failed.
pub type Trial = (&'static str, Result<Duration, String>);

/// People's name for a domain type.
fn label(domain_type: &str) -> &str {
    match domain_type {
        TCG => "tcg",
        other => other,
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// The faster of the trials that booted (KVM on a tie); with none, KVM, and the
/// activation that follows fails and says why.
pub fn choose(trials: &[Trial]) -> Accel {
    let booted = trials
        .iter()
        .filter_map(|(dt, r)| r.as_ref().ok().map(|d| (*dt, *d)));
    let best = booted.min_by_key(|&(dt, d)| (d, dt != KVM));
    let seen: Vec<String> = trials
        .iter()
        .map(|(dt, r)| match r {
            Ok(d) => format!("{} {}", label(dt), secs(*d)),
            Err(e) => format!("{} failed ({e})", label(dt)),
        })
        .collect();
    let seen = seen.join(", ");
    match best {
        Some((dt, _)) => Accel {
            domain_type: dt.into(),
            why: format!("{seen} to healthy: {} is faster here", label(dt)),
        },
        None => Accel {
            domain_type: KVM.into(),
            why: format!("no trial boot became healthy ({seen})"),
        },
    }
}

/// Boots `launch` under each accelerator the host offers and chooses; a host without
/// KVM gets TCG without a trial. `None` when libvirt cannot say what it offers: nothing
/// is decided on a guess (the hypervisor's default applies).
pub async fn measure(hv: &Hypervisor, launch: &Launch) -> Option<Accel> {
    match hv.offers(KVM).await {
        Ok(true) => {}
        Ok(false) => {
            return Some(Accel {
                domain_type: TCG.into(),
                why: "the host offers no KVM".into(),
            })
        }
        Err(e) => {
            tracing::warn!("not choosing an accelerator for {}: {e}", launch.name);
            return None;
        }
    }
    let mut trials = vec![];
    for dt in [KVM, TCG] {
        let mut trial = launch.clone();
        trial.name = format!("{}-try-{}", launch.name, label(dt));
        trial.console_log = launch
            .console_log
            .with_extension(format!("try-{}.log", label(dt)));
        trial.domain_type = Some(dt.into());
        let began = Instant::now();
        let res = crate::probe::boot(hv, &trial)
            .await
            .map(|_| began.elapsed());
        if let Err(e) = hv.stop(&trial.name).await {
            tracing::warn!("stopping the trial boot: {e}");
        }
        trials.push((dt, res.map_err(|e| e.to_string())));
    }
    Some(choose(&trials))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Result<Duration, String> {
        Ok(Duration::from_millis(n))
    }

    #[test]
    fn the_faster_accelerator_wins_and_says_why() {
        let nested = choose(&[(KVM, ms(5100)), (TCG, ms(950))]);
        assert_eq!(nested.domain_type, TCG);
        assert_eq!(
            nested.why,
            "kvm 5.1 s, tcg 0.9 s to healthy: tcg is faster here"
        );
        let bare = choose(&[(KVM, ms(120)), (TCG, ms(900))]);
        assert_eq!(bare.domain_type, KVM);
        assert_eq!(choose(&[(KVM, ms(500)), (TCG, ms(500))]).domain_type, KVM);
    }

    #[test]
    fn a_trial_that_fails_loses_and_none_booting_falls_back_to_kvm() {
        let one = choose(&[(KVM, Err("probe timed out".into())), (TCG, ms(900))]);
        assert_eq!(one.domain_type, TCG);
        assert!(
            one.why.contains("kvm failed (probe timed out)"),
            "{}",
            one.why
        );
        let none = choose(&[(KVM, Err("a".into())), (TCG, Err("b".into()))]);
        assert_eq!(none.domain_type, KVM);
        assert!(
            none.why.starts_with("no trial boot became healthy"),
            "{}",
            none.why
        );
    }

    #[tokio::test]
    async fn a_host_without_kvm_gets_tcg_without_a_trial() {
        let (hv, table) = crate::hypervisor::fake::Fake::hypervisor();
        let launch = crate::hypervisor::fake::launch("uf-d-a-r1");
        let accel = measure(&hv, &launch).await.unwrap();
        assert_eq!(accel.domain_type, TCG);
        assert_eq!(accel.why, "the host offers no KVM");
        assert!(table.lock().unwrap().started.is_empty(), "no trial boots");
        table.lock().unwrap().offers_kvm = true;
        let accel = measure(&hv, &launch).await.unwrap();
        let started = table.lock().unwrap().started.clone();
        assert_eq!(started, ["uf-d-a-r1-try-kvm", "uf-d-a-r1-try-tcg"]);
        assert!(table.lock().unwrap().running.is_empty(), "trials stopped");
        assert!(
            accel.why.contains("kvm ") && accel.why.contains("tcg "),
            "{}",
            accel.why
        );
    }
}
