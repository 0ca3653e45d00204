//! The template a new app starts from (`hub new APP`): the Rust unikernel of
//! `firmware-tools/unikernels` — its sources, its build script and a `unifleet.toml` that
//! builds, tests and releases it — compiled into the hub binary, so a repository that
//! pushes as is can be made anywhere the hub runs.

use std::path::{Path, PathBuf};

/// One file of the template: its path in the new repository and its bytes.
#[derive(Debug, Clone, Copy)]
pub struct File {
    pub path: &'static str,
    pub bytes: &'static [u8],
}

const fn file(path: &'static str, bytes: &'static [u8]) -> File {
    File { path, bytes }
}

/// Every file of `firmware-tools/unikernels` that git tracks, but `unifleet.toml`, which
/// [`unifleet_toml`] writes for the app (a test keeps this list whole).
pub const FILES: &[File] = &[
    file(
        ".cargo/config.toml",
        include_bytes!("../../firmware-tools/unikernels/.cargo/config.toml"),
    ),
    file(
        ".gitignore",
        include_bytes!("../../firmware-tools/unikernels/.gitignore"),
    ),
    file(
        "Cargo.lock",
        include_bytes!("../../firmware-tools/unikernels/Cargo.lock"),
    ),
    file(
        "Cargo.toml",
        include_bytes!("../../firmware-tools/unikernels/Cargo.toml"),
    ),
    file(
        "build.sh",
        include_bytes!("../../firmware-tools/unikernels/build.sh"),
    ),
    file(
        "hello-http/Cargo.toml",
        include_bytes!("../../firmware-tools/unikernels/hello-http/Cargo.toml"),
    ),
    file(
        "hello-http/README.md",
        include_bytes!("../../firmware-tools/unikernels/hello-http/README.md"),
    ),
    file(
        "hello-http/build.rs",
        include_bytes!("../../firmware-tools/unikernels/hello-http/build.rs"),
    ),
    file(
        "hello-http/link-aarch64.ld",
        include_bytes!("../../firmware-tools/unikernels/hello-http/link-aarch64.ld"),
    ),
    file(
        "hello-http/link-x86_64.ld",
        include_bytes!("../../firmware-tools/unikernels/hello-http/link-x86_64.ld"),
    ),
    file(
        "hello-http/src/app.rs",
        include_bytes!("../../firmware-tools/unikernels/hello-http/src/app.rs"),
    ),
    file(
        "hello-http/src/arch/aarch64/boot.S",
        include_bytes!("../../firmware-tools/unikernels/hello-http/src/arch/aarch64/boot.S"),
    ),
    file(
        "hello-http/src/arch/aarch64/mod.rs",
        include_bytes!("../../firmware-tools/unikernels/hello-http/src/arch/aarch64/mod.rs"),
    ),
    file(
        "hello-http/src/arch/mod.rs",
        include_bytes!("../../firmware-tools/unikernels/hello-http/src/arch/mod.rs"),
    ),
    file(
        "hello-http/src/arch/x86_64/boot.S",
        include_bytes!("../../firmware-tools/unikernels/hello-http/src/arch/x86_64/boot.S"),
    ),
    file(
        "hello-http/src/arch/x86_64/mod.rs",
        include_bytes!("../../firmware-tools/unikernels/hello-http/src/arch/x86_64/mod.rs"),
    ),
    file(
        "hello-http/src/config.rs",
        include_bytes!("../../firmware-tools/unikernels/hello-http/src/config.rs"),
    ),
    file(
        "hello-http/src/hal.rs",
        include_bytes!("../../firmware-tools/unikernels/hello-http/src/hal.rs"),
    ),
    file(
        "hello-http/src/http.rs",
        include_bytes!("../../firmware-tools/unikernels/hello-http/src/http.rs"),
    ),
    file(
        "hello-http/src/lib.rs",
        include_bytes!("../../firmware-tools/unikernels/hello-http/src/lib.rs"),
    ),
    file(
        "hello-http/src/main.rs",
        include_bytes!("../../firmware-tools/unikernels/hello-http/src/main.rs"),
    ),
    file(
        "hello-http/src/net.rs",
        include_bytes!("../../firmware-tools/unikernels/hello-http/src/net.rs"),
    ),
    file(
        "hello-http/src/pci.rs",
        include_bytes!("../../firmware-tools/unikernels/hello-http/src/pci.rs"),
    ),
    file(
        "hello-http/src/server.rs",
        include_bytes!("../../firmware-tools/unikernels/hello-http/src/server.rs"),
    ),
    file(
        "hello-http/test/boot_time.py",
        include_bytes!("../../firmware-tools/unikernels/hello-http/test/boot_time.py"),
    ),
    file(
        "hello-http/test/concurrency.py",
        include_bytes!("../../firmware-tools/unikernels/hello-http/test/concurrency.py"),
    ),
    file(
        "hello-http/test/functional.py",
        include_bytes!("../../firmware-tools/unikernels/hello-http/test/functional.py"),
    ),
];

