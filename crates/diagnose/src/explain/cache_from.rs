//! Whether BuildKit can use an image (or a cache export) given to `--cache-from`.
//!
//! BuildKit imports from an image only what its config's inline cache
//! (`moby.buildkit.cache.v0`) describes; an image pushed without it is pulled and
//! ignored, and every step runs again. It also ignores an inline cache whose config and
//! manifest disagree on the layers. A registry cache export is usable as it is.

use oci::manifest::INLINE_CACHE_FIELD;
use serde::Serialize;

use super::cache::{Cache, CacheForm};
use super::image::Image;
use super::text;

/// The verdict on one `--cache-from` source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheFromVerdict {
    /// What was checked.
    pub reference: String,
    /// BuildKit would import cache from it.
    pub usable: bool,
    /// What it holds: `inline`, `registry_export`, or `none`.
    pub kind: String,
    /// Why, in a sentence.
    pub reason: String,
    /// How to make it usable (or what to keep in mind when it is).
    pub fix: Option<String>,
    /// Cache records it carries.
    pub records: usize,
    /// Image layers (or cache layers) those records can restore.
    pub layers: usize,
    /// The steps it can restore, in build order.
    pub steps: Vec<String>,
}

/// The advice for an image that carries no cache.
fn fix_for(reference: &str) -> String {
    let repo = reference
        .rsplit_once('@')
        .map(|(r, _)| r)
        .unwrap_or(reference);
    let repo = match repo.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => repo,
    };
    format!(
        "build it with the inline cache before pushing it: `docker build --build-arg \
         BUILDKIT_INLINE_CACHE=1 ...` (or `--cache-to type=inline`); or export the cache \
         separately with `--cache-to type=registry,ref={repo}:buildcache,mode=max` and \
         import that with `--cache-from type=registry,ref={repo}:buildcache`"
    )
}

/// Judge an image by its inline cache.
pub fn judge_image(reference: &str, image: &Image) -> CacheFromVerdict {
    let not_usable = |reason: String| CacheFromVerdict {
        reference: reference.to_owned(),
        usable: false,
        kind: "none".into(),
        reason,
        fix: Some(fix_for(reference)),
        records: 0,
        layers: 0,
        steps: Vec::new(),
    };
    if image.inline_cache.is_none() {
        return not_usable(format!(
            "{reference} is an image without cache metadata: its config has no \
             {INLINE_CACHE_FIELD} field, so BuildKit pulls its manifest and config, finds \
             nothing to import, and runs every step again"
        ));
    }
    let cache = match Cache::from_inline(image) {
        Ok(Some(cache)) => cache,
        Ok(None) => return not_usable(format!("{reference} has no inline cache")),
        Err(e) => {
            return not_usable(format!(
                "{reference} has inline cache metadata BuildKit cannot read: {e}"
            ));
        }
    };
    if image.layers.is_empty() {
        return not_usable(format!(
            "{reference} has no layers, so its inline cache restores nothing"
        ));
    }
    if image.diff_ids != image.layers.len() {
        return not_usable(format!(
            "{reference}'s config lists {} diff_ids for {} layers: BuildKit ignores the \
             inline cache of an image whose config and manifest disagree",
            image.diff_ids,
            image.layers.len()
        ));
    }
    let with_layers: Vec<_> = cache
        .records
        .iter()
        .filter(|r| !r.layers.is_empty())
        .collect();
    if with_layers.is_empty() {
        return not_usable(format!(
            "{reference}'s inline cache has {} record(s) but none restores a layer",
            cache.records.len()
        ));
    }
    let restorable: std::collections::HashSet<&str> = with_layers
        .iter()
        .flat_map(|r| r.layers.iter().map(String::as_str))
        .collect();
    CacheFromVerdict {
        reference: reference.to_owned(),
        usable: true,
        kind: "inline".into(),
        reason: format!(
            "{reference} carries an inline cache: {} record(s) restoring {} of its {} \
             layer(s), {}",
            cache.records.len(),
            restorable.len(),
            image.layers.len(),
            text::bytes(image.layer_bytes())
        ),
        fix: Some(
            "an inline cache holds the final stage only (mode=min): steps of other stages \
             of a multi-stage build run again; export them with `--cache-to \
             type=registry,ref=...,mode=max`"
                .into(),
        ),
        records: cache.records.len(),
        layers: restorable.len(),
        steps: with_layers.iter().map(|r| r.description.clone()).collect(),
    }
}

