//! The subcommands that talk to a running server.

pub mod gc;
