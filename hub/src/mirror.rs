//! Mirrors: the store and the deploy repository pushed to a git remote after every change,
//! so a hub whose disk dies is restored elsewhere with `hub restore` (issue 32).
//!
//! One remote holds both: the store's branches as they are, the deploy repository's under
//! `refs/deploy/`. The store's push is never forced: a mirror whose history is not this
//! hub's (another hub's, or a newer one) is refused and said, not overwritten. Pushes run the
//! `git` client, so the hub user's ssh keys, `known_hosts` and credential helpers apply as
//! to any push (libgit2 would need each wired by hand).
//!
//! [`Mirror`] is the pure part (what is due, the backoff, the lag); `hub serve` runs
//! [`run`] on its task tree and writes where each mirror stands to `mirrors.json`, which
//! `hub status` and the metrics read.

use crate::home::{now, Home};
use crate::metrics::Metrics;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often the repositories are looked at for something new.
const TICK: Duration = Duration::from_secs(2);
/// The longest wait between tries of a failing mirror.
const MAX_BACKOFF_SECS: u64 = 300;
/// A push that takes longer is stopped and counted as failed.
const PUSH_TIMEOUT: Duration = Duration::from_secs(300);
/// Where the deploy repository's refs live on a mirror.
pub const DEPLOY_REFS: &str = "refs/deploy/heads";

/// Where one mirror stands (also what `mirrors.json` holds).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mirror {
    pub url: String,
    /// The state of the repositories last pushed (see [`heads`]).
    pub pushed: Option<String>,
    pub pushed_at: Option<u64>,
    /// Since when something is not pushed yet (Unix s).
    pub behind_since: Option<u64>,
    /// Failed tries in a row, the last one's error, and when to try again.
    pub failures: u32,
    pub last_error: Option<String>,
    pub next_try: u64,
}

impl Mirror {
    pub fn new(url: &str) -> Mirror {
        Mirror {
            url: url.into(),
            ..Mirror::default()
        }
    }

    /// Notes the repositories' state `heads` at `now`; whether a push is due.
    pub fn due(&mut self, heads: &str, now: u64) -> bool {
        if self.pushed.as_deref() == Some(heads) {
            return false;
        }
        self.behind_since.get_or_insert(now);
        now >= self.next_try
    }

    pub fn pushed(&mut self, heads: &str, now: u64) {
        *self = Mirror {
            url: std::mem::take(&mut self.url),
            pushed: Some(heads.into()),
            pushed_at: Some(now),
            ..Mirror::default()
        };
    }

    /// A failed try: the next after 2, 4, 8 … seconds, at most [`MAX_BACKOFF_SECS`].
    pub fn failed(&mut self, error: String, now: u64) {
        self.failures += 1;
        let wait = 1u64
            .checked_shl(self.failures)
            .unwrap_or(u64::MAX)
            .min(MAX_BACKOFF_SECS);
        self.next_try = now + wait;
        self.last_error = Some(error);
    }

    /// How long something has waited to be pushed, seconds (0: up to date).
    pub fn lag(&self, now: u64) -> u64 {
        self.behind_since.map_or(0, |s| now.saturating_sub(s))
    }

    /// One line for `hub status`; `heads` is the repositories' state now, if read.
    pub fn describe(&self, now: u64, heads: Option<&str>) -> String {
        let url = shown(&self.url);
        let pushed = self.pushed_at.map_or("never pushed".to_string(), |at| {
            format!("last pushed {}", proto::status::human_ago(at, now))
        });
        let behind = heads.is_some_and(|h| self.pushed.as_deref() != Some(h));
        match (&self.behind_since, &self.last_error) {
            (None, _) if !behind => format!("mirror {url}: up to date, {pushed}"),
            (None, _) => format!(
                "warning: mirror {url}: changes not pushed yet, {pushed} (`hub serve` pushes them)"
            ),
            (Some(_), None) => format!(
                "mirror {url}: {} behind, pushing; {pushed}",
                proto::status::human_secs(self.lag(now))
            ),
            (Some(_), Some(e)) => format!(
                "warning: mirror {url}: {} behind after {} failed push(es), next try {}; {pushed}; \
                 last error: {e}",
                proto::status::human_secs(self.lag(now)),
                self.failures,
                proto::status::human_ago(self.next_try, now)
            ),
        }
    }
}

