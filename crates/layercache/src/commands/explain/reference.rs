//! What `explain` is pointed at: an image reference on a registry (`host:5000/app:v1`,
//! `app@sha256:…`, Docker Hub short names) or an OCI image layout on disk (`oci:DIR[:TAG]`,
//! or a directory holding `index.json`).

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Docker Hub's registry host, for references without one.
const DOCKER_HUB: &str = "registry-1.docker.io";

/// Where content lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A repository on a registry.
    Registry(RemoteRef),
    /// An OCI image layout directory.
    Layout {
        /// The directory holding `index.json`.
        path: PathBuf,
        /// The `org.opencontainers.image.ref.name` to pick, if any.
        tag: Option<String>,
    },
}

/// A manifest on a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRef {
    /// `http://host:port` or `https://host`.
    pub base: String,
    /// The repository.
    pub repo: String,
    /// A tag or a digest.
    pub reference: String,
    /// As the user wrote it.
    pub text: String,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Registry(r) => f.write_str(&r.text),
            Location::Layout { path, tag: None } => write!(f, "oci:{}", path.display()),
            Location::Layout {
                path,
                tag: Some(tag),
            } => write!(f, "oci:{}:{tag}", path.display()),
        }
    }
}

/// Whether `host` (with or without a port) is this machine: plain HTTP by default, as
/// dockerd and BuildKit treat it.
fn is_local(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name == "localhost" || name == "::1" || name.starts_with("127.")
}

/// The reference a BuildKit cache option pasted from a build command names
/// (`type=registry,ref=HOST/REPO:TAG,mode=max`, or `type=local,src=DIR` as a layout).
fn cache_option(text: &str) -> Option<String> {
    if !text.starts_with("type=") && !text.starts_with("ref=") {
        return None;
    }
    let field = |key: &str| {
        text.split(',')
            .filter_map(|f| f.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    };
    match field("type") {
        Some("local") => field("src").map(|dir| format!("oci:{dir}")),
        _ => field("ref").map(str::to_owned),
    }
}

/// Parse `text` (a pasted BuildKit cache option too); `insecure` makes registries other
/// than this machine plain HTTP too.
pub fn parse(text: &str, insecure: bool) -> anyhow::Result<Location> {
    if let Some(named) = cache_option(text) {
        return parse(&named, insecure);
    }
    if let Some(rest) = text.strip_prefix("oci:") {
        return Ok(layout(rest));
    }
    if Path::new(text).join("index.json").is_file() {
        return Ok(Location::Layout {
            path: PathBuf::from(text),
            tag: None,
        });
    }
    let (scheme, rest) = if let Some(rest) = text.strip_prefix("http://") {
        (Some("http"), rest)
    } else if let Some(rest) = text.strip_prefix("https://") {
        (Some("https"), rest)
    } else {
        (None, text)
    };
    let (name, digest) = match rest.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (rest, None),
    };
    let (name, tag) = match name.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, Some(t)),
        _ => (name, None),
    };
    let (host, repo) = match name.split_once('/') {
        Some((first, path))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_owned(), path.to_owned())
        }
        _ if name.contains('/') => (DOCKER_HUB.to_owned(), name.to_owned()),
        _ => (DOCKER_HUB.to_owned(), format!("library/{name}")),
    };
    let host = if host == "docker.io" || host == "index.docker.io" {
        DOCKER_HUB.to_owned()
    } else {
        host
    };
    repo.parse::<oci::RepoName>().with_context(|| {
        format!("{text:?} is not an image reference (REGISTRY/REPOSITORY[:TAG][@DIGEST])")
    })?;
    let reference = match (digest, tag) {
        (Some(d), _) => {
            d.parse::<oci::Digest>()
                .with_context(|| format!("{text:?}: {d:?} is not a digest"))?;
            d.to_owned()
        }
        (None, Some(t)) => {
            t.parse::<oci::Tag>()
                .with_context(|| format!("{text:?}: {t:?} is not a tag"))?;
            t.to_owned()
        }
        (None, None) => "latest".to_owned(),
    };
    if host.is_empty() {
        bail!("{text:?} names no registry");
    }
    let scheme = scheme.unwrap_or(if insecure || is_local(&host) {
        "http"
    } else {
        "https"
    });
    Ok(Location::Registry(RemoteRef {
        base: format!("{scheme}://{host}"),
        repo,
        reference,
        text: text.to_owned(),
    }))
}

/// `DIR[:TAG]` after `oci:`: the whole text when it is a directory, else split at the
/// last `:` that is not part of the path.
fn layout(rest: &str) -> Location {
    if Path::new(rest).is_dir() {
        return Location::Layout {
            path: PathBuf::from(rest),
            tag: None,
        };
    }
    match rest.rsplit_once(':') {
        Some((path, tag)) if !tag.contains('/') && !path.is_empty() => Location::Layout {
            path: PathBuf::from(path),
            tag: Some(tag.to_owned()),
        },
        _ => Location::Layout {
            path: PathBuf::from(rest),
            tag: None,
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn remote(text: &str) -> RemoteRef {
        match parse(text, false).unwrap() {
            Location::Registry(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn references_name_a_registry_repository_and_tag_or_digest() {
        let r = remote("127.0.0.1:5000/cache/app:pr-12");
        assert_eq!(
            (r.base.as_str(), r.repo.as_str(), r.reference.as_str()),
            ("http://127.0.0.1:5000", "cache/app", "pr-12")
        );
        let r = remote("localhost:5000/app");
        assert_eq!(
            (r.base.as_str(), r.reference.as_str()),
            ("http://localhost:5000", "latest")
        );
        let r = remote("ghcr.io/org/app:v1");
        assert_eq!(r.base, "https://ghcr.io");
        let r = remote("busybox");
        assert_eq!(
            (r.base.as_str(), r.repo.as_str()),
            ("https://registry-1.docker.io", "library/busybox")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = remote(&format!("reg.example:443/app:v1@{d}"));
        assert_eq!(r.reference, d);
        let r = remote("http://reg.internal:5000/app:v1");
        assert_eq!(r.base, "http://reg.internal:5000");
        match parse("reg.internal/app", true).unwrap() {
            Location::Registry(r) => assert_eq!(r.base, "http://reg.internal"),
            other => panic!("{other:?}"),
        }
        for bad in [
            "127.0.0.1:5000/App:v1",
            "reg.io/app@sha256:zz",
            "reg.io/app:-x",
            "",
        ] {
            assert!(parse(bad, false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pasted_cache_options_name_their_reference() {
        let pasted = parse(
            "type=registry,ref=127.0.0.1:5000/cache/app:main,mode=max",
            false,
        )
        .unwrap();
        assert_eq!(
            pasted,
            parse("127.0.0.1:5000/cache/app:main", false).unwrap()
        );
        assert_eq!(
            parse("type=local,src=/no/such/dir", false).unwrap(),
            parse("oci:/no/such/dir", false).unwrap()
        );
        assert!(parse("type=gha,scope=main", false).is_err());
    }

    #[test]
    fn layouts_take_an_optional_tag() {
        assert_eq!(
            parse("oci:/no/such/dir:v1", false).unwrap(),
            Location::Layout {
                path: "/no/such/dir".into(),
                tag: Some("v1".into())
            }
        );
        let dir = std::env::temp_dir();
        assert_eq!(
            parse(&format!("oci:{}", dir.display()), false).unwrap(),
            Location::Layout {
                path: dir.clone(),
                tag: None
            }
        );
    }
}
