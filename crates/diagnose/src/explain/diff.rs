//! Two images aligned step by step: which steps kept their layer, the first one that did
//! not, and what was rebuilt from there on.
//!
//! Steps are aligned on their instructions (a longest common subsequence, so a step
//! added or removed shows as a gap instead of shifting every later row); a pair is the
//! same when both produced the same layer (blob digest or `diff_id`) or both produced
//! none. BuildKit's cache is a chain: once a step misses, every later step runs again,
//! so everything B holds from the first difference on was rebuilt and pushed.

use std::collections::HashMap;

use serde::Serialize;

use super::cache::Cache;
use super::image::{Image, Layer, Step};
use super::{short_digest, text};

/// Beyond this many cells the alignment is positional (bounds the work on huge inputs).
const MAX_LCS_CELLS: usize = 4_000_000;

/// How a row's two sides compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Same instruction and the same layer (or both none).
    Same,
    /// Same position, but the instruction or the layer differs.
    Differs,
    /// A step only A has.
    OnlyInA,
    /// A step only B has.
    OnlyInB,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Same => "same",
            Status::Differs => "differs",
            Status::OnlyInA => "only in A",
            Status::OnlyInB => "only in B",
        }
    }
}

/// One side of a row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Side {
    /// The instruction, cleaned.
    pub instruction: String,
    /// `created_by` as recorded.
    pub created_by: String,
    /// The layer it produced, if any.
    pub layer: Option<Layer>,
}

/// One aligned step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    /// Row number, from 1.
    pub step: usize,
    /// A's step, absent for a step only B has.
    pub a: Option<Side>,
    /// B's step, absent for a step only A has.
    pub b: Option<Side>,
    /// How they compare.
    pub status: Status,
}

/// The first step that differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Divergence {
    /// Its row number.
    pub step: usize,
    /// B's instruction there (A's if B has none).
    pub instruction: String,
    /// A's instruction there, if A has a step there.
    pub instruction_a: Option<String>,
    /// B's instruction there, if B has a step there.
    pub instruction_b: Option<String>,
    /// What differs, in a sentence.
    pub reason: String,
    /// When both images carry an inline cache that covers this step's layers: whether
    /// its cache key (operation and inputs) is the same in both. The same key with a
    /// different layer means the step ran again for want of a cache, not because an
    /// input changed.
    pub same_cache_key: Option<bool>,
}

/// Two images compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageDiff {
    /// Every step is the same.
    pub identical: bool,
    /// The first step that differs.
    pub first_difference: Option<Divergence>,
    /// B's layers from the first difference on (rebuilt and pushed).
    pub rebuilt_layers: usize,
    /// Their total size.
    pub rebuilt_bytes: u64,
    /// Of those, the layers A does not have at all (new blobs).
    pub new_layers: usize,
    /// Their total size.
    pub new_bytes: u64,
    /// The aligned steps.
    pub rows: Vec<Row>,
    /// Inconsistencies in either image.
    pub notes: Vec<String>,
}

