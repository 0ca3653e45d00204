//! Staged rollouts, carried in signed metadata so they hold with the hub down.
//!
//! A release's manifest carries its [`Rollout`]: **waves** (wave *k* admits the devices
//! whose seed is below `basis_points` once `after_secs` have passed since the manifest
//! was signed, as Bottlerocket does), **targets** (tags or device names; none: the whole
//! channel) and the hub's **halt policy** (how many failed attempts stop it). Every
//! device decides for itself from the signed manifest and its own stable seed
//! ([`seed`], from its key), so a rollout advances on time, or waits, whoever relays it.
//!
//! A release is stopped by a [`Holds`] record: the list of paused or halted releases,
//! signed by the root's `rollout` role (an online key that can hold releases and nothing
//! else) and spread like the revocation list. A device that has not installed a held
//! release does not start it; one that has keeps its health-based rollback. A list
//! replaces another only with a higher version, so an old list cannot be replayed to
//! resume a halted release.

use crate::codec::{CodecError, Kind};
use crate::envelope::Envelope;
use crate::error::{Invalid, VerifyError};
use crate::keys::PublicKey;
use crate::names;
use crate::root::TrustedRoot;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A whole fleet in basis points: seeds are `0..SEED_SPACE`, a wave of 100% admits all.
pub const SEED_SPACE: u16 = 10_000;
/// Most waves one rollout may have.
pub use crate::error::{BadWaves, MAX_WAVES};
/// Most tags plus device names one rollout may target.
pub const MAX_TARGETS: usize = 256;
/// Most releases one [`Holds`] list may hold.
pub const MAX_HOLDS: usize = 256;
/// Longest reason text in a [`Hold`].
pub const MAX_REASON_LEN: usize = 256;

/// One wave: devices with a seed below `basis_points` (of [`SEED_SPACE`]) may install
/// once `after_secs` have passed since the manifest's `created_at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    pub basis_points: u16,
    pub after_secs: u64,
}

/// When the hub halts a release by itself: once at least `min_attempts` devices tried it
/// and `max_failure_percent` or more of those attempts failed (rolled back or failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaltPolicy {
    pub min_attempts: u32,
    pub max_failure_percent: u8,
}

/// How a release reaches its channel. The default (no waves, no targets, no policy) is
/// everyone at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// In order of time and share; empty: everyone at once.
    pub waves: Vec<Wave>,
    /// Devices carrying any of these tags are targeted (with `devices`); both empty:
    /// every device of the channel.
    pub tags: Vec<String>,
    /// Devices targeted by name.
    pub devices: Vec<String>,
    pub halt: Option<HaltPolicy>,
}

/// What a device knows of itself for a rollout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Me<'a> {
    pub name: &'a str,
    pub tags: &'a [String],
    pub seed: u16,
}

/// Whether a device may install a release, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Its wave has come.
    Now,
    /// Its wave comes at this time (Unix s).
    At(u64),
    /// It is targeted but no wave admits its seed: never.
    NoWave,
    /// The release targets other tags or devices: never.
    NotTargeted,
}

