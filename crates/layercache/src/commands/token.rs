//! `layercache token`: mint a runtime token for the Actions cache service.

use anyhow::Context;

use crate::cli::{ServeArgs, TokenArgs};
use crate::config::Config;

/// Print a token granting `args`' scopes, signed with the server's key.
pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.read.is_empty() || args.write.is_some(),
        "name at least one scope with --read or --write"
    );
    let config = Config::load(&ServeArgs {
        config: args.config,
        listen: None,
        data_dir: args.data_dir,
        max_size: None,
        print_config: false,
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
        },
    )?;
    println!("{token}");
    Ok(())
}
