//! A hypervisor for unit tests: domains are entries in a table the test can read and
//! change (kill one, refuse the next start), behind the same owner thread as libvirt.

use super::{ActivateError, Backend, Driver, Hypervisor, Launch, Started};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// What the fake knows, shared with the test.
#[derive(Debug, Default)]
pub struct Table {
    /// Running domains and the launch each was started with.
    pub running: BTreeMap<String, Launch>,
    /// Every start, in order (domain names).
    pub started: Vec<String>,
    /// Every stop of a running domain, in order.
    pub stopped: Vec<String>,
    /// Paused domains.
    pub paused: Vec<String>,
    /// Whether the fake host offers KVM.
    pub offers_kvm: bool,
    /// Domains that stop right after they start (an image that crashes at boot).
    pub dies: std::collections::BTreeSet<String>,
    /// Starting these fails as an unreachable libvirt would.
    pub unreachable: std::collections::BTreeSet<String>,
    /// Starting these panics (as virt's handles can).
    pub panics: std::collections::BTreeSet<String>,
    /// The address each guest gets when started with a network interface.
    pub address: Option<IpAddr>,
}

/// A fake backend and the handle on its table.
#[derive(Debug, Clone, Default)]
pub struct Fake {
    pub table: Arc<Mutex<Table>>,
}

impl Fake {
    /// A [`Hypervisor`] over a fresh fake (the test driver's rules: running is healthy).
    pub fn hypervisor() -> (Hypervisor, Arc<Mutex<Table>>) {
        let fake = Fake::default();
        let table = fake.table.clone();
        (Hypervisor::spawn("fake:///", fake), table)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for Fake {
    fn driver(&self) -> Driver {
        Driver::Test
    }

    fn start(&mut self, launch: &Launch) -> Result<Started, ActivateError> {
        let mut t = self.table();
        if t.panics.contains(&launch.name) {
            drop(t);
            panic!("the fake panics starting {}", launch.name);
        }
        if t.unreachable.contains(&launch.name) {
            return Err(ActivateError::Gone {
                uri: "fake:///".into(),
            });
        }
        t.started.push(launch.name.clone());
        if !t.dies.contains(&launch.name) {
            t.running.insert(launch.name.clone(), launch.clone());
        }
        Ok(Started { console_port: 0 })
    }

    fn running(&mut self, name: &str) -> Result<bool, ActivateError> {
        Ok(self.table().running.contains_key(name))
    }

    fn stop(&mut self, name: &str) -> Result<(), ActivateError> {
        let mut t = self.table();
        if t.running.remove(name).is_some() {
            t.stopped.push(name.into());
        }
        Ok(())
    }

    fn pause(&mut self, name: &str) -> Result<(), ActivateError> {
        self.table().paused.push(name.into());
        Ok(())
    }

    fn resume(&mut self, name: &str) -> Result<(), ActivateError> {
        self.table().paused.retain(|n| n != name);
        Ok(())
    }

    fn named(&mut self, prefix: &str) -> Result<Vec<String>, ActivateError> {
        let t = self.table();
        Ok(t.running
            .keys()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect())
    }

    fn offers(&mut self, domain_type: &str) -> Result<bool, ActivateError> {
        Ok(domain_type != "kvm" || self.table().offers_kvm)
    }

    fn retire(&mut self, _app: &str, _keep: Option<&Launch>) -> Result<u32, ActivateError> {
        Ok(0)
    }

    fn address(&mut self, name: &str) -> Result<Option<IpAddr>, ActivateError> {
        let t = self.table();
        Ok(t.running.get(name).and(t.address))
    }
}

/// A launch of the test image's shape named `name` (a console probe, no network).
pub fn launch(name: &str) -> Launch {
    use proto::manifest::{BootSpec, HealthProbe, Platform};
    Launch {
        name: name.into(),
        of: super::ReleaseOf {
            app: "a".into(),
            release: 1,
            image: proto::Digest::of(b"image"),
        },
        platform: Platform::QemuX86_64,
        image: "/nonexistent/image".into(),
        boot: BootSpec {
            memory_mib: 16,
            vcpus: 1,
            cmdline: String::new(),
            probe: HealthProbe::ConsoleBanner {
                line: "READY".into(),
            },
            probe_timeout_ms: 1000,
            network: false,
        },
        console_log: format!("/nonexistent/{name}.log").into(),
        nic: None,
        domain_type: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command that panicked took the owner thread with it: every later call answered
    /// "gone" and the watchdog went blind.
    #[tokio::test]
    async fn a_command_that_panics_fails_alone() {
        let (hv, table) = Fake::hypervisor();
        table.lock().unwrap().panics.insert("uf-d1-a-r1".into());
        let err = hv.start(&launch("uf-d1-a-r1")).await.unwrap_err();
        assert!(
            matches!(err, ActivateError::Panicked { op: "start" }),
            "{err}"
        );
        hv.start(&launch("uf-d1-a-r2")).await.unwrap();
        assert!(hv.is_running("uf-d1-a-r2").await);
    }
}