/// `url` as logs and `hub status` show it: a password in it replaced by `***` (an
/// `https://user:token@host/…` remote; a credential helper is the better place for it).
pub fn shown(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.into();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.into();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.into(),
    }
}

/// Why a push to a mirror failed (URLs as [`shown`]).
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("running git push to {url}")]
    Spawn {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{url} holds history this hub lacks (another hub, or a restored one, pushes there): \
         check which hub is the live one, then remove or replace this mirror"
    )]
    Diverged { url: String },
    #[error("git push of {what} to {url} failed: {said}")]
    Refused {
        what: &'static str,
        url: String,
        said: String,
    },
    #[error("git push to {url} took longer than {} s; stopped", PUSH_TIMEOUT.as_secs())]
    Timeout { url: String },
}

/// The state of the store's and the deploy repository's refs, as one comparable string.
pub fn heads(home: &Home) -> Result<String, git2::Error> {
    let mut out = String::new();
    for repo in ["store.git", "deploy.git"] {
        let Ok(r) = git2::Repository::open_bare(home.dir.join(repo)) else {
            continue; // no deploy repository yet
        };
        for reference in r.references()? {
            let reference = reference?;
            if let (Ok(name), Some(id)) = (reference.name(), reference.target()) {
                out.push_str(&format!("{repo} {name} {id}\n"));
            }
        }
    }
    Ok(out)
}

/// Pushes the store (never forced) and the deploy repository (forced: its branches
/// follow what developers pushed) to `url`.
pub async fn push(home_dir: &Path, url: &str) -> Result<(), PushError> {
    let store = [
        "refs/heads/*:refs/heads/*".to_string(),
        "refs/tags/*:refs/tags/*".into(),
    ];
    git_push(&home_dir.join("store.git"), url, "the store", &store).await?;
    let deploy = home_dir.join("deploy.git");
    if deploy.exists() {
        let refspec = [format!("+refs/heads/*:{DEPLOY_REFS}/*")];
        git_push(&deploy, url, "the deploy repository", &refspec).await?;
    }
    Ok(())
}

async fn git_push(
    git_dir: &Path,
    url: &str,
    what: &'static str,
    refspecs: &[String],
) -> Result<(), PushError> {
    let mut cmd = tokio::process::Command::new("git");
    // All refs or none: a refused branch must not let the tags through.
    cmd.arg("--git-dir")
        .arg(git_dir)
        .args(["push", "--quiet", "--atomic", "--", url])
        .args(refspecs)
        // Never a prompt: a mirror needing a password or a new host key fails, said.
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if std::env::var_os("GIT_SSH_COMMAND").is_none() {
        cmd.env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes");
    }
    let url = shown(url);
    let out = match tokio::time::timeout(PUSH_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(source)) => return Err(PushError::Spawn { url, source }),
        Err(_) => return Err(PushError::Timeout { url }),
    };
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    if said.contains("fetch first") || said.contains("non-fast-forward") {
        return Err(PushError::Diverged { url });
    }
    let said = said
        .lines()
        .filter(|l| !l.trim_start().starts_with("hint:"))
        .collect::<Vec<_>>()
        .join("; ");
    Err(PushError::Refused { what, url, said })
}

/// Where `mirrors.json` lives.
pub fn status_path(home: &Home) -> PathBuf {
    home.dir.join("mirrors.json")
}

/// The mirrors as the running hub last wrote them, one per URL in `hub.toml` (a mirror
/// not written yet is "never pushed").
pub fn load(home: &Home) -> Vec<Mirror> {
    let written: Vec<Mirror> = std::fs::read(status_path(home))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    home.config
        .mirrors
        .iter()
        .map(|url| {
            written
                .iter()
                .find(|m| &m.url == url)
                .cloned()
                .unwrap_or_else(|| Mirror::new(url))
        })
        .collect()
}

