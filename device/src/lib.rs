//! The unifleet device agent: learns of releases from the broker or from peers, fetches
//! only missing chunks (peers first, hub as fallback), verifies every byte, installs
//! crash-safely into a new slot, activates through libvirt with a health probe and
//! automatic rollback, reports signed status, and seeds what it holds to peers.
//!
//! Modules: [`config`] (TOML), [`store`] (state directory), [`fetch`], [`hypervisor`]
//! (the owner of libvirt), [`probe`] (health of a booted guest), [`report`], [`mqtt`], and [`agent`] which ties them together.
// Unit tests spawn freely; the product code goes through net::tasks (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod accel;
pub mod agent;
pub mod autoscale;
pub mod config;
pub mod fetch;
pub mod hosted;
pub mod hypervisor;
pub mod metrics;
pub mod mqtt;
pub mod ondemand;
pub mod probe;
pub mod report;
pub mod schedule;
pub mod splice;
pub mod store;
pub mod time;
pub mod trickle;
pub mod trust;
pub mod updater;
pub mod watchdog;
