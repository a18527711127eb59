//! The HTTP section of the configuration.

use std::net::SocketAddr;
use std::time::Duration;

/// How the server listens.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// How requests are grouped into build sessions.
    pub sessions: crate::sessions::Config,
    /// What one connection and one identity may hold.
    pub limits: crate::limits::Limits,
    /// Who may pull, push and delete.
    pub auth: crate::auth::Config,
    /// HTTPS: the certificate and key to serve with (unset: plain HTTP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::Config>,
    /// The log of writes, deletes, administrative actions and denials.
    pub audit: crate::audit::Config,
    /// On `SIGTERM` or Ctrl-C the server stops accepting connections and lets the
    /// requests in flight finish for at most this long; connections still open then
    /// are closed (an upload cut off this way resumes from what was received).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            sessions: crate::sessions::Config::default(),
            limits: crate::limits::Limits::default(),
            auth: crate::auth::Config::default(),
            tls: None,
            audit: crate::audit::Config::default(),
            // Under the 30 s that Kubernetes, and `docker stop -t 30`, allow before
            // `SIGKILL`, with room to save the state after the drain.
            shutdown_timeout: Duration::from_secs(20),
        }
    }
}
