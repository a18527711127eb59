//! Explaining cache misses.
