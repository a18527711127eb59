//! A BuildKit cache: its cache config (`application/vnd.buildkit.cacheconfig.v0`) read
//! as records and layers in build order, and compared with another.
//!
//! A *record* is one cache key: an operation's digest plus the records its inputs link
//! to (`inputs[i]` lists the alternatives for input `i`), and the layer chain it
//! produced, if any. Records without inputs are sources (the build context, a base
//! image) or the checksum of the files a step reads. Two records are the same cache
//! entry when they have the same digest *and* the same inputs, recursively: that is
//! what BuildKit matches on import, so a `COPY` whose files changed keeps its digest but
//! links to a new checksum record, and is new.
//!
//! Three containers carry it: a registry cache export as an index (`manifests[]` = layer
//! descriptors + the config descriptor), as an image manifest (`image-manifest=true`), or
//! inline in an image config (`moby.buildkit.cache.v0`: base64 of the records only, whose
//! layer indexes are the image's layers).

use std::collections::{BTreeMap, HashMap, HashSet};

use base64::Engine;
use oci_spec::image::Descriptor;
use serde::{Deserialize, Serialize};

use super::image::Image;
use super::{Error, Result, short_digest, text};

/// The description of a record whose layer nothing describes.
const UNDESCRIBED: &str = "(layer, no description)";

/// The cache config, as BuildKit writes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct CacheConfig {
    /// Layer blobs, each with the index of its parent layer.
    #[serde(default)]
    pub layers: Vec<CacheLayer>,
    /// Cache records.
    #[serde(default)]
    pub records: Vec<CacheRecord>,
}

/// One layer of the cache config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct CacheLayer {
    /// The layer blob's digest.
    #[serde(default)]
    pub blob: String,
    /// Index of the parent layer, -1 for none. BuildKit omits 0 (Go's `omitempty`), so
    /// an absent parent is layer 0.
    #[serde(default)]
    pub parent: i64,
    /// What BuildKit noted about the blob.
    #[serde(default)]
    pub annotations: Option<LayerAnnotations>,
}

/// `annotations` of a cache layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerAnnotations {
    /// The blob's media type.
    #[serde(default)]
    pub media_type: Option<String>,
    /// Digest of the uncompressed layer.
    #[serde(default, rename = "diffID")]
    pub diff_id: Option<String>,
    /// The blob's size.
    #[serde(default)]
    pub size: Option<i64>,
    /// When it was created.
    #[serde(default)]
    pub created_at: Option<String>,
    /// Anything else.
    #[serde(default)]
    pub additional: Option<BTreeMap<String, String>>,
}

/// One cache record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct CacheRecord {
    /// The operation's cache key digest.
    #[serde(default)]
    pub digest: String,
    /// For each input of the operation, the records it may link to.
    #[serde(default)]
    pub inputs: Vec<Vec<CacheInput>>,
    /// The results: indexes into the config's layers.
    #[serde(default, rename = "layers")]
    pub results: Vec<CacheResult>,
    /// Results made of several layer chains (merge operations).
    #[serde(default)]
    pub chains: Vec<ChainedResult>,
}

/// A link from a record's input to another record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct CacheInput {
    /// Which part of the linked record's output the input uses, if not all of it.
    #[serde(default)]
    pub selector: String,
    /// Index of the linked record.
    pub link: i64,
}

/// A record's result: a layer chain ending at `layer`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheResult {
    /// Index of the top layer.
    pub layer: i64,
    /// When it was made.
    #[serde(default)]
    pub created_at: Option<String>,
}

/// A result made of several layer chains.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainedResult {
    /// Indexes of the chains' top layers.
    #[serde(default)]
    pub layers: Vec<i64>,
    /// When it was made.
    #[serde(default)]
    pub created_at: Option<String>,
}