/// Judge a registry cache export.
pub fn judge_export(reference: &str, cache: &Cache) -> CacheFromVerdict {
    let with_layers: Vec<_> = cache
        .records
        .iter()
        .filter(|r| !r.layers.is_empty())
        .collect();
    let usable = !with_layers.is_empty();
    let reason = if usable {
        format!(
            "{reference} is a {}: {} record(s), {} layer(s), {}",
            cache.form.label(),
            cache.records.len(),
            cache.layers.len(),
            text::bytes(cache.layer_bytes())
        )
    } else {
        format!(
            "{reference} is a {} without any record that restores a layer",
            cache.form.label()
        )
    };
    let fix = match (usable, cache.form) {
        (false, _) => Some(
            "export it again from a build that ran the steps: `--cache-to \
             type=registry,ref=...,mode=max`"
                .to_owned(),
        ),
        (true, CacheForm::ImageManifest) => Some(
            "import it with `--cache-from type=registry,ref=...` on BuildKit 0.12 or newer: \
             older builders (such as docker 20.10's) ignore this form without a word"
                .to_owned(),
        ),
        (true, _) => Some(format!(
            "import it with `--cache-from type=registry,ref={reference}`"
        )),
    };
    CacheFromVerdict {
        reference: reference.to_owned(),
        usable,
        kind: "registry_export".into(),
        reason,
        fix,
        records: cache.records.len(),
        layers: cache.layers.len(),
        steps: with_layers.iter().map(|r| r.description.clone()).collect(),
    }
}

impl CacheFromVerdict {
    /// The verdict for people.
    pub fn text(&self) -> String {
        let mut out = if self.usable {
            format!("usable as a cache: {}.\n", self.reason)
        } else {
            format!("NOT usable as a cache: {}.\n", self.reason)
        };
        if !self.steps.is_empty() {
            out += "Steps it can restore:\n";
            for step in &self.steps {
                out += &format!("  {}\n", text::cut(step, 100));
            }
        }
        if let Some(fix) = &self.fix {
            if self.usable {
                out += &format!("Keep in mind: {fix}.\n");
            } else {
                out += &format!("To fix: {fix}.\n");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::image::{Layer, Step};
    use base64::Engine;

    fn image(cache: Option<&str>, diff_ids: usize) -> Image {
        Image {
            layers: vec![Layer {
                digest: format!("sha256:{}", "a".repeat(64)),
                size: 2048,
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                diff_id: Some("sha256:1".into()),
            }],
            steps: vec![Step {
                instruction: "COPY app /app".into(),
                created_by: "COPY app /app # buildkit".into(),
                empty_layer: false,
                layer: Some(0),
            }],
            inline_cache: cache.map(|c| base64::engine::general_purpose::STANDARD.encode(c)),
            diff_ids,
            notes: Vec::new(),
        }
    }

    const RECORDS: &str = r#"[{"digest":"sha256:src"},{"digest":"sha256:copy","inputs":[[{"link":0}]],"layers":[{"layer":0}]}]"#;

    #[test]
    fn an_image_without_inline_cache_is_not_usable_and_says_how_to_fix_it() {
        let v = judge_image("reg/app:v1", &image(None, 1));
        assert!(!v.usable);
        assert!(v.reason.contains("moby.buildkit.cache.v0"), "{}", v.reason);
        let fix = v.fix.unwrap();
        assert!(fix.contains("BUILDKIT_INLINE_CACHE=1"), "{fix}");
        assert!(fix.contains("ref=reg/app:buildcache"), "{fix}");
    }

    #[test]
    fn an_image_with_inline_cache_is_usable() {
        let v = judge_image("reg/app:v1", &image(Some(RECORDS), 1));
        assert!(v.usable, "{}", v.reason);
        assert_eq!((v.records, v.layers), (2, 1));
        assert_eq!(v.steps, ["COPY app /app"]);
        assert!(v.text().starts_with("usable as a cache"), "{}", v.text());
    }

    #[test]
    fn broken_inline_caches_are_not_usable() {
        assert!(!judge_image("r", &image(Some(RECORDS), 2)).usable);
        assert!(!judge_image("r", &image(Some("[]"), 1)).usable);
        assert!(!judge_image("r", &image(Some("{{"), 1)).usable);
        let mut bad = image(Some(RECORDS), 1);
        bad.inline_cache = Some("not base64!".into());
        let v = judge_image("r", &bad);
        assert!(!v.usable);
        assert!(v.text().starts_with("NOT usable"), "{}", v.text());
    }
}
