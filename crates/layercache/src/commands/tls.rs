//! `layercache tls init`: a private certificate authority and a server certificate it
//! signs, for `[server.tls]`. An existing CA is kept (clients already trust it) unless
//! `--force`; the server pair is replaced atomically, so a running server picks it up.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::cli::{ServeArgs, TlsInitArgs};
use crate::config::Config;

/// Days a new CA is valid at least.
const CA_DAYS: u32 = 3650;

/// Write the CA (unless it exists) and a server certificate for `args.hosts`, then print
/// the server configuration and where each client wants the CA.
pub fn init(args: TlsInitArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.days > 0, "--days must be at least 1");
    let config = Config::load(&ServeArgs {
        config: args.config,
        data_dir: args.data_dir,
        ..ServeArgs::default()
    })?;
    let dir = args
        .dir
        .unwrap_or_else(|| config.store.data_dir.join("tls"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::path::absolute(&dir)?;
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let (server_crt, server_key) = (dir.join("server.crt"), dir.join("server.key"));

    let (issuer, kept) = match (ca_crt.exists(), ca_key.exists(), args.force) {
        (true, true, false) => (existing_ca(&ca_crt, &ca_key)?, true),
        (false, false, _) | (_, _, true) => {
            (new_ca(&ca_crt, &ca_key, args.days.max(CA_DAYS))?, false)
        }
        _ => anyhow::bail!(
            "{} has only one of ca.crt and ca.key: restore the other, or make a new CA with \
             --force",
            dir.display()
        ),
    };

    let mut params = CertificateParams::new(args.hosts.clone())
        .context("a --host is neither an IP address nor a DNS name")?;
    if let Some(first) = args.hosts.first() {
        params.distinguished_name.push(DnType::CommonName, first);
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params, args.days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write(&server_key, &key.serialize_pem(), true)?;
    write(&server_crt, &cert.pem(), false)?;

    let port = config.server.listen.port();
    let quoted = |path: &Path| toml::Value::String(path.display().to_string()).to_string();
    let ca_state = if kept { "kept" } else { "new" };
    println!("In {}:", dir.display());
    println!("  ca.crt      the private CA ({ca_state}): what clients trust");
    println!("  ca.key      its key (0600): only `tls init` needs it, no client or server");
    println!(
        "  server.crt  for {}, valid {} days",
        args.hosts.join(", "),
        args.days
    );
    println!("  server.key  its key (0600)");
    println!();
    println!("Server configuration (re-read when the files change, or on SIGHUP):");
    println!("  [server.tls]");
    println!("  cert = {}", quoted(&server_crt));
    println!("  key = {}", quoted(&server_key));
    println!();
    println!("Clients trust {} where they look for it:", ca_crt.display());
    for host in &args.hosts {
        let address = match host.parse::<std::net::Ipv6Addr>() {
            Ok(_) => format!("[{host}]:{port}"),
            Err(_) => format!("{host}:{port}"),
        };
        println!("  {address}");
        println!("    docker (dockerd):  /etc/docker/certs.d/{address}/ca.crt");
        println!(
            "    buildkitd.toml:    [registry.\"{address}\"] ca = [{}]",
            quoted(&ca_crt)
        );
        println!(
            "    buildah, skopeo:   --cert-dir DIR (a directory holding ca.crt and no .key), \
             or /etc/containers/certs.d/{address}/ca.crt"
        );
    }
    println!(
        "  dockerd reads certs.d per request, but its BuildKit learns of new directories when \
         dockerd starts; docker build fetches BuildKit's tokens in the client, which trusts \
         the system's roots (or SSL_CERT_FILE)."
    );
    Ok(())
}

/// The CA in `crt` and `key`.
fn existing_ca(crt: &Path, key: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let pem = std::fs::read_to_string(crt).with_context(|| format!("reading {}", crt.display()))?;
    let key_pem =
        std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
    let key = KeyPair::from_pem(&key_pem).with_context(|| format!("parsing {}", key.display()))?;
    Issuer::from_ca_cert_pem(&pem, key).with_context(|| format!("parsing {}", crt.display()))
}

/// A new CA valid for `days`, written to `crt` and `key`.
fn new_ca(crt: &Path, key: &Path, days: u32) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "layercache");
    params
        .distinguished_name
        .push(DnType::CommonName, "layercache private CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days);
    let key_pair = KeyPair::generate()?;
    let cert = params.self_signed(&key_pair)?;
    write(key, &key_pair.serialize_pem(), true)?;
    write(crt, &cert.pem(), false)?;
    Ok(Issuer::new(params, key_pair))
}

/// Valid from an hour ago (clocks differ) for `days`.
fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + Duration::from_secs(u64::from(days) * 86_400);
}

/// Replace `path` with `contents` atomically; readable by its owner only if `private`.
fn write(path: &Path, contents: &str, private: bool) -> anyhow::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".new");
    let staged: PathBuf = path.with_file_name(name);
    let _ = std::fs::remove_file(&staged);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options
        .open(&staged)
        .with_context(|| format!("creating {}", staged.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", staged.display()))?;
    std::fs::rename(&staged, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