impl CacheConfig {
    /// Parse a cache config blob.
    pub fn parse(bytes: &[u8]) -> Result<CacheConfig> {
        serde_json::from_slice(bytes).map_err(|e| Error::malformed("the BuildKit cache config", e))
    }
}

/// Which container the cache came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheForm {
    /// A registry export as an index (`--cache-to type=registry`).
    Index,
    /// A registry export as an image manifest (`image-manifest=true`).
    ImageManifest,
    /// Inline in an image config (`BUILDKIT_INLINE_CACHE=1`, `--cache-to type=inline`).
    Inline,
}

impl CacheForm {
    /// For people.
    pub fn label(self) -> &'static str {
        match self {
            CacheForm::Index => "registry cache export (index)",
            CacheForm::ImageManifest => "registry cache export (image-manifest=true)",
            CacheForm::Inline => "inline cache in an image config",
        }
    }
}

/// A layer of the cache, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerInfo {
    /// The blob.
    pub blob: String,
    /// Its size, when a descriptor or the config says.
    pub size: Option<u64>,
    /// Its media type, when known.
    pub media_type: Option<String>,
    /// What made it (`buildkit/description`, or the image history for inline caches).
    pub description: Option<String>,
    /// The layer below it.
    pub parent: Option<String>,
    /// Layers below it.
    pub depth: usize,
}

/// One input link of a listed record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Link {
    /// Position (from 1, in build order) of the linked record.
    pub record: usize,
    /// Selector, if any.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub selector: String,
}

/// A record, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// Position in build order, from 1.
    pub position: usize,
    /// The operation's cache key digest.
    pub digest: String,
    /// Its identity with its inputs, recursively (what import matches on).
    pub key: String,
    /// For each input, the records it links to.
    pub inputs: Vec<Vec<Link>>,
    /// The top layer of each result.
    pub layers: Vec<String>,
    /// What it is, for people.
    pub description: String,
}

/// A cache, read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cache {
    /// Which container it came in.
    pub form: CacheForm,
    /// Records in build order (inputs before the records that use them).
    pub records: Vec<Record>,
    /// Layers in build order (parents first).
    pub layers: Vec<LayerInfo>,
    /// Inconsistencies found.
    pub notes: Vec<String>,
}

/// What a layer descriptor says about a blob.
#[derive(Debug, Clone, Default)]
struct Described {
    size: Option<u64>,
    media_type: Option<String>,
    description: Option<String>,
}

impl Cache {
    /// A registry export: its config and the layer descriptors its index or manifest
    /// lists (the config descriptor among them is ignored).
    pub fn from_export(
        form: CacheForm,
        config: &CacheConfig,
        descriptors: &[Descriptor],
    ) -> Result<Cache> {
        let described: HashMap<String, Described> = descriptors
            .iter()
            .filter(|d| d.media_type().as_ref() != oci::media_type::BUILDKIT_CACHE_CONFIG)
            .map(|d| {
                let annotations = d.annotations().as_ref();
                let description = annotations
                    .and_then(|a| a.get("buildkit/description"))
                    .cloned();
                (
                    d.digest().to_string(),
                    Described {
                        size: Some(d.size()),
                        media_type: Some(d.media_type().to_string()),
                        description,
                    },
                )
            })
            .collect();
        let mut notes = Vec::new();
        let missing = config
            .layers
            .iter()
            .filter(|l| !described.contains_key(&l.blob))
            .count();
        if missing > 0 {
            notes.push(format!(
                "{missing} layer(s) of the cache config have no descriptor in the export"
            ));
        }
        read(form, config, &described, notes)
    }

