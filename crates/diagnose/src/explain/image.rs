//! An image as the steps that built it: each `history` entry of its config, with the
//! layer it produced (manifest descriptor and `rootfs.diff_ids` entry) unless it is an
//! `empty_layer` step such as `ENV` or `CMD`.

use oci_spec::image::{ImageConfiguration, ImageManifest};
use serde::Serialize;

use super::{Error, Result};

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layer {
    /// Digest of the (usually compressed) blob, from the manifest.
    pub digest: String,
    /// Size of the blob, from the manifest.
    pub size: u64,
    /// Media type of the blob.
    pub media_type: String,
    /// Digest of the uncompressed tar, from the config's `rootfs.diff_ids`.
    pub diff_id: Option<String>,
}

/// One build step: a `history` entry of the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// The instruction, without the builders' decorations (`COPY . /app`).
    pub instruction: String,
    /// `created_by` exactly as recorded.
    pub created_by: String,
    /// The step changed no files (`ENV`, `CMD`, ...).
    pub empty_layer: bool,
    /// Index into [`Image::layers`] of the layer it produced.
    pub layer: Option<usize>,
}

/// An image: its layers and the steps that made them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Image {
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    /// Steps, first first; layers without a history entry get a step of their own.
    pub steps: Vec<Step>,
    /// The config's `moby.buildkit.cache.v0` value, when it has one.
    pub inline_cache: Option<String>,
    /// How many `rootfs.diff_ids` the config lists (BuildKit requires one per layer).
    pub diff_ids: usize,
    /// Inconsistencies found while pairing history and layers.
    pub notes: Vec<String>,
}

impl Image {
    /// Pair `manifest`'s layers with the steps of its config, `config` (the blob's bytes).
    pub fn from_parts(manifest: &ImageManifest, config: &[u8]) -> Result<Image> {
        let parsed: ImageConfiguration =
            serde_json::from_slice(config).map_err(|e| Error::malformed("the image config", e))?;
        #[derive(serde::Deserialize)]
        struct Probe {
            #[serde(rename = "moby.buildkit.cache.v0")]
            cache: Option<serde_json::Value>,
        }
        let probe: Probe =
            serde_json::from_slice(config).map_err(|e| Error::malformed("the image config", e))?;
        let inline_cache = probe.cache.and_then(|v| match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s),
            other => Some(other.to_string()),
        });
        let diff_ids = parsed.rootfs().diff_ids();
        let layers: Vec<Layer> = manifest
            .layers()
            .iter()
            .enumerate()
            .map(|(i, d)| Layer {
                digest: d.digest().to_string(),
                size: d.size(),
                media_type: d.media_type().to_string(),
                diff_id: diff_ids.get(i).cloned(),
            })
            .collect();
        let mut notes = Vec::new();
        if diff_ids.len() != layers.len() {
            notes.push(format!(
                "the config lists {} diff_ids for the manifest's {} layers",
                diff_ids.len(),
                layers.len()
            ));
        }
        let history = parsed.history().as_deref().unwrap_or_default();
        let mut steps = Vec::with_capacity(history.len());
        let mut next_layer = 0;
        for entry in history {
            let created_by = entry.created_by().clone().unwrap_or_default();
            let empty_layer = entry.empty_layer().unwrap_or(false);
            let layer = if empty_layer {
                None
            } else if next_layer < layers.len() {
                next_layer += 1;
                Some(next_layer - 1)
            } else {
                None
            };
            steps.push(Step {
                instruction: clean_instruction(&created_by),
                created_by,
                empty_layer,
                layer,
            });
        }
        let with_layer = history
            .iter()
            .filter(|h| !h.empty_layer().unwrap_or(false))
            .count();
        if !history.is_empty() && with_layer != layers.len() {
            notes.push(format!(
                "the history names {with_layer} layer-producing steps for {} layers",
                layers.len()
            ));
        }
        for i in next_layer..layers.len() {
            steps.push(Step {
                instruction: "(layer without history)".to_owned(),
                created_by: String::new(),
                empty_layer: false,
                layer: Some(i),
            });
        }
        Ok(Image {
            layers,
            steps,
            inline_cache,
            diff_ids: diff_ids.len(),
            notes,
        })
    }

    /// Total size of the layer blobs.
    pub fn layer_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    /// The instruction that produced layer `index`.
    pub fn instruction_of_layer(&self, index: usize) -> Option<&str> {
        self.steps
            .iter()
            .find(|s| s.layer == Some(index))
            .map(|s| s.instruction.as_str())
    }
}

