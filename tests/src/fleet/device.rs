//! One test device: its directory, its agent, and what it reports.

use super::*;

#[derive(Debug)]
pub struct Device {
    pub name: String,
    pub dir: PathBuf,
    pub proc: Option<Proc>,
    /// The fixed libp2p listen address (so other devices can be pointed at it).
    pub addr: String,
    /// The network namespace it runs in (a home of [`crate::homes::Homes`]), if any.
    pub ns: Option<String>,
}

impl Device {
    pub fn config(&self) -> PathBuf {
        self.dir.join("device.toml")
    }

    /// Bytes of the chunks the device has stored so far.
    pub fn chunk_bytes(&self) -> u64 {
        std::fs::read_dir(self.dir.join("state/chunks"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The last status report for `app` written by the agent (`status.json`).
    pub fn report(&self, app: &str) -> Option<Value> {
        let bytes = std::fs::read(self.dir.join("state/status.json")).ok()?;
        let v: Value = serde_json::from_slice(&bytes).ok()?;
        v.get(app).cloned()
    }

    /// Blob bytes (from peers, from the hub) the device's last report of `app` counts.
    pub fn fetched(&self, app: &str) -> (u64, u64) {
        let r = self.report(app).unwrap_or_default();
        let n = |field: &str| r[field].as_u64().unwrap_or(0);
        (n("bytes_from_peers"), n("bytes_from_hub"))
    }

    /// From a last report of `app` that says an update failed: the release it still runs
    /// (`None`: nothing yet) and the reason.
    pub fn failure(&self, app: &str) -> Option<(Option<u64>, String)> {
        let r = self.report(app)?;
        let reason = r["state"]["Failed"]["reason"].as_str()?.to_string();
        Some((r["release"].as_u64(), reason))
    }

    /// (release, state label) from the last report.
    pub fn release_state(&self, app: &str) -> Option<(u64, String)> {
        let r = self.report(app)?;
        let release = r.get("release")?.as_u64()?;
        let state = match r.get("state")? {
            Value::String(s) => s.clone(),
            Value::Object(m) => m.keys().next()?.clone(),
            _ => return None,
        };
        Some((release, state))
    }

    pub fn state_json(&self) -> Value {
        std::fs::read(self.dir.join("state/state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    pub fn log_text(&self) -> String {
        self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }

    /// Serves `app` on demand on a fresh loopback port (appends an `[[ondemand]]` table
    /// with `settings`, one `key = value` per line); returns the port.
    pub fn serve_on_demand(&self, app: &str, settings: &str) -> Result<u16> {
        let port = free_port()?;
        let mut text = std::fs::read_to_string(self.config())?;
        text.push_str(&format!(
            "\n[[ondemand]]\napp = \"{app}\"\nlisten = \"127.0.0.1:{port}\"\n{settings}\n"
        ));
        std::fs::write(self.config(), text)?;
        Ok(port)
    }

    /// The metrics address from device.toml (set with [`Device::set_config`]).
    pub fn metrics_addr(&self) -> Option<String> {
        std::fs::read_to_string(self.config())
            .ok()?
            .lines()
            .find_map(|l| {
                l.strip_prefix("metrics = ")
                    .map(|v| v.trim_matches('"').to_string())
            })
    }

    /// Edits device.toml (e.g. to set `crash_at`).
    pub fn set_config(&self, key: &str, value: toml_value::V) -> Result<()> {
        let path = self.config();
        let text = std::fs::read_to_string(&path)?;
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with(&format!("{key} =")))
            .map(String::from)
            .collect();
        if let Some(v) = value.render() {
            // Top-level keys must come before any table; device.toml has none.
            lines.insert(0, format!("{key} = {v}"));
        }
        std::fs::write(&path, lines.join("\n") + "\n")?;
        Ok(())
    }
}

/// Tiny helper for TOML values in [`Device::set_config`].
pub mod toml_value {
    #[derive(Debug)]
    pub enum V {
        Str(String),
        Int(u64),
        Bool(bool),
        StrList(Vec<String>),
        Remove,
    }
    impl V {
        pub fn render(&self) -> Option<String> {
            match self {
                V::Str(s) => Some(format!("{s:?}")),
                V::Int(n) => Some(n.to_string()),
                V::Bool(b) => Some(b.to_string()),
                V::StrList(l) => Some(format!(
                    "[{}]",
                    l.iter()
                        .map(|s| format!("{s:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                V::Remove => None,
            }
        }
    }
}