    /// The inline cache of `image` (its config's `moby.buildkit.cache.v0`), or `None`
    /// when it has none.
    pub fn from_inline(image: &Image) -> Result<Option<Cache>> {
        let Some(encoded) = &image.inline_cache else {
            return Ok(None);
        };
        let what = "the inline cache (moby.buildkit.cache.v0)";
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|e| Error::malformed(what, format!("not base64: {e}")))?;
        let value: serde_json::Value =
            serde_json::from_slice(&decoded).map_err(|e| Error::malformed(what, e))?;
        // BuildKit writes the records alone, their layer indexes being the image's
        // layers; accept a whole cache config too.
        let config = if value.is_array() {
            let records: Vec<CacheRecord> =
                serde_json::from_value(value).map_err(|e| Error::malformed(what, e))?;
            let layers = image
                .layers
                .iter()
                .enumerate()
                .map(|(i, l)| CacheLayer {
                    blob: l.digest.clone(),
                    parent: i as i64 - 1,
                    annotations: None,
                })
                .collect();
            CacheConfig { layers, records }
        } else {
            serde_json::from_value(value).map_err(|e| Error::malformed(what, e))?
        };
        let described = image
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                (
                    l.digest.clone(),
                    Described {
                        size: Some(l.size),
                        media_type: Some(l.media_type.clone()),
                        description: image.instruction_of_layer(i).map(str::to_owned),
                    },
                )
            })
            .collect();
        read(CacheForm::Inline, &config, &described, Vec::new()).map(Some)
    }

    /// Whether a record's layer has no description (recent BuildKit registry exports
    /// carry none).
    pub fn has_undescribed(&self) -> bool {
        self.records.iter().any(|r| r.description == UNDESCRIBED)
    }

    /// Name each record whose layer nothing describes after the step of `image` that
    /// produced the same layer (an image pushed by the same build shares its layers);
    /// `reference` names the image. Returns how many records were named.
    pub fn name_from_history(&mut self, image: &Image, reference: &str) -> usize {
        let step_of: HashMap<&str, &str> = (image.layers.iter().enumerate())
            .filter_map(|(i, layer)| Some((layer.digest.as_str(), image.instruction_of_layer(i)?)))
            .collect();
        let mut named = 0;
        for record in &mut self.records {
            if record.description != UNDESCRIBED {
                continue;
            }
            let step = record.layers.first().and_then(|l| step_of.get(l.as_str()));
            if let Some(step) = step {
                record.description = format!("{step}  (history of {reference})");
                named += 1;
            }
        }
        named
    }

    /// Total size of the layers whose size is known.
    pub fn layer_bytes(&self) -> u64 {
        self.layers.iter().filter_map(|l| l.size).sum()
    }
}

