//! The parts of hello-http that need no hardware: the command line, the HTTP parser and the
//! application's answers. `no_std` in the image; unit-tested on the host with
//! `cargo test --target x86_64-unknown-linux-gnu --lib`.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod app;
pub mod config;
pub mod http;
