//! unifleet's wire protocol and trust model.
//!
//! Everything a hub, a device and the operator's offline tool must agree on lives here:
//! the one codec ([`codec`]), content digests ([`digest`]), keys ([`keys`]), signed
//! envelopes ([`envelope`]), the TUF-style trust root ([`root`], its roles in [`role`]), release manifests
//! ([`manifest`]), announcements ([`announcement`]), content-defined chunking
//! ([`chunking`]) and image header inspection ([`image`]).
//!
//! This crate does no I/O and holds no clock: callers pass bytes in and the current time
//! (`now`, seconds since the Unix epoch) where expiry matters.
//!
//! Each signed type has exactly one verification entry point, which returns a verified
//! value or a [`VerifyError`] naming the single check that failed:
//! [`root::TrustedRoot::bootstrap`] / [`root::TrustedRoot::update`],
//! [`manifest::verify_manifest`], [`announcement::verify_announcement`] (authentic and
//! fresh; [`manifest::Expectations::applies`] then says whether it is for this device),
//! [`revocation::verify_revocations`], and for the bytes a manifest points at,
//! [`manifest::ImageVerifier`].
#![forbid(unsafe_code)]

pub mod announcement;
pub mod blob;
pub mod chunking;
pub mod codec;
pub mod digest;
pub mod envelope;
mod error;
mod fixed_bytes;
pub mod image;
pub mod keys;
pub mod manifest;
pub mod names;
pub mod revocation;
pub mod role;
pub mod rollout;
pub mod root;
pub mod status;
pub mod targeted;

pub use digest::Digest;
pub use error::{Chain, Declared, Invalid, VerifyError};
pub use keys::{KeyId, PublicKey, SecretKey};