/// Check `config`'s indexes, order it, and describe it.
fn read(
    form: CacheForm,
    config: &CacheConfig,
    described: &HashMap<String, Described>,
    notes: Vec<String>,
) -> Result<Cache> {
    let what = "the BuildKit cache config";
    let n_layers = config.layers.len();
    let n_records = config.records.len();
    let layer_index = |i: i64, context: &str| -> Result<usize> {
        usize::try_from(i)
            .ok()
            .filter(|&i| i < n_layers)
            .ok_or_else(|| {
                Error::malformed(what, format!("{context} names layer {i} of {n_layers}"))
            })
    };
    // Parents, checked, and each layer's depth (a loop counts as the bottom).
    let mut parents = Vec::with_capacity(n_layers);
    for (i, layer) in config.layers.iter().enumerate() {
        layer.blob.parse::<oci::Digest>().map_err(|e| {
            Error::malformed(what, format!("layer {i}: blob {:?}: {e}", layer.blob))
        })?;
        parents.push(if layer.parent < 0 {
            None
        } else {
            Some(layer_index(layer.parent, &format!("layer {i}'s parent"))?)
        });
    }
    let depth_of = |mut i: usize| {
        let mut depth = 0;
        while let Some(Some(p)) = parents.get(i) {
            depth += 1;
            i = *p;
            if depth > n_layers {
                break;
            }
        }
        depth
    };
    // Records' links and results, checked.
    let mut links: Vec<Vec<Vec<(usize, String)>>> = Vec::with_capacity(n_records);
    let mut tops: Vec<Vec<usize>> = Vec::with_capacity(n_records);
    for (r, record) in config.records.iter().enumerate() {
        let mut inputs = Vec::with_capacity(record.inputs.len());
        for alternatives in &record.inputs {
            let mut slot = Vec::with_capacity(alternatives.len());
            for input in alternatives {
                let link = usize::try_from(input.link)
                    .ok()
                    .filter(|&l| l < n_records)
                    .ok_or_else(|| {
                        Error::malformed(
                            what,
                            format!("record {r} links to record {} of {n_records}", input.link),
                        )
                    })?;
                slot.push((link, input.selector.clone()));
            }
            inputs.push(slot);
        }
        links.push(inputs);
        let mut layers = Vec::new();
        for result in &record.results {
            layers.push(layer_index(result.layer, &format!("record {r}"))?);
        }
        for chain in &record.chains {
            for &l in &chain.layers {
                layers.push(layer_index(l, &format!("record {r}"))?);
            }
        }
        tops.push(layers);
    }
    let order = build_order(&links);
    let keys = chain_keys(config, &links, &order);
    let position: HashMap<usize, usize> =
        order.iter().enumerate().map(|(p, &r)| (r, p + 1)).collect();
    let layer_description = |i: usize| -> Option<String> {
        let layer = config.layers.get(i)?;
        described
            .get(&layer.blob)
            .and_then(|d| d.description.clone())
            .or_else(|| {
                layer
                    .annotations
                    .as_ref()
                    .and_then(|a| a.additional.as_ref())
                    .and_then(|a| a.get("buildkit/description"))
                    .cloned()
            })
    };
    let records = order
        .iter()
        .filter_map(|&r| {
            let record = config.records.get(r)?;
            let inputs: Vec<Vec<Link>> = links
                .get(r)?
                .iter()
                .map(|slot| {
                    slot.iter()
                        .map(|(l, selector)| Link {
                            record: position.get(l).copied().unwrap_or(0),
                            selector: selector.clone(),
                        })
                        .collect()
                })
                .collect();
            let top = tops.get(r)?;
            let layers: Vec<String> = top
                .iter()
                .filter_map(|&l| config.layers.get(l).map(|x| x.blob.clone()))
                .collect();
            let description = match top.first() {
                Some(&l) => layer_description(l).unwrap_or_else(|| UNDESCRIBED.into()),
                None if inputs.is_empty() => "source or file checksum (no layer)".to_owned(),
                None => "(no layer)".to_owned(),
            };
            Some(Record {
                position: position.get(&r).copied().unwrap_or(0),
                digest: record.digest.clone(),
                key: keys.get(r).cloned().unwrap_or_default(),
                inputs,
                layers,
                description,
            })
        })
        .collect();
    let mut layer_order: Vec<usize> = (0..n_layers).collect();
    layer_order.sort_by_key(|&i| (depth_of(i), config.layers.get(i).map(|l| l.blob.clone())));
    let layers = layer_order
        .into_iter()
        .filter_map(|i| {
            let layer = config.layers.get(i)?;
            let d = described.get(&layer.blob).cloned().unwrap_or_default();
            let annotations = layer.annotations.as_ref();
            Some(LayerInfo {
                blob: layer.blob.clone(),
                size: d.size.or_else(|| {
                    annotations
                        .and_then(|a| a.size)
                        .and_then(|s| u64::try_from(s).ok())
                }),
                media_type: d
                    .media_type
                    .or_else(|| annotations.and_then(|a| a.media_type.clone())),
                description: layer_description(i),
                parent: parents
                    .get(i)
                    .copied()
                    .flatten()
                    .and_then(|p| config.layers.get(p))
                    .map(|p| p.blob.clone()),
                depth: depth_of(i),
            })
        })
        .collect();
    Ok(Cache {
        form,
        records,
        layers,
        notes,
    })
}

