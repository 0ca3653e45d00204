//! The unifleet device agent: announcements, fetcher, installer, libvirt activator.
//!
//! Not built yet; tracked as its own issue. The crate exists so the workspace shape and
//! its dependency rules (device never depends on hub) hold from the first commit.
