//! The HTTP section of the configuration.

use std::net::SocketAddr;

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
        }
    }
}
