//! Issue 29: `git push` of source — a real `git` client pushing to the hub's deploy
//! repository, whose pre-receive hook builds and tests the commit in the sandbox (real
//! bubblewrap) and publishes it; the branch moves only if every step passed. The builds
//! here copy a prebuilt test image (the sandbox is what is tested, not a compiler); the
//! Rust template built from source is in `unikernel.rs`.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use unifleet_tests::fleet::Fleet;

/// An app's repository with the hub's deploy repository as remote `unifleet`.
struct App {
    dir: PathBuf,
    deploy: PathBuf,
    app: String,
}

/// What a push printed and whether it went through.
struct Pushed {
    ok: bool,
    said: String,
}

impl App {
    /// A repository holding `image` as `prebuilt.elf` and a `unifleet.toml` of app `hello`
    /// at `version` with `rest` appended.
    fn new(fleet: &Fleet, name: &str, image: &Path, version: &str, rest: &str) -> Result<App> {
        App::named(fleet, name, "hello", image, version, rest)
    }

    /// [`App::new`] of app `app`.
    fn named(
        fleet: &Fleet,
        name: &str,
        app: &str,
        image: &Path,
        version: &str,
        rest: &str,
    ) -> Result<App> {
        let dir = fleet.path(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(image, dir.join("prebuilt.elf"))?;
        let app = App {
            dir,
            deploy: fleet.hub_dir.join("deploy.git"),
            app: app.into(),
        };
        app.git(&["init", "-q"])?;
        app.change(version, rest)?;
        Ok(app)
    }

    fn git(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new("git")
            .args(["-c", "user.name=op", "-c", "user.email=op@example.invalid"])
            .args(["-c", "init.defaultBranch=main"])
            .args(args)
            .current_dir(&self.dir)
            .output()?)
    }

    /// Rewrites `unifleet.toml` and commits it.
    fn change(&self, version: &str, rest: &str) -> Result<()> {
        std::fs::write(
            self.dir.join("unifleet.toml"),
            format!(
                "app = {:?}\nversion = \"{version}\"\nno_staging = true\n{rest}",
                self.app
            ),
        )?;
        self.git(&["add", "-A"])?;
        self.git(&["commit", "-qm", version])?;
        Ok(())
    }