/// Align `a` and `b` and find where B stopped matching A.
pub fn diff_images(a: &Image, b: &Image) -> ImageDiff {
    let pairs = align(&a.steps, &b.steps);
    let side = |image: &Image, step: &Step| Side {
        instruction: step.instruction.clone(),
        created_by: step.created_by.clone(),
        layer: step.layer.and_then(|i| image.layers.get(i)).cloned(),
    };
    let mut rows = Vec::with_capacity(pairs.len());
    for (n, (ia, ib)) in pairs.into_iter().enumerate() {
        let sa = ia.and_then(|i| a.steps.get(i)).map(|s| side(a, s));
        let sb = ib.and_then(|i| b.steps.get(i)).map(|s| side(b, s));
        let status = match (&sa, &sb) {
            (Some(x), Some(y)) if x.instruction == y.instruction && same_layer(x, y) => {
                Status::Same
            }
            (Some(_), Some(_)) => Status::Differs,
            (Some(_), None) => Status::OnlyInA,
            _ => Status::OnlyInB,
        };
        rows.push(Row {
            step: n + 1,
            a: sa,
            b: sb,
            status,
        });
    }
    let first = rows.iter().position(|r| r.status != Status::Same);
    let (keys_a, keys_b) = (inline_keys(a), inline_keys(b));
    let first_difference = first
        .and_then(|i| rows.get(i))
        .map(|row| divergence(row, &keys_a, &keys_b));
    let a_blobs: std::collections::HashSet<&str> =
        a.layers.iter().map(|l| l.digest.as_str()).collect();
    let rebuilt: Vec<&Layer> = first
        .map(|i| rows.get(i..).unwrap_or_default())
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r.b.as_ref().and_then(|s| s.layer.as_ref()))
        .collect();
    let new: Vec<&&Layer> = rebuilt
        .iter()
        .filter(|l| !a_blobs.contains(l.digest.as_str()))
        .collect();
    let mut notes: Vec<String> = a.notes.iter().map(|n| format!("A: {n}")).collect();
    notes.extend(b.notes.iter().map(|n| format!("B: {n}")));
    ImageDiff {
        identical: first.is_none(),
        first_difference,
        rebuilt_layers: rebuilt.len(),
        rebuilt_bytes: rebuilt.iter().map(|l| l.size).sum(),
        new_layers: new.len(),
        new_bytes: new.iter().map(|l| l.size).sum(),
        rows,
        notes,
    }
}

/// Both produced the same layer, or both none.
fn same_layer(a: &Side, b: &Side) -> bool {
    match (&a.layer, &b.layer) {
        (None, None) => true,
        (Some(x), Some(y)) => {
            x.digest == y.digest || (x.diff_id.is_some() && x.diff_id == y.diff_id)
        }
        _ => false,
    }
}

/// Layer blob → cache key of the record that produced it, from an image's inline cache.
fn inline_keys(image: &Image) -> HashMap<String, String> {
    let Ok(Some(cache)) = Cache::from_inline(image) else {
        return HashMap::new();
    };
    cache
        .records
        .iter()
        .flat_map(|r| r.layers.iter().map(|l| (l.clone(), r.key.clone())))
        .collect()
}

fn divergence(
    row: &Row,
    keys_a: &HashMap<String, String>,
    keys_b: &HashMap<String, String>,
) -> Divergence {
    let ia = row.a.as_ref().map(|s| s.instruction.clone());
    let ib = row.b.as_ref().map(|s| s.instruction.clone());
    let instruction = ib.clone().or_else(|| ia.clone()).unwrap_or_default();
    let key = |side: &Option<Side>, keys: &HashMap<String, String>| {
        side.as_ref()
            .and_then(|s| s.layer.as_ref())
            .and_then(|l| keys.get(&l.digest))
            .cloned()
    };
    let same_cache_key = match (key(&row.a, keys_a), key(&row.b, keys_b)) {
        (Some(x), Some(y)) => Some(x == y),
        _ => None,
    };
    let reason = match (&row.a, &row.b) {
        (Some(a), Some(b)) if a.instruction != b.instruction => {
            "the instruction changed, so its cache key changed".to_owned()
        }
        (Some(_), Some(_)) if same_cache_key == Some(true) => {
            "same instruction and, per both inline caches, the same cache key (same \
             inputs), yet a different layer: the step ran again because the builder had no \
             cache for it (a fresh or pruned builder, or no usable --cache-from), not \
             because an input changed"
                .to_owned()
        }
        (Some(_), Some(b)) => {
            let verb = b.instruction.split_whitespace().next().unwrap_or("");
            let known = if same_cache_key == Some(false) {
                "; both inline caches confirm its cache key changed"
            } else {
                ""
            };
            if matches!(verb, "COPY" | "ADD") {
                format!(
                    "same instruction, different layer: the files it copies changed, or it \
                     ran again without a cache (a rerun writes new timestamps){known}"
                )
            } else if verb == "RUN" {
                format!(
                    "same instruction, different layer: an input it reads changed (files, a \
                     build argument, a mounted secret or cache), the command is not \
                     reproducible, or it ran again without a cache{known}"
                )
            } else {
                format!("same instruction, different layer{known}")
            }
        }
        (None, Some(_)) => "a step B added".to_owned(),
        _ => "a step B no longer has".to_owned(),
    };
    Divergence {
        step: row.step,
        instruction,
        instruction_a: ia,
        instruction_b: ib,
        reason,
        same_cache_key,
    }
}

