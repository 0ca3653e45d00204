//! The unifleet hub: publish pipeline, git release store, signer and announcer.
//!
//! Not built yet; tracked as its own issue. The crate exists so the workspace shape and
//! its dependency rules (hub never depends on device) hold from the first commit.
