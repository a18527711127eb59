//! The whole configuration, layered lowest to highest: defaults, the TOML file
//! (`--config` or `LAYERCACHE_CONFIG`), the environment (`LAYERCACHE_STORE__DATA_DIR=…`,
//! `__` separating sections), then command-line flags.

use anyhow::Context;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};

use crate::cli::ServeArgs;

/// Every section of layercache's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP listener.
    pub server: server::Config,
    /// Storage.
    pub store: store::Config,
    /// The GitHub Actions cache service.
    pub actions: server::actions::Config,
    /// Registries reads are filled from: public registries mirrored, or the central
    /// layercache of an edge.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<server::upstream::Config>,
}

impl Config {
    /// Build the effective configuration for `serve`.
    pub fn load(args: &ServeArgs) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &args.config {
            anyhow::ensure!(
                path.is_file(),
                "config file {} does not exist",
                path.display()
            );
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(
            Env::prefixed("LAYERCACHE_")
                .ignore(&["CONFIG", "SERVER", "UPSTREAM", "UPSTREAM_TOKEN_FILE"])
                .split("__"),
        );
        if let Some(listen) = args.listen {
            figment = figment.merge(Serialized::default("server.listen", listen));
        }
        if let Some(dir) = &args.data_dir {
            figment = figment.merge(Serialized::default("store.data_dir", dir));
        }
        if args.open {
            figment = figment.merge(Serialized::default(
                "server.auth.mode",
                server::auth::Mode::Open,
            ));
        }
        if let Some(url) = &args.upstream {
            let mut config: Config = figment.extract().context("invalid configuration")?;
            let centre =
                server::upstream::Config::centre(url.clone(), args.upstream_token_file.clone());
            config.upstreams.retain(|u| !u.name.is_empty());
            config.upstreams.push(centre);
            figment = figment.merge(Serialized::default("upstreams", config.upstreams));
        }
        if let Some(size) = args.max_size {
            figment = figment.merge(Serialized::default("store.eviction.max_size", size));
        }
        figment.extract().context("invalid configuration")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_example_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                toml::from_str::<Config>(&text)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen > 0, "no example configurations found");
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("[store]\ndata_dri = \"x\"").is_err());
    }
}