impl Rollout {
    /// Structural checks: waves in order of time and share, shares within 100%, names.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.waves.len() > MAX_WAVES {
            return Err(Invalid::Waves(BadWaves::TooMany(self.waves.len())));
        }
        let mut prev: Option<Wave> = None;
        for w in &self.waves {
            if w.basis_points == 0 || w.basis_points > SEED_SPACE {
                return Err(Invalid::Waves(BadWaves::Share(w.basis_points)));
            }
            if let Some(p) = prev {
                if w.basis_points <= p.basis_points || w.after_secs <= p.after_secs {
                    return Err(Invalid::Waves(BadWaves::OutOfOrder));
                }
            }
            prev = Some(*w);
        }
        let targets = self.tags.len() + self.devices.len();
        if targets > MAX_TARGETS {
            return Err(Invalid::TooManyTargets {
                count: targets,
                max: MAX_TARGETS,
            });
        }
        for t in &self.tags {
            names::check("tag", t)?;
        }
        for d in &self.devices {
            names::check("device", d)?;
        }
        if let Some(h) = self.halt {
            if h.min_attempts == 0 || h.max_failure_percent == 0 || h.max_failure_percent > 100 {
                return Err(Invalid::HaltPolicy);
            }
        }
        Ok(())
    }

    /// Whether the release is meant for `me` at all (its tags or its name).
    pub fn targets(&self, me: &Me<'_>) -> bool {
        (self.tags.is_empty() && self.devices.is_empty())
            || self.devices.iter().any(|d| d == me.name)
            || self.tags.iter().any(|t| me.tags.contains(t))
    }

    /// When the first wave admitting `seed` opens, for a manifest signed at `created_at`;
    /// `None`: no wave admits it.
    pub fn opens_at(&self, seed: u16, created_at: u64) -> Option<u64> {
        if self.waves.is_empty() {
            return Some(created_at);
        }
        self.waves
            .iter()
            .find(|w| seed < w.basis_points)
            .map(|w| created_at.saturating_add(w.after_secs))
    }

    /// The one decision a device makes: may `me` install a release signed at
    /// `created_at`, at `now`?
    pub fn admission(&self, me: &Me<'_>, created_at: u64, now: u64) -> Admission {
        if !self.targets(me) {
            return Admission::NotTargeted;
        }
        match self.opens_at(me.seed, created_at) {
            None => Admission::NoWave,
            Some(at) if at <= now => Admission::Now,
            Some(at) => Admission::At(at),
        }
    }

    /// The share of seeds admitted at `now` (basis points), for status pages.
    pub fn admitted_at(&self, created_at: u64, now: u64) -> u16 {
        if self.waves.is_empty() {
            return SEED_SPACE;
        }
        self.waves
            .iter()
            .filter(|w| created_at.saturating_add(w.after_secs) <= now)
            .map(|w| w.basis_points)
            .max()
            .unwrap_or(0)
    }

    /// `tag:beta`, `device:d9`: what the release targets, for people (empty: everyone).
    pub fn target_names(&self) -> Vec<String> {
        let tags = self.tags.iter().map(|t| format!("tag:{t}"));
        tags.chain(self.devices.iter().map(|d| format!("device:{d}")))
            .collect()
    }

    /// `1%@0s,10%@1h,100%@1d`, the spelling [`parse_waves`] reads.
    pub fn waves_text(&self) -> String {
        if self.waves.is_empty() {
            return "100%@0s".into();
        }
        let parts: Vec<String> = self.waves.iter().map(|w| w.to_string()).collect();
        parts.join(",")
    }
}

/// Basis points as people write a share: `1%`, `0.50%`, `100%`.
pub fn share_text(basis_points: u16) -> String {
    let (whole, frac) = (basis_points / 100, basis_points % 100);
    if frac == 0 {
        format!("{whole}%")
    } else {
        format!("{whole}.{frac:02}%")
    }
}

impl fmt::Display for Wave {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@", share_text(self.basis_points))?;
        let s = self.after_secs;
        match s {
            _ if s > 0 && s.is_multiple_of(86_400) => write!(f, "{}d", s / 86_400),
            _ if s > 0 && s.is_multiple_of(3600) => write!(f, "{}h", s / 3600),
            _ if s > 0 && s.is_multiple_of(60) => write!(f, "{}m", s / 60),
            _ => write!(f, "{s}s"),
        }
    }
}

/// Reads `1%@0,10%@1h,50%@4h,100%@1d` (shares may have two decimals: `0.5%`; delays are
/// seconds or end in s, m, h or d).
pub fn parse_waves(text: &str) -> Result<Vec<Wave>, BadWaves> {
    let waves = text
        .split(',')
        .map(|part| parse_wave(part.trim()).ok_or_else(|| BadWaves::Spelling(part.into())))
        .collect::<Result<Vec<_>, _>>()?;
    Rollout {
        waves: waves.clone(),
        ..Rollout::default()
    }
    .validate()
    .map_err(|e| match e {
        Invalid::Waves(w) => w,
        _ => BadWaves::OutOfOrder,
    })?;
    Ok(waves)
}

