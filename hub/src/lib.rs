//! The unifleet hub: turns an operator's image into a signed release, keeps every release
//! and event in a git repository, announces releases over MQTT and libp2p, serves blobs
//! to peers, and keeps an inventory of enrolled devices from their signed reports.
//!
//! Modules: [`home`] (hub directory and config), [`init`], [`store`] (git), [`build`] (the
//! sandbox pushed code builds in),
//! [`store_owner`] (the threads that own `hub serve`'s store), [`publish`] (the pipeline),
//! [`deploy`] (git push), [`serve`] (the daemon), [`broker`] (embedded MQTT), [`control`]
//! (local socket), [`metrics`].
// Unit tests spawn freely; the product code goes through net::tasks (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod blobs;
pub mod broker;
pub mod build;
pub mod control;
pub mod dashboard;
pub mod deploy;
pub mod enroll;
pub mod history;
pub mod home;
pub mod init;
pub mod inventory;
pub mod metrics;
pub mod mirror;
pub mod pages;
pub mod place;
pub mod publish;
pub mod rebuild;
pub mod restore;
pub mod rollout;
pub mod serve;
pub mod staging;
pub mod store;
pub mod store_owner;
pub mod suspects;
pub mod targeted;
pub mod template;
pub mod tracker;
pub mod trust;
pub mod view;
