//! The machine: one module per architecture, each with the same functions (console, clock,
//! idle, halt, PCI configuration access). Every `unsafe` block of the kernel that touches
//! hardware directly is in these modules or in `hal`.

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
pub use aarch64::*;

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;
