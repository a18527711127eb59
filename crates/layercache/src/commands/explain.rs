//! `layercache explain`: why a build missed the cache.
//!
//! * `explain A B`: two images (or two cache exports) aligned step by step; the first
//!   step that differs and the bytes rebuilt from there on;
//! * `explain --cache REF [--against REF2]`: a BuildKit cache's records and layers in
//!   build order, and which of them an earlier cache already had;
//! * `explain --cache-from IMAGE`: whether BuildKit can import cache from it (exit 1
//!   when it cannot, for a CI gate);
//! * `explain --session S`: every miss of one build session on a layercache server,
//!   with what exists instead.
//!
//! The reasoning lives in `diagnose::explain`; this module fetches (registry or OCI
//! layout) and prints.

mod fetch;
mod layout;
mod reference;
mod registry;
mod session;

use std::io::Write;

use anyhow::{Context, bail};
use bytesize::ByteSize;
use clap::{ArgGroup, Args};
use diagnose::explain::cache::{Cache, compare};
use diagnose::explain::cache_from::{judge_export, judge_image};
use diagnose::explain::diff::diff_images;
use diagnose::explain::document::Platform;
use diagnose::explain::short_digest;
use serde_json::{Value, json};

use self::fetch::{Resolved, resolve};
use self::reference::Location;
use crate::cli::ServerArg;

/// Options of `layercache explain`.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("mode")
        .required(true)
        .args(["images", "cache", "cache_from", "session"])
))]
pub struct ExplainArgs {
    /// Two images to compare, the earlier build (A) first: REGISTRY/REPO:TAG or
    /// REGISTRY/REPO@DIGEST (plain HTTP for 127.0.0.1 and localhost), or an OCI layout:
    /// oci:DIR or oci:DIR:TAG. Every reference may also be pasted as a BuildKit cache
    /// option: type=registry,ref=REGISTRY/REPO:TAG,… or type=local,src=DIR.
    #[arg(value_name = "IMAGE", num_args = 2)]
    pub images: Vec<String>,
    /// List a BuildKit cache in build order: a registry cache export (index or
    /// image-manifest=true), or an image carrying an inline cache.
    #[arg(long, value_name = "CACHE_REF")]
    pub cache: Option<String>,
    /// With --cache: an earlier cache; say which records it already had and the first
    /// new one.
    #[arg(long, value_name = "CACHE_REF", requires = "cache")]
    pub against: Option<String>,
    /// With --cache: an image the same build pushed, whose history names the steps of
    /// a cache export's layers (else one sharing its layers is looked for in the same
    /// registry).
    #[arg(long, value_name = "IMAGE", requires = "cache")]
    pub image: Option<String>,
    /// Check whether BuildKit would reuse this image (or cache export) given to
    /// --cache-from; exits 1 when it would not.
    #[arg(long = "cache-from", value_name = "IMAGE")]
    pub cache_from: Option<String>,
    /// A build session of the server (its name or id): every miss, with the references
    /// that do exist, evictions, and uploads another repository could have saved.
    #[arg(long, value_name = "SESSION")]
    pub session: Option<String>,
    /// The server, for --session.
    #[command(flatten)]
    pub server: ServerArg,
    /// The platform to pick from an image index (OS/ARCH[/VARIANT]).
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// Reach registries other than this machine over plain HTTP.
    #[arg(long)]
    pub insecure: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Run `layercache explain`.
pub async fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let platform: Platform = args.platform.parse()?;
    if let Some(name) = &args.session {
        return explain_session(&args, name).await;
    }
    if let Some(reference) = &args.cache_from {
        return explain_cache_from(&args, reference, &platform).await;
    }
    if let Some(reference) = &args.cache {
        return explain_cache(&args, reference, &platform).await;
    }
    match args.images.as_slice() {
        [a, b] => explain_images(&args, a, b, &platform).await,
        _ => bail!("give two images to compare, --cache, --cache-from or --session"),
    }
}

/// Parse and fetch one reference.
async fn fetch(
    args: &ExplainArgs,
    text: &str,
    platform: &Platform,
) -> anyhow::Result<(Location, Resolved)> {
    let location = reference::parse(text, args.insecure)?;
    let resolved = resolve(&location, platform).await?;
    Ok((location, resolved))
}