/// Index pairs of the alignment: a longest common subsequence of instructions, with the
/// unmatched steps between two matches paired up position by position.
fn align(a: &[Step], b: &[Step]) -> Vec<(Option<usize>, Option<usize>)> {
    let matches = if a.len().saturating_mul(b.len()) > MAX_LCS_CELLS {
        Vec::new()
    } else {
        lcs(a, b)
    };
    let mut pairs = Vec::new();
    let (mut i, mut j) = (0, 0);
    for (mi, mj) in matches.into_iter().chain([(a.len(), b.len())]) {
        // Unmatched runs before this match: pair them while both last.
        while i < mi && j < mj {
            pairs.push((Some(i), Some(j)));
            i += 1;
            j += 1;
        }
        while i < mi {
            pairs.push((Some(i), None));
            i += 1;
        }
        while j < mj {
            pairs.push((None, Some(j)));
            j += 1;
        }
        if mi < a.len() && mj < b.len() {
            pairs.push((Some(mi), Some(mj)));
            i = mi + 1;
            j = mj + 1;
        }
    }
    pairs
}

/// The matched index pairs of a longest common subsequence of the instructions.
fn lcs(a: &[Step], b: &[Step]) -> Vec<(usize, usize)> {
    let (n, m) = (a.len(), b.len());
    let width = m + 1;
    // lengths[i * width + j]: LCS length of a[i..] and b[j..].
    let mut lengths = vec![0u32; (n + 1) * width];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            let same = match (a.get(i), b.get(j)) {
                (Some(x), Some(y)) => x.instruction == y.instruction,
                _ => false,
            };
            let value = if same {
                lengths.get((i + 1) * width + j + 1).copied().unwrap_or(0) + 1
            } else {
                let down = lengths.get((i + 1) * width + j).copied().unwrap_or(0);
                let right = lengths.get(i * width + j + 1).copied().unwrap_or(0);
                down.max(right)
            };
            if let Some(cell) = lengths.get_mut(i * width + j) {
                *cell = value;
            }
        }
    }
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n && j < m {
        let same = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) => x.instruction == y.instruction,
            _ => false,
        };
        if same {
            out.push((i, j));
            i += 1;
            j += 1;
        } else if lengths.get((i + 1) * width + j) >= lengths.get(i * width + j + 1) {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

impl ImageDiff {
    /// The table and the verdict, for people.
    pub fn text(&self) -> String {
        let first_step = self.first_difference.as_ref().map(|d| d.step);
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                let instruction = |s: &Option<Side>| {
                    s.as_ref()
                        .map_or("-".to_owned(), |s| text::cut(&s.instruction, 44))
                };
                let layer = |s: &Option<Side>| {
                    s.as_ref()
                        .and_then(|s| s.layer.as_ref())
                        .map_or("-".to_owned(), |l| short_digest(&l.digest))
                };
                let mut status = r.status.label().to_owned();
                if Some(r.step) == first_step {
                    status += "  <- first difference";
                }
                vec![
                    r.step.to_string(),
                    instruction(&r.a),
                    instruction(&r.b),
                    layer(&r.a),
                    layer(&r.b),
                    status,
                ]
            })
            .collect();
        let mut out = text::table(&["STEP", "A", "B", "LAYER A", "LAYER B", ""], &rows);
        out.push('\n');
        match &self.first_difference {
            None => {
                out += "The images are identical step by step: every layer of B is the \
                            same as A's, nothing was rebuilt.\n"
            }
            Some(d) => {
                out += &format!("First difference: step {}: {}\n", d.step, d.instruction);
                if let (Some(a), Some(b)) = (&d.instruction_a, &d.instruction_b)
                    && a != b
                {
                    out += &format!("  A had: {a}\n");
                }
                out += &format!("  {}.\n", capitalized(&d.reason));
                out += &format!(
                    "Rebuilt and pushed from there on: {} layer(s), {}",
                    self.rebuilt_layers,
                    text::bytes(self.rebuilt_bytes)
                );
                if self.new_layers < self.rebuilt_layers {
                    out += &format!(
                        "; {} of them new blobs, {}",
                        self.new_layers,
                        text::bytes(self.new_bytes)
                    );
                }
                out += ".\n";
            }
        }
        for note in &self.notes {
            out += &format!("Note: {note}.\n");
        }
        out
    }
}

