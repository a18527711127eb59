//! Blob bodies for the workloads, generated once in memory and sent as streams of shared
//! [`Bytes`] slices, so building a request body costs the client neither a copy nor a hash.
//!
//! Distinct blobs come cheaply from one random [`Base`]: a blob is the first `n` MiB of
//! the base followed by a short unique suffix, and its digest continues the SHA-256 state
//! saved at that MiB boundary. No server ever sees the same large digest twice, so no
//! figure can profit from deduplication.

use std::convert::Infallible;

use anyhow::{Context, Result};
use bytes::Bytes;
use rand::{RngCore, SeedableRng};
use sha2::{Digest as _, Sha256};

/// One mebibyte.
pub const MIB: usize = 1 << 20;

/// Random bytes in 1 MiB slices, with the hash state after every slice.
pub struct Base {
    slices: Vec<Bytes>,
    /// `states[i]` has hashed the first `i` slices.
    states: Vec<Sha256>,
}

impl Base {
    /// `mib` MiB of pseudo-random bytes from `seed`.
    pub fn generate(mib: usize, seed: u64) -> Base {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut hasher = Sha256::new();
        let mut slices = Vec::with_capacity(mib);
        let mut states = Vec::with_capacity(mib + 1);
        states.push(hasher.clone());
        for _ in 0..mib {
            let mut buf = vec![0u8; MIB];
            rng.fill_bytes(&mut buf);
            hasher.update(&buf);
            states.push(hasher.clone());
            slices.push(Bytes::from(buf));
        }
        Base { slices, states }
    }

    /// Every slice of the base.
    pub fn slices(&self) -> &[Bytes] {
        &self.slices
    }

    /// The first `mib` MiB of the base followed by a suffix unique to `label`.
    pub fn blob(&self, mib: usize, label: &str) -> Result<Blob> {
        let prefix = self
            .slices
            .get(..mib)
            .with_context(|| format!("a {mib} MiB blob from a {} MiB base", self.slices.len()))?;
        let mut hasher = self.states.get(mib).context("hash state")?.clone();
        let suffix = Bytes::from(format!("\n{label}\n").into_bytes());
        hasher.update(&suffix);
        let mut slices = prefix.to_vec();
        slices.push(suffix);
        Ok(Blob::from_slices(
            slices,
            format!("sha256:{}", hex::encode(hasher.finalize())),
        ))
    }

    /// The first `len` bytes of the base (at most 1 MiB), for [`Prefix::blob`].
    pub fn prefix(&self, len: usize) -> Result<Prefix> {
        let bytes = self
            .slices
            .first()
            .filter(|s| s.len() >= len)
            .with_context(|| format!("a {len}-byte prefix of a {} MiB base", self.slices.len()))?
            .slice(..len);
        let mut state = Sha256::new();
        state.update(&bytes);
        Ok(Prefix { bytes, state })
    }
}

/// The first bytes of a [`Base`], hashed once: many distinct small blobs of one size
/// cost neither memory nor hashing beyond their suffix.
pub struct Prefix {
    bytes: Bytes,
    state: Sha256,
}

impl Prefix {
    /// The prefix followed by a suffix unique to `label`.
    pub fn blob(&self, label: &str) -> Blob {
        let suffix = Bytes::from(format!("\n{label}\n").into_bytes());
        let mut hasher = self.state.clone();
        hasher.update(&suffix);
        Blob::from_slices(
            vec![self.bytes.clone(), suffix],
            format!("sha256:{}", hex::encode(hasher.finalize())),
        )
    }
}

/// A blob body and its digest.
#[derive(Clone)]
pub struct Blob {
    slices: Vec<Bytes>,
    /// Length in bytes.
    pub len: u64,
    /// `sha256:<hex>`.
    pub digest: String,
}

impl Blob {
    fn from_slices(slices: Vec<Bytes>, digest: String) -> Blob {
        let len = slices.iter().map(|s| s.len() as u64).sum();
        Blob {
            slices,
            len,
            digest,
        }
    }