fn size(bytes: u64) -> String {
    ByteSize(bytes).display().iec().to_string()
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A JSON object of `value`'s fields with `extra` added.
fn with_fields(value: impl serde::Serialize, extra: Value) -> anyhow::Result<Value> {
    let mut value = serde_json::to_value(value)?;
    if let (Some(object), Value::Object(extra)) = (value.as_object_mut(), extra) {
        object.extend(extra);
    }
    Ok(value)
}

async fn explain_images(
    args: &ExplainArgs,
    a: &str,
    b: &str,
    platform: &Platform,
) -> anyhow::Result<()> {
    // Both at once; A's failure is reported first.
    let (first, second) = tokio::join!(fetch(args, a, platform), fetch(args, b, platform));
    let ((la, ra), (lb, rb)) = (first?, second?);
    match (&ra, &rb) {
        (Resolved::Image { image: ia, .. }, Resolved::Image { image: ib, .. }) => {
            let diff = diff_images(ia, ib);
            let same_manifest = ra.digest() == rb.digest();
            if args.json {
                let side = |l: &Location, r: &Resolved, i: &diagnose::explain::image::Image| {
                    json!({
                        "reference": l.to_string(),
                        "digest": r.digest().to_string(),
                        "layers": i.layers.len(),
                        "bytes": i.layer_bytes(),
                    })
                };
                let extra = json!({
                    "mode": "images",
                    "a": side(&la, &ra, ia),
                    "b": side(&lb, &rb, ib),
                    "same_manifest": same_manifest,
                });
                return print_json(&with_fields(&diff, extra)?);
            }
            for (name, l, r, i) in [("A", &la, &ra, ia), ("B", &lb, &rb, ib)] {
                println!(
                    "{name}  {l}  {}  {} layer(s), {}",
                    short_digest(&r.digest().to_string()),
                    i.layers.len(),
                    size(i.layer_bytes())
                );
            }
            if same_manifest {
                println!("A and B are the same image manifest ({}).", ra.digest());
            }
            println!();
            print!("{}", diff.text());
            Ok(())
        }
        (Resolved::Cache { cache: ca, .. }, Resolved::Cache { cache: cb, .. }) => {
            print_cache_comparison(args, (&lb, &rb, cb), Some((&la, &ra, ca)))
        }
        _ => {
            let kind = |r: &Resolved| match r {
                Resolved::Image { .. } => "an image",
                Resolved::Cache { .. } => "a BuildKit cache export",
            };
            bail!(
                "{la} is {} and {lb} is {}: compare two images, or two caches with \
                 `--cache {lb} --against {la}`",
                kind(&ra),
                kind(&rb)
            )
        }
    }
}

/// The cache a reference holds: an export, or the inline cache of an image.
fn cache_of(location: &Location, resolved: &Resolved) -> anyhow::Result<Cache> {
    match resolved {
        Resolved::Cache { cache, .. } => Ok(cache.clone()),
        Resolved::Image { image, .. } => Cache::from_inline(image)
            .with_context(|| format!("reading {location}"))?
            .with_context(|| {
                format!(
                    "{location} is an image without cache metadata: its config has no \
                     moby.buildkit.cache.v0 (inline cache) and it is not a cache export; \
                     `layercache explain --cache-from {location}` says how to fix that"
                )
            }),
    }
}

async fn explain_cache(
    args: &ExplainArgs,
    reference: &str,
    platform: &Platform,
) -> anyhow::Result<()> {
    let (location, resolved) = fetch(args, reference, platform).await?;
    let mut cache = cache_of(&location, &resolved)?;
    if cache.has_undescribed() {
        name_steps(args, &location, &mut cache, platform).await?;
    }
    let earlier = match &args.against {
        Some(other) => {
            let (l, r) = fetch(args, other, platform).await?;
            let c = cache_of(&l, &r)?;
            Some((l, r, c))
        }
        None => None,
    };
    print_cache_comparison(
        args,
        (&location, &resolved, &cache),
        earlier.as_ref().map(|(l, r, c)| (l, r, c)),
    )
}

/// Most images read while looking for one that shares a cache export's layers.
const MAX_HISTORY_CANDIDATES: usize = 30;

/// Name the undescribed steps of `cache` (at `location`) from the history of the image
/// given with `--image`, or of one found in the same registry that shares its layers:
/// another tag of its repository, or a tag of a repository of the same last name.
async fn name_steps(
    args: &ExplainArgs,
    location: &Location,
    cache: &mut diagnose::explain::cache::Cache,
    platform: &Platform,
) -> anyhow::Result<()> {
    if let Some(image) = &args.image {
        let (l, r) = fetch(args, image, platform).await?;
        let Resolved::Image { image, .. } = &r else {
            bail!("--image {l} is not an image");
        };
        cache.name_from_history(image, &l.to_string());
        return Ok(());
    }
    let Location::Registry(remote) = location else {
        return Ok(());
    };
    let registry = registry::Registry::new(&remote.base)?;
    let last = |repo: &str| repo.rsplit('/').next().unwrap_or(repo).to_owned();
    let mut repos = vec![remote.repo.clone()];
    if let Ok(catalog) = registry.catalog(10_000).await {
        repos.extend(
            catalog
                .into_iter()
                .filter(|r| *r != remote.repo && last(r) == last(&remote.repo)),
        );
    }
    let mut candidates = Vec::new();
    for repo in repos {
        for tag in registry
            .tags(&repo, 1000)
            .await
            .ok()
            .flatten()
            .unwrap_or_default()
        {
            if repo != remote.repo || tag != remote.reference {
                candidates.push(format!("{}/{repo}:{tag}", registry.host()));
            }
        }
    }
    for candidate in candidates.iter().take(MAX_HISTORY_CANDIDATES) {
        let Ok((l, Resolved::Image { image, .. })) = fetch(args, candidate, platform).await else {
            continue;
        };
        cache.name_from_history(&image, &l.to_string());
        if !cache.has_undescribed() {
            break;
        }
    }
    Ok(())
}

fn print_cache_comparison(
    args: &ExplainArgs,
    (location, resolved, cache): (&Location, &Resolved, &Cache),
    earlier: Option<(&Location, &Resolved, &Cache)>,
) -> anyhow::Result<()> {
    let comparison = earlier.map(|(_, _, e)| compare(cache, e));
    if args.json {
        let mut out = json!({
            "mode": "cache",
            "reference": location.to_string(),
            "digest": resolved.digest().to_string(),
            "cache": cache,
        });
        if let (Some((l, r, _)), Some(c), Some(object)) =
            (earlier, &comparison, out.as_object_mut())
        {
            object.insert(
                "against".into(),
                json!({ "reference": l.to_string(), "digest": r.digest().to_string() }),
            );
            object.insert("comparison".into(), serde_json::to_value(c)?);
        }
        return print_json(&out);
    }
    println!(
        "CACHE    {location}  {}",
        short_digest(&resolved.digest().to_string())
    );
    if let Some((l, r, _)) = earlier {
        println!("AGAINST  {l}  {}", short_digest(&r.digest().to_string()));
    }
    print!("{}", cache.text(comparison.as_ref()));
    Ok(())
}

async fn explain_cache_from(
    args: &ExplainArgs,
    reference: &str,
    platform: &Platform,
) -> anyhow::Result<()> {
    let (location, resolved) = fetch(args, reference, platform).await?;
    let name = location.to_string();
    let verdict = match &resolved {
        Resolved::Image { image, .. } => judge_image(&name, image),
        Resolved::Cache { cache, .. } => judge_export(&name, cache),
    };
    if args.json {
        print_json(&with_fields(
            &verdict,
            json!({ "mode": "cache_from", "digest": resolved.digest().to_string() }),
        )?)?;
    } else {
        print!("{}", verdict.text());
    }
    if !verdict.usable {
        std::io::stdout().flush()?;
        std::process::exit(1);
    }
    Ok(())
}

async fn explain_session(args: &ExplainArgs, name: &str) -> anyhow::Result<()> {
    let facts = session::gather(&args.server.url, name).await?;
    let explanation = diagnose::explain::session::explain(&facts);
    if args.json {
        return print_json(&with_fields(&explanation, json!({ "mode": "session" }))?);
    }
    print!("{}", explanation.text());
    Ok(())
}