/// The template's `unifleet.toml`, its app named `app`.
pub fn unifleet_toml(app: &str) -> String {
    let text = include_str!("../../firmware-tools/unikernels/unifleet.toml");
    text.replace("app = \"hello\"", &format!("app = \"{app}\""))
        .replace("app=hello ", &format!("app={app} "))
}

/// Why `hub new` made nothing.
#[derive(Debug, thiserror::Error)]
pub enum NewError {
    #[error("{} exists already: choose another directory (--into) or remove it", .0.display())]
    Exists(PathBuf),
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("making {} a git repository with a first commit", dir.display())]
    Git {
        dir: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error(transparent)]
    Name(#[from] proto::names::BadName),
}

/// Writes the template into `dir` (which must not exist) as app `app`, makes it a git
/// repository with one commit on `main`, and, given the hub's deploy repository, adds it
/// as the remote `unifleet`.
pub fn create(dir: &Path, app: &str, deploy: Option<&Path>) -> Result<(), NewError> {
    proto::names::check("app", app)?;
    if dir.exists() {
        return Err(NewError::Exists(dir.to_path_buf()));
    }
    let toml = unifleet_toml(app);
    let all = FILES
        .iter()
        .map(|f| (f.path, f.bytes))
        .chain([("unifleet.toml", toml.as_bytes())]);
    for (path, bytes) in all {
        let to = dir.join(path);
        let write = |to: &Path| -> std::io::Result<()> {
            std::fs::create_dir_all(to.parent().expect("a file in the directory"))?;
            std::fs::write(to, bytes)?;
            if path.ends_with(".sh") {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))?;
            }
            Ok(())
        };
        write(&to).map_err(|source| NewError::Write { path: to, source })?;
    }
    commit(dir, app, deploy).map_err(|source| NewError::Git {
        dir: dir.to_path_buf(),
        source,
    })
}

fn commit(dir: &Path, app: &str, deploy: Option<&Path>) -> Result<(), git2::Error> {
    let mut opts = git2::RepositoryInitOptions::new();
    opts.initial_head("main");
    let repo = git2::Repository::init_opts(dir, &opts)?;
    let mut index = repo.index()?;
    index.add_all(["*"], git2::IndexAddOption::DEFAULT, None)?;
    index.write()?;
    let tree = repo.find_tree(index.write_tree()?)?;
    // The pusher's own identity if git knows it, else one that says where it came from.
    let sig = repo
        .signature()
        .or_else(|_| git2::Signature::now("unifleet", "hub@unifleet.invalid"))?;
    repo.commit(
        Some("HEAD"),
        &sig,
        &sig,
        &format!("{app}: a new unifleet app from the hub's template"),
        &tree,
        &[],
    )?;
    if let Some(deploy) = deploy {
        repo.remote("unifleet", &deploy.display().to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The template is what `firmware-tools/unikernels` holds: a file added there and not
    /// here would be missing from every new app.
    #[test]
    fn the_template_holds_every_tracked_file_of_the_unikernel_workspace() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-tools/unikernels");
        let out = std::process::Command::new("git")
            .args(["ls-files"])
            .current_dir(&root)
            .output()
            .expect("git ls-files");
        let mut tracked: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| *l != "unifleet.toml")
            .map(String::from)
            .collect();
        tracked.sort();
        let mut ours: Vec<String> = FILES.iter().map(|f| f.path.to_string()).collect();
        ours.sort();
        assert_eq!(ours, tracked);
    }

    #[test]
    fn a_new_app_is_a_repository_with_one_commit_naming_the_app() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("web");
        create(&dir, "web", Some(Path::new("/hub/deploy.git"))).unwrap();
        let toml = std::fs::read_to_string(dir.join("unifleet.toml")).unwrap();
        assert!(toml.contains("app = \"web\""), "{toml}");
        assert!(
            toml.contains("cmdline = \"app=web version=0.1.0\""),
            "{toml}"
        );
        let repo = git2::Repository::open(&dir).unwrap();
        let head = repo.head().unwrap();
        assert_eq!(head.shorthand().ok(), Some("main"));
        assert!(
            repo.statuses(None).unwrap().is_empty(),
            "everything committed"
        );
        assert_eq!(
            repo.find_remote("unifleet").unwrap().url().ok(),
            Some("/hub/deploy.git")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("build.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "build.sh is executable");
        assert!(matches!(
            create(&dir, "web", None),
            Err(NewError::Exists(_))
        ));
        assert!(matches!(
            create(&tmp.path().join("x"), "Bad Name", None),
            Err(NewError::Name(_))
        ));
    }
}
