//! Issue 27: holders that stop answering (`unifleet_tests::silent`). Eight real devices
//! fetch a 16 MiB release that shares nothing with the last, three times in one test (one
//! after the other, so they share the machine's load alike): untouched; with the first
//! two holders frozen with SIGSTOP mid-release; and with one device's upload capped at
//! 1 KiB/s from the start. Before the fix the six others stopped at 87–120 of 218 chunks
//! for good: the hub kept naming the frozen holders, and every answer of the hub reset
//! the devices' stall timer.
//!
//! The bound compared is the untouched fleet's time measured here, in the same run: the
//! others must finish within twice that (the goal).

use anyhow::Result;
use unifleet_tests::silent::{release, Trouble};

#[test]
fn a_frozen_or_slow_holder_does_not_stall_a_release() -> Result<()> {
    let calm = release(Trouble::None)?;
    eprintln!("untouched: {calm:?}");
    let frozen = release(Trouble::Freeze)?;
    eprintln!("two holders frozen: {frozen:?}");
    let slow = release(Trouble::SlowHolder)?;
    eprintln!("one holder at 1 KiB/s: {slow:?}");
    assert_eq!((frozen.troubled.len(), slow.troubled.len()), (2, 1));
    for (what, r) in [("frozen", &frozen), ("slow", &slow)] {
        assert!(
            r.others <= 2.0 * calm.others,
            "with a {what} holder the others took {:.1} s, the untouched fleet {:.1} s",
            r.others,
            calm.others
        );
        // The silent holders were reported, and the hub sent again only what they held
        // back (at most their share of the first copies and then some: not a copy each).
        assert!(r.suspected > 0, "{what}: no holder reported silent");
        assert!(
            r.hub_copies < 3.0,
            "{what}: {:.2} copies from the hub",
            r.hub_copies
        );
    }
    assert!(
        calm.hub_copies < 1.2,
        "{:.2} copies from the hub",
        calm.hub_copies
    );
    Ok(())
}
