//! Time for people and for reports, at the bottom of the crate (no imports of its own).

use std::time::Duration;

/// Seconds since the Unix epoch by the system clock (0 if it is before 1970).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A pause for people: "5 s", "2 min".
pub fn human_duration(d: Duration) -> String {
    match d.as_secs() {
        s if s < 120 => format!("{s} s"),
        s => format!("{} min", s / 60),
    }
}
