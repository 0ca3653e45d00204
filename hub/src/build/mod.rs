//! Building what developers push: the sandbox a build or test command runs in.

pub mod sandbox;