fn parse_wave(part: &str) -> Option<Wave> {
    let (share, delay) = part.split_once('@')?;
    let share = share.strip_suffix('%')?;
    let (whole, frac) = share.split_once('.').unwrap_or((share, ""));
    if frac.len() > 2 {
        return None;
    }
    let frac_bp: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<2}").parse().ok()?
    };
    let bp = whole.parse::<u32>().ok()?.checked_mul(100)? + frac_bp;
    let (num, unit) = match delay.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => delay.split_at(i),
        None => (delay, "s"),
    };
    let mul = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    Some(Wave {
        basis_points: u16::try_from(bp).ok()?,
        after_secs: num.parse::<u64>().ok()?.checked_mul(mul)?,
    })
}

/// A device's place in every rollout: `0..SEED_SPACE`, from its key, the same for every
/// release (the same devices go first each time, as Bottlerocket's seeds do), spread
/// evenly over a fleet.
pub fn seed(device_key: &PublicKey) -> u16 {
    let mut input = b"unifleet/rollout-seed/v1\0".to_vec();
    input.extend_from_slice(&device_key.0);
    let d = crate::Digest::of(&input);
    let mut first = [0u8; 8];
    first.copy_from_slice(&d.0[..8]);
    (u64::from_le_bytes(first) % u64::from(SEED_SPACE)) as u16
}

/// Why a release is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldKind {
    /// By the operator, to be resumed.
    Paused,
    /// Failures passed the release's halt policy (or the operator halted it).
    Halted,
}

impl HoldKind {
    pub fn label(self) -> &'static str {
        match self {
            HoldKind::Paused => "paused",
            HoldKind::Halted => "halted",
        }
    }
}

/// One held release of an (app, channel), all platforms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub app: String,
    pub channel: String,
    pub release: u64,
    pub kind: HoldKind,
    pub reason: String,
    /// When it was held (Unix s).
    pub at: u64,
}

/// The payload of a [`Kind::Holds`] message: every release held now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holds {
    pub fleet: String,
    /// Grows by one per change; devices keep the highest they verified.
    pub version: u64,
    pub issued_at: u64,
    pub held: Vec<Hold>,
}

impl Holds {
    pub fn seal(&self) -> Result<Envelope, CodecError> {
        Envelope::seal(Kind::Holds, self)
    }

    /// The hold on this release, if any.
    pub fn of(&self, app: &str, channel: &str, release: u64) -> Option<&Hold> {
        self.held
            .iter()
            .find(|h| h.app == app && h.channel == channel && h.release == release)
    }

    fn validate(&self) -> Result<(), VerifyError> {
        let invalid = |reason: Invalid| VerifyError::Invalid {
            kind: Kind::Holds,
            reason,
        };
        names::check("fleet", &self.fleet).map_err(|e| invalid(e.into()))?;
        if self.version == 0 {
            return Err(invalid(Invalid::VersionZero));
        }
        if self.held.len() > MAX_HOLDS {
            return Err(invalid(Invalid::TooManyHolds {
                count: self.held.len(),
                max: MAX_HOLDS,
            }));
        }
        for h in &self.held {
            names::check("app", &h.app).map_err(|e| invalid(e.into()))?;
            names::check("channel", &h.channel).map_err(|e| invalid(e.into()))?;
            if h.reason.len() > MAX_REASON_LEN {
                return Err(invalid(Invalid::ReasonTooLong));
            }
        }
        Ok(())
    }
}