/// Record indexes in build order: each record after every record its inputs link to,
/// reached depth first from the records nothing links to (the results), inputs in
/// order, so a checksum record comes right before the step that reads it. Records only
/// on a loop (BuildKit removes loops; a damaged config may not) come last; the link that
/// closes a loop is ignored.
fn build_order(links: &[Vec<Vec<(usize, String)>>]) -> Vec<usize> {
    let n = links.len();
    let linked: Vec<Vec<usize>> = links
        .iter()
        .map(|inputs| inputs.iter().flatten().map(|(l, _)| *l).collect())
        .collect();
    let mut used = vec![false; n];
    for l in linked.iter().flatten() {
        if let Some(u) = used.get_mut(*l) {
            *u = true;
        }
    }
    let results = (0..n).filter(|&r| used.get(r) == Some(&false));
    // 0: not reached, 1: on the path, 2: placed.
    let mut state = vec![0u8; n];
    let mut order = Vec::with_capacity(n);
    for start in results.chain(0..n) {
        if state.get(start) != Some(&0) {
            continue;
        }
        if let Some(s) = state.get_mut(start) {
            *s = 1;
        }
        let mut path = vec![(start, 0usize)];
        while let Some((r, next)) = path.last_mut() {
            let r = *r;
            match linked.get(r).and_then(|l| l.get(*next)) {
                Some(&l) => {
                    *next += 1;
                    if let Some(s) = state.get_mut(l)
                        && *s == 0
                    {
                        *s = 1;
                        path.push((l, 0));
                    }
                }
                None => {
                    if let Some(s) = state.get_mut(r) {
                        *s = 2;
                    }
                    order.push(r);
                    path.pop();
                }
            }
        }
    }
    order
}

/// Each record's identity with its inputs: sha256 of its digest and, per input, the
/// sorted `(selector, key)` of its links. Computed in build order; a link not computed
/// yet (a loop) counts by its digest alone.
fn chain_keys(
    config: &CacheConfig,
    links: &[Vec<Vec<(usize, String)>>],
    order: &[usize],
) -> Vec<String> {
    let mut keys: Vec<Option<String>> = vec![None; config.records.len()];
    for &r in order {
        let Some(record) = config.records.get(r) else {
            continue;
        };
        let mut text = record.digest.clone();
        for slot in links.get(r).map(Vec::as_slice).unwrap_or_default() {
            let mut parts: Vec<String> = slot
                .iter()
                .map(|(l, selector)| {
                    let linked = keys
                        .get(*l)
                        .cloned()
                        .flatten()
                        .or_else(|| config.records.get(*l).map(|x| x.digest.clone()))
                        .unwrap_or_default();
                    format!("{selector}={linked}")
                })
                .collect();
            parts.sort();
            text += &format!("|{}", parts.join(","));
        }
        if let Some(k) = keys.get_mut(r) {
            *k = Some(oci::Digest::sha256_of(text.as_bytes()).to_string());
        }
    }
    keys.into_iter().map(Option::unwrap_or_default).collect()
}

/// A record of the cache compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordStatus {
    /// Position in build order, from 1.
    pub position: usize,
    /// Its digest.
    pub digest: String,
    /// The earlier cache has it, with the same inputs.
    pub reused: bool,
    /// What it is.
    pub description: String,
    /// The top layers it produced.
    pub layers: Vec<String>,
}

/// A cache against an earlier one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheComparison {
    /// Records of the cache, in build order.
    pub records: Vec<RecordStatus>,
    /// How many the earlier cache had.
    pub reused: usize,
    /// How many it did not.
    pub new: usize,
    /// The first new record (position in build order).
    pub first_new: Option<usize>,
    /// The first new record that is a build step (has inputs or a layer), which is what
    /// ran again.
    pub first_new_step: Option<usize>,
    /// Layers the earlier cache does not have.
    pub new_layers: usize,
    /// Their total size (where known).
    pub new_layer_bytes: u64,
}

