//! Shared utilities for unifleet end-to-end tests.