    fn push(&self) -> Result<Pushed> {
        let out = self.git(&["push", self.deploy.to_str().unwrap(), "main"])?;
        Ok(Pushed {
            ok: out.status.success(),
            said: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// The commit `main` points at in the deploy repository, if any.
    fn deployed(&self) -> Result<Option<String>> {
        let out = self.git(&[
            "ls-remote",
            self.deploy.to_str().unwrap(),
            "refs/heads/main",
        ])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .map(String::from))
    }

    fn head(&self) -> Result<String> {
        let out = self.git(&["rev-parse", "HEAD"])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// `[build]` copying the prebuilt image, after `before` (shell).
fn build(before: &str) -> String {
    format!(
        "[build]\ncommand = \"{before}mkdir -p out && cp prebuilt.elf out/hello.elf\"\n\
         images = {{ \"qemu-x86_64\" = \"out/hello.elf\" }}\n"
    )
}

fn rejected(p: &Pushed, step: &str) {
    assert!(!p.ok, "the push went through: {}", p.said);
    assert!(
        p.said.contains("pre-receive hook declined"),
        "git says the hook refused it: {}",
        p.said
    );
    assert!(
        p.said.contains(&format!("{step} failed")),
        "the output names the step {step}: {}",
        p.said
    );
}

#[test]
fn a_push_whose_build_or_tests_fail_is_rejected_and_nothing_is_signed() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let image = fleet.testimage("hello", "1.0.0", &[])?;
    // A compile error: the compiler's words come back, the branch does not move.
    let app = App::new(
        &fleet,
        "app",
        &image,
        "1.0.0",
        &build("echo 'error[E0425]: cannot find value `x` in this scope' >&2; exit 101; "),
    )?;
    let p = app.push()?;
    rejected(&p, "build");
    assert!(p.said.contains("remote:        error[E0425]"), "{}", p.said);
    assert_eq!(app.deployed()?, None, "the branch did not move");
    assert!(fleet.releases(None)?.is_empty(), "nothing signed");

    // A failing unit test.
    let failing = "[test]\ncommand = \"echo 'test tests::parses ... FAILED'; exit 1\"\n";
    app.change("1.0.0", &format!("{}{failing}", build("")))?;
    let p = app.push()?;
    rejected(&p, "test");
    assert!(p.said.contains("tests::parses ... FAILED"), "{}", p.said);
    assert_eq!(app.deployed()?, None);
    assert!(fleet.releases(None)?.is_empty());

    // An image the build did not leave.
    app.change(
        "1.0.0",
        "[build]\ncommand = \"true\"\nimages = { \"qemu-x86_64\" = \"out/missing.elf\" }\n",
    )?;
    let p = app.push()?;
    assert!(
        !p.ok && p.said.contains("the build left no out/missing.elf"),
        "{}",
        p.said
    );
    assert!(fleet.releases(None)?.is_empty());

    // Build and tests pass: released, and only now the branch moves.
    let passing = "[test]\ncommand = \"echo 'test result: ok. 3 passed'\"\n";
    app.change("1.0.0", &format!("{}{passing}", build("")))?;
    let p = app.push()?;
    assert!(p.ok, "{}", p.said);
    for step in [
        "build passed in",
        "test passed in",
        "released hello release 1",
        "to go back: hub rollback hello --channel stable",
    ] {
        assert!(p.said.contains(step), "{step}: {}", p.said);
    }
    assert_eq!(app.deployed()?, Some(app.head()?));
    assert_eq!(fleet.releases(None)?.len(), 1);
    Ok(())
}

#[test]
fn a_build_cannot_read_the_hub_keys_or_reach_the_network() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let image = fleet.testimage("hello", "1.0.0", &[])?;
    let key = fleet.hub_dir.join("keys/release.key");
    let before = std::fs::read(&key)?;
    // The image step would publish whatever the build copied: the key, if it could.
    let steal = format!(
        "cat {k} > out/hello.elf || echo cannot read the key; echo x >> {k} || true; ",
        k = key.display()
    );
    let app = App::new(
        &fleet,
        "app",
        &image,
        "1.0.0",
        &build(&format!("mkdir -p out; {steal}exit 1; ")),
    )?;
    let p = app.push()?;
    rejected(&p, "build");
    assert!(p.said.contains("cannot read the key"), "{}", p.said);
    assert_eq!(std::fs::read(&key)?, before, "the key is untouched");

    // A listener on the host's loopback the build tries to reach.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let dial = format!(
        "bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' && echo reached the network || echo no network; exit 1; "
    );
    app.change("1.0.0", &build(&dial))?;
    let p = app.push()?;
    rejected(&p, "build");
    assert!(p.said.contains("no network"), "{}", p.said);
    listener.set_nonblocking(true)?;
    assert!(listener.accept().is_err(), "nobody connected");
    assert!(fleet.releases(None)?.is_empty());
    Ok(())
}

/// Pushes `app`'s `main` to branch `to` of the deploy repository in the background; each
/// line it prints goes to `lines`.
fn push_in_background(
    app: &App,
    to: &str,
    lines: std::sync::mpsc::Sender<String>,
) -> Result<std::thread::JoinHandle<(bool, String)>> {
    use std::io::BufRead;
    let mut child = Command::new("git")
        .arg("push")
        .arg(&app.deploy)
        .arg(format!("main:refs/heads/{to}"))
        .current_dir(&app.dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().expect("piped");
    Ok(std::thread::spawn(move || {
        let mut said = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(|l| l.ok())
        {
            let _ = lines.send(line.clone());
            said.push_str(&line);
            said.push('\n');
        }
        let ok = child.wait().is_ok_and(|s| s.success());
        (ok, said)
    }))
}

/// Two pushes of one app at once: the second waits for the first's build, and release
/// numbers stay dense. Each build waits for a flag file in the app's cache, which the
/// test makes only once one push has said it waits for the other: so the two overlap
/// whatever the machine's speed.
#[test]
fn two_pushes_at_once_build_one_after_the_other() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let image = fleet.testimage("hello", "1.0.0", &[])?;
    let wait = "while [ ! -e /cache/go ]; do sleep 0.1; done; ";
    let a = App::new(&fleet, "a", &image, "1.0.1", &build(wait))?;
    let b = App::new(&fleet, "b", &image, "1.0.2", &build(wait))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let pa = push_in_background(&a, "a", tx.clone())?;
    let pb = push_in_background(&b, "b", tx)?;
    let waited = rx
        .iter()
        .any(|l| l.contains("waiting for another push of hello"));
    assert!(waited, "one push waited for the other");
    // The push holding the lock may not have made the app's cache yet: the flag goes in
    // once it has (its build then waits for the flag).
    let cache = fleet.hub_dir.join("builds/hello/cache");
    unifleet_tests::fleet::wait_for("the first build's cache", Duration::from_secs(60), || {
        cache.is_dir().then_some(())
    })?;
    std::fs::write(cache.join("go"), b"")?;
    let outs = [pa.join().expect("push a"), pb.join().expect("push b")];
    let mut numbers: Vec<u64> = fleet
        .releases(None)?
        .iter()
        .filter_map(|r| r["release"].as_u64())
        .collect();
    numbers.sort();
    let landed = outs.iter().filter(|(ok, _)| *ok).count();
    assert!(landed >= 1, "{outs:?}");
    assert_eq!(numbers, (1..=landed as u64).collect::<Vec<_>>(), "{outs:?}");
    for (ok, said) in &outs {
        // The one that lost the race for the newer version says why.
        assert!(*ok || said.contains("is not above"), "{said}");
    }
    Ok(())
}

/// Two different apps pushed at once build side by side (each checkout once raced the
/// other for the deploy repository's index lock).
#[test]
fn two_apps_pushed_at_once_both_build() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let image = fleet.testimage("hello", "1.0.0", &[])?;
    let a = App::new(&fleet, "a", &image, "1.0.0", &build(""))?;
    let b = App::named(&fleet, "b", "other", &image, "1.0.0", &build(""))?;
    for k in 1..=3 {
        if k > 1 {
            a.change(&format!("1.0.{k}"), &build(""))?;
            b.change(&format!("1.0.{k}"), &build(""))?;
        }
        let (tx, _rx) = std::sync::mpsc::channel();
        let pa = push_in_background(&a, "a", tx.clone())?;
        let pb = push_in_background(&b, "b", tx)?;
        for (ok, said) in [pa.join().expect("a"), pb.join().expect("b")] {
            assert!(ok, "{said}");
        }
    }
    assert_eq!(fleet.releases(None)?.len(), 6);
    Ok(())
}