/// Which of `cache`'s records `earlier` already had.
pub fn compare(cache: &Cache, earlier: &Cache) -> CacheComparison {
    let known: HashSet<&str> = earlier.records.iter().map(|r| r.key.as_str()).collect();
    let records: Vec<RecordStatus> = cache
        .records
        .iter()
        .map(|r| RecordStatus {
            position: r.position,
            digest: r.digest.clone(),
            reused: known.contains(r.key.as_str()),
            description: r.description.clone(),
            layers: r.layers.clone(),
        })
        .collect();
    let with_inputs: HashSet<usize> = cache
        .records
        .iter()
        .filter(|r| !r.inputs.is_empty())
        .map(|r| r.position)
        .collect();
    let is_step = |s: &RecordStatus| !s.layers.is_empty() || with_inputs.contains(&s.position);
    let earlier_blobs: HashSet<&str> = earlier.layers.iter().map(|l| l.blob.as_str()).collect();
    let new_layers: Vec<&LayerInfo> = cache
        .layers
        .iter()
        .filter(|l| !earlier_blobs.contains(l.blob.as_str()))
        .collect();
    CacheComparison {
        reused: records.iter().filter(|r| r.reused).count(),
        new: records.iter().filter(|r| !r.reused).count(),
        first_new: records.iter().find(|r| !r.reused).map(|r| r.position),
        first_new_step: records
            .iter()
            .find(|r| !r.reused && is_step(r))
            .map(|r| r.position),
        new_layers: new_layers.len(),
        new_layer_bytes: new_layers.iter().filter_map(|l| l.size).sum(),
        records,
    }
}

