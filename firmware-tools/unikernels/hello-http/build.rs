//! Hands the linker the script for the target's boot protocol (multiboot on x86_64, the arm64
//! Image layout on aarch64). Host builds (the unit tests of the library) get nothing.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let target = std::env::var("TARGET").expect("cargo sets TARGET");
    let script = match target.as_str() {
        "x86_64-unknown-none" => "link-x86_64.ld",
        "aarch64-unknown-none" => "link-aarch64.ld",
        _ => return,
    };
    println!("cargo:rustc-link-arg-bins=-T{dir}/{script}");
    println!("cargo:rerun-if-changed={script}");
    for asm in ["src/arch/x86_64/boot.S", "src/arch/aarch64/boot.S"] {
        println!("cargo:rerun-if-changed={asm}");
    }
}