/// A pushed app name names the app's build directory: one that climbs out of it (or is
/// absolute) would bind any directory of the hub into the sandbox. Refused before
/// anything runs.
#[test]
fn an_app_name_that_climbs_out_of_the_build_directory_is_refused() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let image = fleet.testimage("hello", "1.0.0", &[])?;
    let app = App::new(&fleet, "app", &image, "1.0.0", &build(""))?;
    let toml = app.dir.join("unifleet.toml");
    let text = std::fs::read_to_string(&toml)?;
    for name in ["../../keys", "/tmp/elsewhere", "a/cache/p"] {
        std::fs::write(&toml, text.replace("\"hello\"", &format!("{name:?}")))?;
        app.git(&["commit", "-qam", name])?;
        let p = app.push()?;
        assert!(!p.ok, "{}", p.said);
        assert!(p.said.contains("unifleet.toml: app"), "{}", p.said);
        assert!(!p.said.contains("-----> build"), "nothing ran: {}", p.said);
    }
    assert!(!fleet.hub_dir.join("builds").exists());
    Ok(())
}

/// An image the build left as a symlink to the hub's release key is not published.
#[test]
fn an_image_linked_out_of_the_checkout_is_not_published() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let image = fleet.testimage("hello", "1.0.0", &[])?;
    let key = fleet.hub_dir.join("keys/release.key");
    let link = format!(
        "mkdir -p out && ln -sf {} out/hello.elf && exit 0; ",
        key.display()
    );
    let app = App::new(&fleet, "app", &image, "1.0.0", &build(&link))?;
    let p = app.push()?;
    assert!(!p.ok, "{}", p.said);
    assert!(
        p.said.contains("out/hello.elf leaves the repository"),
        "{}",
        p.said
    );
    assert!(fleet.releases(None)?.is_empty());
    Ok(())
}