    /// A blob held in one buffer; its digest is computed here.
    pub fn from_bytes(bytes: Bytes) -> Blob {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        Blob::from_slices(vec![bytes], digest)
    }

    /// `len` pseudo-random bytes from `seed`.
    pub fn random(len: usize, seed: u64) -> Blob {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut buf = vec![0u8; len];
        rng.fill_bytes(&mut buf);
        Blob::from_bytes(Bytes::from(buf))
    }

    /// The whole body as a request body streaming the shared slices.
    pub fn body(&self) -> reqwest::Body {
        stream_body(self.slices.clone())
    }

    /// The body cut into parts of about `chunk` bytes (whole slices; a short tail is
    /// folded into the previous part), for chunked uploads.
    pub fn parts(&self, chunk: usize) -> Vec<Part> {
        let mut parts: Vec<Part> = Vec::new();
        let mut current = Part {
            offset: 0,
            len: 0,
            slices: Vec::new(),
        };
        for slice in &self.slices {
            if current.len >= chunk as u64 {
                let offset = current.offset + current.len;
                parts.push(std::mem::replace(
                    &mut current,
                    Part {
                        offset,
                        len: 0,
                        slices: Vec::new(),
                    },
                ));
            }
            current.len += slice.len() as u64;
            current.slices.push(slice.clone());
        }
        match parts.last_mut() {
            Some(last) if current.len < (chunk as u64) / 4 => {
                last.len += current.len;
                last.slices.extend(current.slices);
            }
            _ if current.len > 0 => parts.push(current),
            _ => {}
        }
        parts
    }
}

/// A contiguous part of a blob.
pub struct Part {
    /// Offset of the first byte in the blob.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    slices: Vec<Bytes>,
}

impl Part {
    /// The part as a request body.
    pub fn body(&self) -> reqwest::Body {
        stream_body(self.slices.clone())
    }
}

fn stream_body(slices: Vec<Bytes>) -> reqwest::Body {
    reqwest::Body::wrap_stream(futures::stream::iter(
        slices.into_iter().map(Ok::<Bytes, Infallible>),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_digest_matches_its_bytes() {
        let base = Base::generate(3, 7);
        let blob = base.blob(2, "x").unwrap();
        let mut h = Sha256::new();
        for s in &blob.slices {
            h.update(s);
        }
        assert_eq!(blob.digest, format!("sha256:{}", hex::encode(h.finalize())));
        assert_eq!(blob.len, 2 * MIB as u64 + 3);
        assert_ne!(blob.digest, base.blob(2, "y").unwrap().digest);
    }

    #[test]
    fn prefix_blobs_are_distinct_and_hash_right() {
        let base = Base::generate(1, 3);
        let prefix = base.prefix(1000).unwrap();
        let (a, b) = (prefix.blob("a"), prefix.blob("b"));
        assert_ne!(a.digest, b.digest);
        assert_eq!(a.len, 1003);
        let mut h = Sha256::new();
        for s in &a.slices {
            h.update(s);
        }
        assert_eq!(a.digest, format!("sha256:{}", hex::encode(h.finalize())));
        assert!(base.prefix(MIB + 1).is_err());
    }

    #[test]
    fn parts_cover_the_blob_in_order() {
        let base = Base::generate(10, 1);
        let blob = base.blob(10, "tail").unwrap();
        let parts = blob.parts(4 * MIB);
        let lens: Vec<u64> = parts.iter().map(|p| p.len).collect();
        assert_eq!(
            lens,
            vec![4 * MIB as u64, 4 * MIB as u64, 2 * MIB as u64 + 6]
        );
        assert_eq!(parts[2].offset, 8 * MIB as u64);
        let exact = base.blob(8, "t").unwrap().parts(4 * MIB);
        assert_eq!(exact.len(), 2);
        assert_eq!(exact[1].len, 4 * MIB as u64 + 3);
    }
}
