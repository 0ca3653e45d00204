//! Issue 32: power cuts, modelled by a file system that drops what was not synced.

use anyhow::Result;
use std::io::Write;
use unifleet_tests::lazyfs::{mount, Cut};

/// The model itself: data not synced is gone after a cut (a file renamed into place
/// without `fsync` comes back empty), data synced stays.
#[test]
fn the_lazy_file_system_keeps_synced_data_and_drops_the_rest() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (base, mnt) = (dir.path().join("base"), dir.path().join("mnt"));
    std::fs::create_dir_all(&base)?;
    std::fs::create_dir_all(&mnt)?;
    let cut = Cut::default();
    let mounted = mount(&base, &mnt, &cut)?;
    let mut synced = std::fs::File::create(mnt.join("synced.tmp"))?;
    synced.write_all(b"kept")?;
    synced.sync_all()?;
    std::fs::rename(mnt.join("synced.tmp"), mnt.join("synced"))?;
    std::fs::write(mnt.join("lazy.tmp"), b"lost")?;
    std::fs::rename(mnt.join("lazy.tmp"), mnt.join("lazy"))?;
    assert_eq!(
        std::fs::read(mnt.join("lazy"))?,
        b"lost",
        "read back before the cut"
    );
    assert_eq!(cut.cut(), 1);
    drop(mounted);
    let _mounted = mount(&base, &mnt, &cut)?;
    assert_eq!(std::fs::read(mnt.join("synced"))?, b"kept");
    assert_eq!(
        std::fs::read(mnt.join("lazy"))?,
        b"",
        "the rename survived, the data did not"
    );
    Ok(())
}

/// A short campaign (`bench_powercut` runs the long one): `hub init` then publishes cut
/// at random points, nothing acknowledged is lost, the store is always whole.
#[test]
fn power_cuts_during_publish_lose_nothing_acknowledged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = unifleet_tests::bin("hub")?;
    let opts = unifleet_tests::powercut::Options {
        hub: &hub,
        cuts: 12,
        seed: 0x5eed_cafe,
        sync_init: false,
    };
    let c = unifleet_tests::powercut::campaign(dir.path(), &opts)?;
    assert!(c.losses.is_empty(), "{:#?}", c.losses);
    assert!(c.interrupted > 0, "some publishes were cut short: {c:?}");
    assert!(
        c.acknowledged >= 4,
        "every third finished before its cut: {c:?}"
    );
    eprintln!("{c:?}");
    Ok(())
}