/// Cargo configuration a build leaves in the cache's cargo home (a `rustc-wrapper`, which
/// the next fetch, the step with the network, would run) is removed before every step,
/// and the registry is read-only to builds.
#[test]
fn a_build_cannot_plant_cargo_configuration_or_change_the_registry() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let image = fleet.testimage("hello", "1.0.0", &[])?;
    let app = App::new(&fleet, "app", &image, "1.0.0", &build(""))?;
    std::fs::write(
        app.dir.join("plant.sh"),
        r#"mkdir -p /cache/cargo
printf '[build]\nrustc-wrapper = "/cache/evil.sh"\n' > /cache/cargo/config.toml
printf '#!/bin/sh\ntouch /cache/ran\nexec "$@"\n' > /cache/evil.sh
chmod +x /cache/evil.sh
touch /cache/cargo/registry/x || echo registry is read-only
"#,
    )?;
    app.change("1.0.0", &build("sh plant.sh; exit 1; "))?;
    let p = app.push()?;
    rejected(&p, "build");
    assert!(p.said.contains("registry is read-only"), "{}", p.said);
    let cache = fleet.hub_dir.join("builds/hello/cache");
    assert!(
        cache.join("cargo/config.toml").exists(),
        "the build wrote it"
    );
    // The next push has a Cargo.lock, so its fetch runs cargo (and rustc for the target).
    std::fs::create_dir_all(app.dir.join("src"))?;
    std::fs::write(app.dir.join("src/lib.rs"), "")?;
    std::fs::write(
        app.dir.join("Cargo.toml"),
        "[package]\nname = \"tiny\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    )?;
    std::fs::write(
        app.dir.join("Cargo.lock"),
        "version = 4\n\n[[package]]\nname = \"tiny\"\nversion = \"0.1.0\"\n",
    )?;
    app.change("1.0.0", &build(""))?;
    let p = app.push()?;
    assert!(p.ok, "{}", p.said);
    assert!(p.said.contains("fetch passed in"), "{}", p.said);
    assert!(
        !cache.join("cargo/config.toml").exists(),
        "removed before the fetch"
    );
    assert!(!cache.join("ran").exists(), "the planted wrapper never ran");
    Ok(())
}

/// A push that updates two branches is refused whole (git would move neither if one
/// failed, after the other's release went out); tags pass untouched.
#[test]
fn a_push_of_two_branches_is_refused_and_tags_pass() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let image = fleet.testimage("hello", "1.0.0", &[])?;
    let app = App::new(&fleet, "app", &image, "1.0.0", &build(""))?;
    let deploy = app.deploy.to_str().unwrap().to_string();
    let out = app.git(&[
        "push",
        &deploy,
        "main:refs/heads/one",
        "main:refs/heads/two",
    ])?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("push one branch at a time"), "{said}");
    assert!(fleet.releases(None)?.is_empty());
    app.git(&["tag", "v1.0.0"])?;
    let out = app.git(&["push", &deploy, "v1.0.0"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(fleet.releases(None)?.is_empty(), "a tag deploys nothing");
    Ok(())
}

/// The release's provenance (commit, builder, command, build log) is signed into it and
/// shown by `hub release show` and `hub releases`; `hub rebuild` builds the commit again
/// with an empty cache: the same image for an honest release, and a release whose build
/// took a tampered file from the app's cache is said to differ.
#[test]
fn provenance_is_shown_and_a_rebuild_tells_a_tampered_cache() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    let port = unifleet_tests::free_port()?;
    fleet.start_hub(&["--http", &format!("127.0.0.1:{port}")])?;
    let image = fleet.testimage("hello", "1.0.0", &[])?;
    // A build that, like cargo, reuses what its cache holds.
    let cached = "[build]\ncommand = \"mkdir -p out /cache/target && { [ -f /cache/target/hello.elf ] \
                  || cp prebuilt.elf /cache/target/hello.elf; } && cp /cache/target/hello.elf out/hello.elf\"\n\
                  images = { \"qemu-x86_64\" = \"out/hello.elf\" }\n";
    let app = App::new(&fleet, "app", &image, "1.0.0", cached)?;
    let p = app.push()?;
    assert!(p.ok, "{}", p.said);
    // With no device on the channel, the push does not wait for a first wave.
    assert!(
        p.said
            .contains("no device on stable has reported on hello within 5.0 s"),
        "{}",
        p.said
    );
    let hub = |args: &[&str]| -> Result<Output> { Ok(fleet.hub_cmd()?.args(args).output()?) };
    let text = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned();

    let show = hub(&["release", "show", "hello", "1.0.0"])?;
    let shown = text(&show);
    assert!(show.status.success(), "{shown}");
    for field in [
        format!("commit     {}", app.head()?),
        "builder    unifleet-hub ".into(),
        "command    mkdir -p out".into(),
        "SBOM       none (no Cargo.lock)".into(),
    ] {
        assert!(shown.contains(&field), "{field}: {shown}");
    }
    let log = text(&hub(&["release", "show", "hello", "1.0.0", "--log"])?);
    assert!(log.contains("-----> build passed in"), "{log}");
    let listed = text(&hub(&["releases", "hello"])?);
    let head = app.head()?;
    assert!(
        listed
            .lines()
            .any(|l| l.contains("v1") && l.contains(&head[..12])),
        "{listed}"
    );

    // The dashboard's releases page links the build log.
    let page = get(port, "/releases")?;
    let link = page
        .split("href=\"/provenance/")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .with_context(|| format!("no provenance link: {page}"))?;
    assert!(page.contains(&head[..12]), "{page}");
    let served = get(port, &format!("/provenance/{link}"))?;
    assert!(served.contains("-----> build passed in"), "{served}");

    let rebuilt = hub(&["rebuild", "hello", "1.0.0"])?;
    assert!(
        rebuilt.status.success(),
        "{}",
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    assert!(text(&rebuilt).contains("rebuilds bit for bit from commit"));

    // The cache's copy is changed behind the hub's back; the next push builds from it.
    let cached_elf = fleet.hub_dir.join("builds/hello/cache/target/hello.elf");
    let mut poisoned = std::fs::read(&cached_elf)?;
    poisoned.extend_from_slice(b"implant");
    std::fs::write(&cached_elf, poisoned)?;
    app.change("1.0.1", cached)?;
    assert!(app.push()?.ok);
    let rebuilt = hub(&["rebuild", "hello", "1.0.1"])?;
    let said = String::from_utf8_lossy(&rebuilt.stderr);
    assert!(!rebuilt.status.success());
    assert!(text(&rebuilt).contains("DIFFERS"), "{}", text(&rebuilt));
    assert!(
        said.contains("does not rebuild to what was released") && said.contains("tampered"),
        "{said}"
    );
    // A release published from a prebuilt image has nothing to rebuild.
    let prebuilt = fleet.testimage("hello", "2.0.0", &[])?;
    fleet.publish(&prebuilt, "hello", "2.0.0", &["--no-staging"])?;
    let none = hub(&["rebuild", "hello", "2.0.0"])?;
    assert!(String::from_utf8_lossy(&none.stderr).contains("published from a prebuilt image"));
    Ok(())
}

/// A bare HTTP GET; the whole answer.
fn get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Only cargo runs with the network, and only for crates.io: a Cargo.lock naming a git
/// dependency is refused before anything is fetched.
#[test]
fn a_lock_file_naming_another_source_is_refused_before_the_fetch() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let image = fleet.testimage("hello", "1.0.0", &[])?;
    let app = App::new(&fleet, "app", &image, "1.0.0", &build(""))?;
    std::fs::write(
        app.dir.join("Cargo.lock"),
        "version = 4\n\n[[package]]\nname = \"evil\"\nversion = \"0.1.0\"\n\
         source = \"git+https://git.example.invalid/evil#0123456789abcdef\"\n",
    )?;
    app.change("1.0.0", &build(""))?;
    let p = app.push()?;
    assert!(!p.ok);
    assert!(
        p.said.contains("evil") && p.said.contains("git+https://git.example.invalid"),
        "{}",
        p.said
    );
    assert!(
        !p.said.contains("-----> fetch"),
        "nothing fetched: {}",
        p.said
    );
    assert!(fleet.releases(None)?.is_empty());
    Ok(())
}

