//! Building what developers push: [`source`] checks a pushed commit out, fetches its
//! dependencies, builds and tests it, each step in the [`sandbox`].

mod lines;
pub mod sandbox;
pub mod sbom;
pub mod source;
