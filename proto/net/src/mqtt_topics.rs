//! The MQTT topics of a fleet, named once for the hub and the devices.

use proto::announcement::Track;

/// The retained announcement of a track's newest release: one topic per platform, so an
/// ARM-only release does not replace the retained x86 one.
pub fn release(fleet: &str, track: &Track) -> String {
    format!(
        "unifleet/{fleet}/release/{}/{}/{}",
        track.channel, track.app, track.platform
    )
}

/// The broker's retained trust records: the newest root, the revocation list and the
/// list of held releases.
pub fn trust(fleet: &str) -> [String; 3] {
    [
        format!("unifleet/{fleet}/root"),
        format!("unifleet/{fleet}/revocations"),
        format!("unifleet/{fleet}/holds"),
    ]
}

/// A device's retained status reports.
pub fn status(fleet: &str, device: &str) -> String {
    format!("unifleet/{fleet}/status/{device}")
}

/// Every device's status reports (what the hub subscribes to).
pub fn all_status(fleet: &str) -> String {
    status(fleet, "+")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::manifest::Platform;

    #[test]
    fn each_platform_of_a_track_has_its_own_retained_topic() {
        let x86 = release("f", &Track::new("hello", "stable", Platform::QemuX86_64));
        let arm = release("f", &Track::new("hello", "stable", Platform::QemuAarch64));
        assert_eq!(x86, "unifleet/f/release/stable/hello/qemu-x86_64");
        assert_ne!(x86, arm);
        assert_eq!(all_status("f"), "unifleet/f/status/+");
    }
}