/// `created_by` without the builders' decorations: the classic builder's
/// `/bin/sh -c #(nop) ` before non-`RUN` instructions and `/bin/sh -c ` for `RUN`,
/// BuildKit's trailing ` # buildkit` and the default shell after its `RUN`.
pub fn clean_instruction(created_by: &str) -> String {
    let mut text = created_by.trim();
    if let Some(rest) = text.strip_suffix("# buildkit") {
        text = rest.trim_end();
    }
    if text.is_empty() {
        return "(no instruction recorded)".to_owned();
    }
    if let Some(rest) = text.strip_prefix("/bin/sh -c #(nop)") {
        return rest.trim().to_owned();
    }
    if let Some(rest) = text.strip_prefix("/bin/sh -c ") {
        return format!("RUN {}", rest.trim_start());
    }
    if let Some(rest) = text.strip_prefix("RUN /bin/sh -c ") {
        return format!("RUN {}", rest.trim_start());
    }
    // `|2 A=1 B=2 /bin/sh -c cmd`: a RUN with build arguments (classic builder, or
    // BuildKit after `RUN `). The arguments stay: a changed one is a reason to rebuild.
    let (prefix, body) = match text.strip_prefix("RUN ") {
        Some(rest) => ("RUN ", rest),
        None => ("", text),
    };
    if body.starts_with('|')
        && let Some((args, command)) = body.split_once(" /bin/sh -c ")
    {
        return format!("RUN {args} {}", command.trim_start());
    }
    format!("{prefix}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_decorations_are_stripped() {
        let cases = [
            ("COPY . /app # buildkit", "COPY . /app"),
            ("/bin/sh -c #(nop)  CMD [\"sh\"]", "CMD [\"sh\"]"),
            (
                "/bin/sh -c #(nop) COPY file:abc in /app ",
                "COPY file:abc in /app",
            ),
            ("/bin/sh -c apt-get update", "RUN apt-get update"),
            ("RUN /bin/sh -c make # buildkit", "RUN make"),
            ("RUN |1 V=2 /bin/sh -c make # buildkit", "RUN |1 V=2 make"),
            ("|1 V=2 /bin/sh -c make", "RUN |1 V=2 make"),
            (
                "RUN /bin/busybox sh -c echo hi # buildkit",
                "RUN /bin/busybox sh -c echo hi",
            ),
            ("ENV A=b", "ENV A=b"),
            ("", "(no instruction recorded)"),
        ];
        for (raw, clean) in cases {
            assert_eq!(clean_instruction(raw), clean, "{raw:?}");
        }
    }

    fn manifest(layers: &[(&str, u64)]) -> ImageManifest {
        let layers: Vec<String> = layers
            .iter()
            .map(|(d, s)| {
                format!(
                    r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{}","size":{s}}}"#,
                    d.repeat(64)
                )
            })
            .collect();
        serde_json::from_str(&format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":2}},
            "layers":[{}]}}"#,
            "c".repeat(64),
            layers.join(",")
        ))
        .unwrap()
    }

    #[test]
    fn steps_are_paired_with_layers_skipping_empty_ones() {
        let m = manifest(&[("a", 10), ("b", 20)]);
        let config = br#"{"architecture":"amd64","os":"linux",
            "rootfs":{"type":"layers","diff_ids":["sha256:1","sha256:2"]},
            "history":[{"created_by":"COPY a / # buildkit"},
                       {"created_by":"ENV X=1","empty_layer":true},
                       {"created_by":"RUN /bin/sh -c make # buildkit"}],
            "moby.buildkit.cache.v0":"W10="}"#;
        let image = Image::from_parts(&m, config).unwrap();
        let got: Vec<(&str, Option<usize>)> = image
            .steps
            .iter()
            .map(|s| (s.instruction.as_str(), s.layer))
            .collect();
        assert_eq!(
            got,
            [
                ("COPY a /", Some(0)),
                ("ENV X=1", None),
                ("RUN make", Some(1))
            ]
        );
        assert_eq!(image.inline_cache.as_deref(), Some("W10="));
        assert_eq!(image.layer_bytes(), 30);
        assert_eq!(image.layers[1].diff_id.as_deref(), Some("sha256:2"));
        assert!(image.notes.is_empty(), "{:?}", image.notes);
        assert_eq!(image.instruction_of_layer(1), Some("RUN make"));
    }

    #[test]
    fn layers_without_history_still_get_steps_and_a_note() {
        let m = manifest(&[("a", 10), ("b", 20)]);
        let config = br#"{"architecture":"amd64","os":"linux",
            "rootfs":{"type":"layers","diff_ids":["sha256:1"]}}"#;
        let image = Image::from_parts(&m, config).unwrap();
        assert_eq!(image.steps.len(), 2);
        assert_eq!(image.steps[1].instruction, "(layer without history)");
        assert_eq!(image.notes.len(), 1, "{:?}", image.notes);
        assert!(image.inline_cache.is_none());
    }

    #[test]
    fn malformed_configs_are_errors() {
        let m = manifest(&[("a", 10)]);
        for bad in [
            &b"not json"[..],
            br#"{"architecture":5}"#,
            br#"[]"#,
            br#"{"os":"linux"}"#,
        ] {
            let err = Image::from_parts(&m, bad).unwrap_err();
            assert!(matches!(err, Error::Malformed { .. }), "{err}");
        }
    }
}