/// The one entry point for hold lists: authentic (the rollout role, fleet) and newer than
/// `known` (the version the caller holds), else refused. Never expires: a halt must
/// outlive a hub outage.
pub fn verify_holds(bytes: &[u8], root: &TrustedRoot, known: u64) -> Result<Holds, VerifyError> {
    let env = Envelope::decode(bytes, Kind::Holds)?;
    let list: Holds = env.open("rollout", &root.root().rollout)?;
    list.validate()?;
    root.check_fleet(Kind::Holds, &list.fleet)?;
    if list.version <= known {
        return Err(VerifyError::Stale {
            kind: Kind::Holds,
            offered: list.version,
            known,
        });
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(waves: &str) -> Rollout {
        Rollout {
            waves: parse_waves(waves).expect("valid waves"),
            ..Rollout::default()
        }
    }

    fn me(seed: u16) -> Me<'static> {
        Me {
            name: "d1",
            tags: &[],
            seed,
        }
    }

    #[test]
    fn waves_admit_seeds_below_their_share_from_their_time() {
        let r = rollout("1%@0,10%@1h,100%@1d");
        let t0 = 1_000_000;
        assert_eq!(r.admission(&me(99), t0, t0), Admission::Now);
        assert_eq!(r.admission(&me(100), t0, t0), Admission::At(t0 + 3600));
        assert_eq!(r.admission(&me(100), t0, t0 + 3600), Admission::Now);
        assert_eq!(
            r.admission(&me(9_999), t0, t0 + 3600),
            Admission::At(t0 + 86_400)
        );
        assert_eq!(r.admitted_at(t0, t0 + 3599), 100);
        assert_eq!(r.admitted_at(t0, t0 + 86_400), SEED_SPACE);
        let canary_only = rollout("5%@0");
        assert_eq!(
            canary_only.admission(&me(600), t0, u64::MAX),
            Admission::NoWave
        );
        assert_eq!(
            Rollout::default().admission(&me(9_999), t0, t0),
            Admission::Now
        );
    }

    #[test]
    fn targets_are_tags_or_names_and_none_means_everyone() {
        let tags = vec!["kitchen".to_string()];
        let kitchen = Me {
            name: "d1",
            tags: &tags,
            seed: 0,
        };
        let r = Rollout {
            tags: vec!["beta".into()],
            devices: vec!["d9".into()],
            ..Rollout::default()
        };
        assert_eq!(r.admission(&kitchen, 0, 0), Admission::NotTargeted);
        let beta = Rollout {
            tags: vec!["kitchen".into()],
            ..Rollout::default()
        };
        assert_eq!(beta.admission(&kitchen, 0, 0), Admission::Now);
        let named = Rollout {
            devices: vec!["d1".into()],
            ..Rollout::default()
        };
        assert!(named.targets(&kitchen));
    }

    #[test]
    fn wave_spellings_round_trip_and_bad_ones_say_why() {
        let r = rollout("0.5%@0,10%@90m,50%@4h,100%@1d");
        assert_eq!(r.waves[0].basis_points, 50);
        assert_eq!(r.waves[1].after_secs, 5400);
        assert_eq!(r.waves_text(), "0.50%@0s,10%@90m,50%@4h,100%@1d");
        assert_eq!(parse_waves(&r.waves_text()).unwrap(), r.waves);
        assert_eq!(parse_waves("10%@1h,5%@2h"), Err(BadWaves::OutOfOrder));
        assert_eq!(parse_waves("10%@1h,50%@1h"), Err(BadWaves::OutOfOrder));
        assert_eq!(parse_waves("101%@0"), Err(BadWaves::Share(10_100)));
        assert!(matches!(parse_waves("10@1h"), Err(BadWaves::Spelling(_))));
        assert!(matches!(parse_waves("10%@1w"), Err(BadWaves::Spelling(_))));
    }

    #[test]
    fn seeds_are_stable_and_spread_over_the_space() {
        let keys: Vec<PublicKey> = (0..2000u32)
            .map(|i| {
                let mut s = [0u8; 32];
                s[..4].copy_from_slice(&i.to_le_bytes());
                crate::SecretKey::from_seed(s).public()
            })
            .collect();
        assert_eq!(seed(&keys[0]), seed(&keys[0]));
        let below_10pct = keys.iter().filter(|k| seed(k) < 1000).count();
        assert!(
            (120..=280).contains(&below_10pct),
            "{below_10pct} of 2000 below 10%"
        );
    }
}
