//! Diagnostics over parsed inputs, no network and no server:
//!
//! * [`explain`]: why a build missed the cache: two images or cache exports aligned
//!   layer by layer, the first step that diverged, an image that cannot serve as a cache;
//! * [`lint`]: CI and build configurations (Dockerfiles, compose, bake and GitHub
//!   workflow files) checked for the mistakes that silently lose the cache.

pub mod explain;
pub mod lint;