fn capitalized(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str, size: u64) -> Layer {
        Layer {
            digest: format!("sha256:{}", name.repeat(64 / name.len())),
            size,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            diff_id: None,
        }
    }

    /// An image from `(instruction, Some((layer name, size)))` steps.
    fn image(steps: &[(&str, Option<(&str, u64)>)]) -> Image {
        let mut layers = Vec::new();
        let steps = steps
            .iter()
            .map(|(instruction, l)| {
                let index = l.map(|(name, size)| {
                    layers.push(layer(name, size));
                    layers.len() - 1
                });
                Step {
                    instruction: (*instruction).to_owned(),
                    created_by: format!("{instruction} # buildkit"),
                    empty_layer: index.is_none(),
                    layer: index,
                }
            })
            .collect();
        Image {
            layers,
            steps,
            inline_cache: None,
            diff_ids: 0,
            notes: Vec::new(),
        }
    }

    #[test]
    fn a_changed_copy_is_the_first_difference_and_later_layers_are_rebuilt() {
        let a = image(&[
            ("COPY busybox /bin/busybox", Some(("1", 1000))),
            ("ENV A=1", None),
            ("RUN setup", Some(("2", 200))),
            ("COPY app.txt /app/", Some(("3", 30))),
            ("RUN build", Some(("4", 400))),
            ("RUN tidy", Some(("5", 50))),
        ]);
        let b = image(&[
            ("COPY busybox /bin/busybox", Some(("1", 1000))),
            ("ENV A=1", None),
            ("RUN setup", Some(("2", 200))),
            ("COPY app.txt /app/", Some(("6", 31))),
            ("RUN build", Some(("7", 401))),
            ("RUN tidy", Some(("5", 50))),
        ]);
        let d = diff_images(&a, &b);
        assert!(!d.identical);
        let first = d.first_difference.as_ref().unwrap();
        assert_eq!(first.step, 4);
        assert_eq!(first.instruction, "COPY app.txt /app/");
        assert!(first.reason.contains("files it copies"), "{}", first.reason);
        assert_eq!(d.rebuilt_layers, 3);
        assert_eq!(d.rebuilt_bytes, 31 + 401 + 50);
        assert_eq!(d.new_layers, 2, "the last layer came out the same");
        assert_eq!(d.new_bytes, 31 + 401);
        let statuses: Vec<Status> = d.rows.iter().map(|r| r.status).collect();
        use Status::*;
        assert_eq!(statuses, [Same, Same, Same, Differs, Differs, Same]);
        let text = d.text();
        assert!(
            text.contains("First difference: step 4: COPY app.txt /app/"),
            "{text}"
        );
        assert!(text.contains("<- first difference"), "{text}");
        assert!(text.contains("3 layer(s), 482 bytes"), "{text}");
    }

    #[test]
    fn identical_images_say_so() {
        let a = image(&[("COPY a /", Some(("1", 10))), ("CMD x", None)]);
        let d = diff_images(&a, &a.clone());
        assert!(d.identical);
        assert!(d.first_difference.is_none());
        assert_eq!(d.rebuilt_bytes, 0);
        assert!(d.text().contains("identical"), "{}", d.text());
    }

    #[test]
    fn an_inserted_step_shows_as_a_gap_not_a_shift() {
        let a = image(&[
            ("COPY a /", Some(("1", 10))),
            ("RUN x", Some(("2", 20))),
            ("RUN y", Some(("3", 30))),
        ]);
        let b = image(&[
            ("COPY a /", Some(("1", 10))),
            ("RUN new", Some(("4", 40))),
            ("RUN x", Some(("5", 21))),
            ("RUN y", Some(("6", 31))),
        ]);
        let d = diff_images(&a, &b);
        let statuses: Vec<Status> = d.rows.iter().map(|r| r.status).collect();
        use Status::*;
        assert_eq!(statuses, [Same, OnlyInB, Differs, Differs]);
        let first = d.first_difference.unwrap();
        assert_eq!((first.step, first.instruction.as_str()), (2, "RUN new"));
        assert_eq!(d.rebuilt_bytes, 40 + 21 + 31);
    }

    #[test]
    fn a_changed_instruction_and_a_removed_step_are_differences() {
        let a = image(&[("ENV V=1", None), ("RUN x", Some(("1", 10)))]);
        let b = image(&[("ENV V=2", None), ("RUN x", Some(("2", 10)))]);
        let d = diff_images(&a, &b);
        let first = d.first_difference.unwrap();
        assert_eq!(first.step, 1);
        assert_eq!(first.instruction_a.as_deref(), Some("ENV V=1"));
        assert!(first.reason.contains("instruction changed"));

        let shorter = image(&[("ENV V=1", None)]);
        let d = diff_images(&a, &shorter);
        assert_eq!(d.rows.last().unwrap().status, Status::OnlyInA);
        assert_eq!(d.rebuilt_bytes, 0);
    }

    #[test]
    fn inline_caches_tell_a_rerun_from_a_changed_input() {
        use base64::Engine;
        let records = |sum: &str| {
            let json = format!(
                r#"[{{"digest":"{sum}"}},{{"digest":"sha256:copy","inputs":[[{{"link":0}}]],"layers":[{{"layer":0}}]}}]"#
            );
            Some(base64::engine::general_purpose::STANDARD.encode(json))
        };
        let mut a = image(&[("COPY a /", Some(("1", 10)))]);
        let mut b = image(&[("COPY a /", Some(("2", 10)))]);
        a.inline_cache = records("sha256:sum1");
        b.inline_cache = records("sha256:sum1");
        let rerun = diff_images(&a, &b).first_difference.unwrap();
        assert_eq!(rerun.same_cache_key, Some(true));
        assert!(rerun.reason.contains("had no cache"), "{}", rerun.reason);
        b.inline_cache = records("sha256:sum2");
        let changed = diff_images(&a, &b).first_difference.unwrap();
        assert_eq!(changed.same_cache_key, Some(false));
        assert!(
            changed.reason.contains("files it copies changed"),
            "{}",
            changed.reason
        );
        b.inline_cache = None;
        assert_eq!(
            diff_images(&a, &b).first_difference.unwrap().same_cache_key,
            None
        );
    }

    #[test]
    fn recompressed_layers_with_the_same_diff_id_are_the_same() {
        let mut a = image(&[("COPY a /", Some(("1", 10)))]);
        let mut b = image(&[("COPY a /", Some(("2", 12)))]);
        a.layers[0].diff_id = Some("sha256:same".into());
        b.layers[0].diff_id = Some("sha256:same".into());
        assert!(diff_images(&a, &b).identical);
    }
}