impl Cache {
    /// Records and layers in build order, for people; with `against`, which records
    /// were reused.
    pub fn text(&self, against: Option<&CacheComparison>) -> String {
        let status: HashMap<usize, bool> = against
            .map(|c| c.records.iter().map(|r| (r.position, r.reused)).collect())
            .unwrap_or_default();
        let size_of: HashMap<&str, Option<u64>> = self
            .layers
            .iter()
            .map(|l| (l.blob.as_str(), l.size))
            .collect();
        let rows: Vec<Vec<String>> = self
            .records
            .iter()
            .map(|r| {
                let inputs = r
                    .inputs
                    .iter()
                    .map(|slot| {
                        slot.iter()
                            .map(|l| l.record.to_string())
                            .collect::<Vec<_>>()
                            .join("|")
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                let layer = r.layers.first();
                let mut row = vec![
                    r.position.to_string(),
                    short_digest(&r.digest),
                    if inputs.is_empty() {
                        "-".into()
                    } else {
                        inputs
                    },
                    layer.map_or("-".into(), |l| short_digest(l)),
                    layer
                        .and_then(|l| size_of.get(l.as_str()).copied().flatten())
                        .map_or("-".into(), text::size),
                ];
                if against.is_some() {
                    let reused = status.get(&r.position).copied().unwrap_or(false);
                    row.push(if reused { "reused" } else { "new" }.into());
                }
                row.push(text::cut(&r.description, 60));
                row
            })
            .collect();
        let mut header = vec!["#", "RECORD", "INPUTS", "LAYER", "SIZE"];
        if against.is_some() {
            header.push("");
        }
        header.push("STEP");
        let mut out = format!(
            "{}: {} record(s), {} layer(s), {}\n\n",
            self.form.label(),
            self.records.len(),
            self.layers.len(),
            text::bytes(self.layer_bytes())
        );
        out += &text::table(&header, &rows);
        if let Some(c) = against {
            out.push('\n');
            out += &format!(
                "{} record(s) reused, {} new; {} new layer(s), {}.\n",
                c.reused,
                c.new,
                c.new_layers,
                text::bytes(c.new_layer_bytes)
            );
            let describe = |p: usize| {
                self.records
                    .iter()
                    .find(|r| r.position == p)
                    .map(|r| format!("#{p} {} ({})", short_digest(&r.digest), r.description))
                    .unwrap_or_default()
            };
            match (c.first_new, c.first_new_step) {
                (None, _) => out += "Every record was already in the other cache.\n",
                (Some(first), step) => {
                    out += &format!("First new record: {}\n", describe(first));
                    if let Some(step) = step.filter(|s| *s != first) {
                        out += &format!("First new step: {}\n", describe(step));
                    }
                }
            }
        }
        for note in &self.notes {
            out += &format!("Note: {note}.\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    /// A linear build: source 0 → step 1 (layer a) → step 2 (layer b), plus a checksum
    /// record 3 that step 2 also reads. Records deliberately out of order.
    fn config(checksum: &str) -> CacheConfig {
        let json = format!(
            r#"{{"layers":[{{"blob":"{a}","parent":-1}},{{"blob":"{b}"}}],
               "records":[
                 {{"digest":"sha256:step2","inputs":[[{{"link":2}}],[{{"link":3,"selector":"/app"}}]],"layers":[{{"layer":1}}]}},
                 {{"digest":"sha256:source"}},
                 {{"digest":"sha256:step1","inputs":[[{{"link":1}}]],"layers":[{{"layer":0}}]}},
                 {{"digest":"{checksum}"}}
               ]}}"#,
            a = blob('a'),
            b = blob('b'),
        );
        CacheConfig::parse(json.as_bytes()).unwrap()
    }

    fn descriptors() -> Vec<Descriptor> {
        serde_json::from_str(&format!(
            r#"[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":100,
                  "annotations":{{"buildkit/description":"COPY busybox /bin/busybox"}}}},
                {{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":20}},
                {{"mediaType":"application/vnd.buildkit.cacheconfig.v0","digest":"{}","size":5}}]"#,
            blob('a'),
            blob('b'),
            blob('c')
        ))
        .unwrap()
    }

    #[test]
    fn records_and_layers_come_in_build_order() {
        let cache =
            Cache::from_export(CacheForm::Index, &config("sha256:sum1"), &descriptors()).unwrap();
        let digests: Vec<&str> = cache.records.iter().map(|r| r.digest.as_str()).collect();
        assert_eq!(
            digests,
            [
                "sha256:source",
                "sha256:step1",
                "sha256:sum1",
                "sha256:step2"
            ]
        );
        let step2 = &cache.records[3];
        assert_eq!(step2.inputs.len(), 2);
        assert_eq!(step2.inputs[0][0].record, 2);
        assert_eq!(step2.inputs[1][0].record, 3);
        assert_eq!(step2.inputs[1][0].selector, "/app");
        assert_eq!(cache.records[1].description, "COPY busybox /bin/busybox");
        assert_eq!(
            cache.records[0].description,
            "source or file checksum (no layer)"
        );
        let layers: Vec<(&str, usize, Option<u64>)> = cache
            .layers
            .iter()
            .map(|l| (l.blob.as_str(), l.depth, l.size))
            .collect();
        assert_eq!(
            layers,
            [
                (blob('a').as_str(), 0, Some(100)),
                (blob('b').as_str(), 1, Some(20))
            ]
        );
        assert_eq!(cache.layers[1].parent.as_deref(), Some(blob('a').as_str()));
        assert!(cache.notes.is_empty(), "{:?}", cache.notes);
        assert_eq!(cache.layer_bytes(), 120);
        let text = cache.text(None);
        assert!(text.contains("4 record(s), 2 layer(s)"), "{text}");
    }

    #[test]
    fn a_changed_input_makes_its_users_new_although_their_digests_are_the_same() {
        let old =
            Cache::from_export(CacheForm::Index, &config("sha256:sum1"), &descriptors()).unwrap();
        let new =
            Cache::from_export(CacheForm::Index, &config("sha256:sum2"), &descriptors()).unwrap();
        let c = compare(&new, &old);
        let reused: Vec<(&str, bool)> = c
            .records
            .iter()
            .map(|r| (r.digest.as_str(), r.reused))
            .collect();
        assert_eq!(
            reused,
            [
                ("sha256:source", true),
                ("sha256:step1", true),
                ("sha256:sum2", false),
                ("sha256:step2", false)
            ]
        );
        assert_eq!((c.reused, c.new), (2, 2));
        assert_eq!(c.first_new, Some(3));
        assert_eq!(c.first_new_step, Some(4));
        assert_eq!(c.new_layers, 0, "same blobs in both");
        let text = new.text(Some(&c));
        assert!(text.contains("First new record: #3"), "{text}");
        assert!(text.contains("First new step: #4"), "{text}");

        let same = compare(&old, &old);
        assert_eq!((same.new, same.first_new), (0, None));
    }

    #[test]
    fn inline_caches_use_the_image_layers() {
        use crate::explain::image::{Layer, Step};
        let records = r#"[{"digest":"sha256:src"},{"digest":"sha256:copy","inputs":[[{"link":0}]],"layers":[{"layer":0}]}]"#;
        let image = Image {
            layers: vec![Layer {
                digest: blob('a'),
                size: 7,
                media_type: "application/vnd.docker.image.rootfs.diff.tar.gzip".into(),
                diff_id: None,
            }],
            steps: vec![Step {
                instruction: "COPY a /".into(),
                created_by: "COPY a / # buildkit".into(),
                empty_layer: false,
                layer: Some(0),
            }],
            inline_cache: Some(base64::engine::general_purpose::STANDARD.encode(records)),
            diff_ids: 1,
            notes: Vec::new(),
        };
        let cache = Cache::from_inline(&image).unwrap().unwrap();
        assert_eq!(cache.form, CacheForm::Inline);
        assert_eq!(cache.records[1].description, "COPY a /");
        assert_eq!(cache.layers[0].size, Some(7));

        let mut bad = image.clone();
        bad.inline_cache = Some("%%%".into());
        assert!(Cache::from_inline(&bad).is_err());
        bad.inline_cache = None;
        assert_eq!(Cache::from_inline(&bad), Ok(None));
    }

    #[test]
    fn out_of_range_indexes_are_malformed_not_panics() {
        for json in [
            r#"{"records":[{"digest":"sha256:x","inputs":[[{"link":5}]]}]}"#.to_owned(),
            r#"{"records":[{"digest":"sha256:x","layers":[{"layer":0}]}]}"#.to_owned(),
            format!(r#"{{"layers":[{{"blob":"{}","parent":3}}]}}"#, blob('a')),
            r#"{"layers":[{"blob":"nope","parent":-1}]}"#.to_owned(),
            r#"{"records":[{"digest":"sha256:x","inputs":[[{"link":-1}]]}]}"#.to_owned(),
        ] {
            let config = CacheConfig::parse(json.as_bytes()).unwrap();
            let err = Cache::from_export(CacheForm::Index, &config, &[]).unwrap_err();
            assert!(matches!(err, Error::Malformed { .. }), "{json}: {err}");
        }
        assert!(CacheConfig::parse(b"[1,2]").is_err());
    }

    #[test]
    fn loops_do_not_hang_or_panic() {
        let json = r#"{"records":[
            {"digest":"sha256:a","inputs":[[{"link":1}]]},
            {"digest":"sha256:b","inputs":[[{"link":0}]]},
            {"digest":"sha256:c"}]}"#;
        let config = CacheConfig::parse(json.as_bytes()).unwrap();
        let cache = Cache::from_export(CacheForm::Index, &config, &[]).unwrap();
        assert_eq!(cache.records.len(), 3);
        assert_eq!(cache.records[0].digest, "sha256:c");
    }
}