/// Why the mirror loop could not see what to push.
#[derive(Debug, thiserror::Error)]
enum LookError {
    #[error(transparent)]
    Config(#[from] crate::home::HomeError),
    #[error("reading the repositories' refs")]
    Refs(#[from] git2::Error),
}

/// The mirrors `hub.toml` names now (what is known of them kept) and the repositories'
/// state: read on a blocking thread each tick.
fn look(dir: &Path, known: &[Mirror]) -> Result<(Vec<Mirror>, String), LookError> {
    let home = Home::open(dir)?;
    let mut mirrors = load(&home);
    for m in &mut mirrors {
        if let Some(k) = known.iter().find(|k| k.url == m.url) {
            *m = k.clone();
        }
    }
    let heads = if mirrors.is_empty() {
        String::new()
    } else {
        heads(&home)?
    };
    Ok((mirrors, heads))
}

/// `hub serve`'s mirror loop: every [`TICK`], each mirror in `hub.toml` (read again, so
/// `hub mirror add` applies without a restart) that is behind is pushed to, one after
/// the other; where they stand is written to `mirrors.json` and the metrics. Stops with
/// `tasks`.
pub async fn run(home: Home, metrics: Arc<Metrics>, tasks: net::tasks::Tasks) {
    let mut mirrors: Vec<Mirror> = vec![];
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing_look = false;
    loop {
        ticks.tick().await;
        let (dir, known) = (home.dir.clone(), mirrors.clone());
        let heads = match tasks.spawn_blocking(move || look(&dir, &known)).await {
            Ok(Ok((now_known, heads))) => {
                failing_look = false;
                mirrors = now_known;
                heads
            }
            Ok(Err(e)) => {
                if !std::mem::replace(&mut failing_look, true) {
                    let e = proto::Chain(&e);
                    tracing::error!("mirrors: {e}; not pushing until it is fixed");
                }
                continue;
            }
            Err(_) => return, // shutting down
        };
        let before = mirrors.clone();
        for m in &mut mirrors {
            if !m.due(&heads, now()) {
                continue;
            }
            match push(&home.dir, &m.url).await {
                Ok(()) => {
                    if m.failures > 0 {
                        tracing::info!(url = %shown(&m.url), "mirror reachable again; up to date");
                    }
                    m.pushed(&heads, now());
                }
                Err(e) => {
                    let e = proto::Chain(&e).to_string();
                    if m.failures == 0 {
                        tracing::warn!("mirror push failed (retrying with backoff): {e}");
                    }
                    metrics.mirror_failures.fetch_add(1, Ordering::Relaxed);
                    m.failed(e, now());
                }
            }
        }
        let lag = mirrors.iter().map(|m| m.lag(now())).max().unwrap_or(0);
        metrics.mirror_lag_secs.store(lag, Ordering::Relaxed);
        if mirrors != before {
            let (h, all) = (home.clone(), mirrors.clone());
            let _ = tasks.spawn_blocking(move || save(&h, &all)).await;
        }
    }
}

/// Writes where the mirrors stand to `mirrors.json`.
pub fn save(home: &Home, mirrors: &[Mirror]) {
    let bytes = serde_json::to_vec_pretty(mirrors).unwrap_or_default();
    if let Err(e) = crate::home::write_atomic(&status_path(home), &bytes) {
        tracing::warn!("{}", proto::Chain(&e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirror_is_pushed_when_behind_and_backs_off_when_failing() {
        let mut m = Mirror::new("file:///m.git");
        assert!(m.due("a", 100));
        assert_eq!(m.lag(103), 3);
        m.failed("unreachable".into(), 103);
        assert_eq!(m.next_try, 105);
        assert!(!m.due("a", 104), "waits out the backoff");
        assert!(m.due("a", 105));
        for _ in 0..20 {
            m.failed("unreachable".into(), 200);
        }
        assert_eq!(m.next_try, 200 + MAX_BACKOFF_SECS, "the backoff is capped");
        assert!(m
            .describe(210, None)
            .starts_with("warning: mirror file:///m.git: 1m 50s behind after 21 failed push(es)"));
        m.pushed("a", 600);
        assert_eq!((m.lag(700), m.failures, m.last_error.clone()), (0, 0, None));
        assert!(!m.due("a", 700), "nothing new");
        assert!(m.due("b", 701), "a new commit");
        assert_eq!(m.lag(705), 4, "behind since it was seen");
        assert!(Mirror::new("x")
            .describe(0, Some("a"))
            .starts_with("warning"));
    }

    #[test]
    fn a_password_in_a_mirror_url_is_never_shown() {
        assert_eq!(
            shown("https://op:s3cret@git.example/hub.git"),
            "https://op:***@git.example/hub.git"
        );
        assert_eq!(shown("ssh://git@host/hub.git"), "ssh://git@host/hub.git");
        assert_eq!(shown("/mnt/usb/hub.git"), "/mnt/usb/hub.git");
    }
}
