//! One module per subcommand of `hub`: its arguments (clap) and what it runs.

pub mod broker_config;
pub mod deploy_hook;
pub mod devices;
pub mod enroll;
pub mod init;
pub mod log;
pub mod mirror;
pub mod new;
pub mod promote;
pub mod publish;
pub mod rebuild;
pub mod release;
pub mod releases;
pub mod restore;
pub mod revoke;
pub mod rollback;
pub mod rollout;
pub mod root;
pub mod serve;
pub mod status;

/// The local UTC offset (seconds east), read once before any thread starts (on Linux the
/// `time` crate reads it only then); UTC if it cannot be read.
pub static LOCAL_OFFSET: std::sync::OnceLock<i32> = std::sync::OnceLock::new();

/// `at` as local wall-clock time, for people (JSON keeps Unix seconds).
pub fn local(at: u64) -> String {
    proto::status::local_time(at, *LOCAL_OFFSET.get().unwrap_or(&0))
}

/// `rows` under `header` in columns as wide as their widest cell, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}