/// Review finding: the hub read the checkout's Cargo.lock itself, following a link the
/// pusher committed, and a parse error quoted the line it choked on — the release key's
/// bytes, back to the pusher. A link (or anything but a regular file) is refused unread.
#[test]
fn a_cargo_lock_linked_to_the_hub_key_is_not_read() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let image = fleet.testimage("hello", "1.0.0", &[])?;
    let app = App::new(&fleet, "app", &image, "1.0.0", &build(""))?;
    let key = fleet.hub_dir.join("keys/release.key");
    std::os::unix::fs::symlink(&key, app.dir.join("Cargo.lock"))?;
    app.change("1.0.0", &build(""))?;
    let p = app.push()?;
    assert!(!p.ok, "{}", p.said);
    assert!(p.said.contains("Cargo.lock is a link"), "{}", p.said);
    let secret = std::fs::read(&key)?;
    let said = p.said.as_bytes();
    assert!(
        !said.windows(24).any(|w| secret.windows(24).any(|k| k == w)),
        "none of the key's bytes came back"
    );
    assert!(fleet.releases(None)?.is_empty());
    Ok(())
}

/// Review finding: `[test] functional` runs against staged instances, so a push that
/// skipped staging everywhere was signed with its functional tests never run, silently.
#[test]
fn functional_tests_without_staging_are_refused() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let image = fleet.testimage("hello", "1.0.0", &[])?;
    // App's unifleet.toml says no_staging = true.
    let functional = format!("{}[test]\nfunctional = \"true\"\n", build(""));
    let app = App::new(&fleet, "app", &image, "1.0.0", &functional)?;
    let p = app.push()?;
    assert!(!p.ok, "{}", p.said);
    assert!(
        p.said.contains("skips staging on every platform"),
        "{}",
        p.said
    );
    assert!(fleet.releases(None)?.is_empty());
    Ok(())
}
