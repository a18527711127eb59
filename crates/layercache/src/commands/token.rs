//! `layercache token`: mint a credential: a runtime token for the Actions cache service,
//! a registry password (any user name), or both.

use anyhow::Context;

use crate::cli::{ServeArgs, TokenArgs};
use crate::config::Config;

/// Print a token granting `args`' scopes, signed with the server's key.
pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    let registry = server::auth::RegistryScopes {
        pull: args.pull,
        push: args.push,
        delete: args.delete,
        view: args.view || args.admin,
        admin: args.admin,
    };
    anyhow::ensure!(
        !args.read.is_empty() || args.write.is_some() || !registry.is_empty(),
        "name at least one scope: --read or --write (Actions cache), --pull, --push or \
         --delete (registry), --view or --admin (the API, /metrics and /ui)"
    );
    registry.check().map_err(anyhow::Error::msg)?;
    let config = Config::load(&ServeArgs {
        config: args.config,
        data_dir: args.data_dir,
        ..ServeArgs::default()
    })?;
    let path = config.actions.key_path(&config.store.data_dir);
    let key = server::actions::token::load_or_create_key(&path)
        .with_context(|| format!("reading the signing key {}", path.display()))?;
    let token = server::actions::token::mint(
        &key,
        &server::actions::TokenRequest {
            read: args.read,
            write: args.write,
            ttl: args.ttl.into(),
            repository: args.repository,
            session: args.session,
            registry,
        },
    )?;
    println!("{token}");
    Ok(())
}
