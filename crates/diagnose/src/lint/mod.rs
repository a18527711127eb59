//! Linting build configurations.
