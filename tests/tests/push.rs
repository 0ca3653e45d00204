//! Issue 29: `git push` of source — a real `git` client pushing to the hub's deploy
//! repository, whose pre-receive hook builds and tests the commit in the sandbox (real
//! bubblewrap) and publishes it; the branch moves only if every step passed. The builds
//! here copy a prebuilt test image (the sandbox is what is tested, not a compiler); the
//! Rust template built from source is in `unikernel.rs`.

use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use unifleet_tests::fleet::Fleet;

/// An app's repository with the hub's deploy repository as remote `unifleet`.
struct App {
    dir: PathBuf,
    deploy: PathBuf,
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
        let dir = fleet.path(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(image, dir.join("prebuilt.elf"))?;
        let app = App {
            dir,
            deploy: fleet.hub_dir.join("deploy.git"),
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
            format!("app = \"hello\"\nversion = \"{version}\"\nno_staging = true\n{rest}"),
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
        "python3 -c 'import socket; socket.create_connection((\\\"127.0.0.1\\\", {port}), 2)' \
         && echo reached the network || echo no network; exit 1; "
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

/// Two pushes of one app at once: the second waits for the first's build, and release
/// numbers stay dense.
#[test]
fn two_pushes_at_once_build_one_after_the_other() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let image = fleet.testimage("hello", "1.0.0", &[])?;
    let a = App::new(&fleet, "a", &image, "1.0.1", &build("sleep 2; "))?;
    let b = App::new(&fleet, "b", &image, "1.0.2", &build("sleep 2; "))?;
    let branch = |app: &App, to: &str| -> Result<std::process::Child> {
        Ok(Command::new("git")
            .arg("push")
            .arg(&app.deploy)
            .arg(format!("main:refs/heads/{to}"))
            .current_dir(&app.dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?)
    };
    let pa = branch(&a, "a")?;
    let pb = branch(&b, "b")?;
    let outs = [pa.wait_with_output()?, pb.wait_with_output()?];
    let said: Vec<String> = outs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert!(
        said.iter()
            .any(|s| s.contains("waiting for another push of hello")),
        "one push waited for the other: {said:?}"
    );
    let mut numbers: Vec<u64> = fleet
        .releases(None)?
        .iter()
        .filter_map(|r| r["release"].as_u64())
        .collect();
    numbers.sort();
    let landed = outs.iter().filter(|o| o.status.success()).count();
    assert!(landed >= 1, "{said:?}");
    assert_eq!(numbers, (1..=landed as u64).collect::<Vec<_>>(), "{said:?}");
    for (o, s) in outs.iter().zip(&said) {
        // The one that lost the race for the newer version says why.
        assert!(o.status.success() || s.contains("is not above"), "{s}");
    }
    Ok(())
}
