//! Content digests (`algorithm:hex`) and the streaming hasher that produces them.
//!
//! Parsing accepts only the algorithms OCI registers (`sha256`, `sha512`), with lower-case
//! hex of the exact length, so a `Digest` is always safe to turn into a file name. The
//! store also addresses content no client names (cache entries' parts) by `blake3`, which
//! only [`Digest::parse_stored`] accepts back.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// A registered digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256, the algorithm every client uses by default.
    Sha256,
    /// SHA-512.
    Sha512,
    /// BLAKE3 (256-bit output): not registered with OCI, so never accepted from a client;
    /// the store's address for content only it names, about five times cheaper per byte
    /// than SHA-256.
    Blake3,
}

impl Algorithm {
    /// The algorithm's name as it appears in a digest string.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
            Algorithm::Blake3 => "blake3",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 | Algorithm::Blake3 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// Why a string is not a valid digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// No `algorithm:` prefix.
    #[error("digest has no algorithm prefix")]
    MissingAlgorithm,
    /// An algorithm this registry does not support.
    #[error("unsupported digest algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The encoded part is not lower-case hex of the algorithm's length.
    #[error("digest encoding is not {expected} lower-case hex characters")]
    BadEncoding {
        /// The length the algorithm requires.
        expected: usize,
    },
}

/// A validated content digest such as `sha256:e3b0…`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// The digest's algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lower-case hex encoding, without the algorithm prefix.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The SHA-256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        let mut hasher = Hasher::new(Algorithm::Sha256);
        hasher.update(bytes);
        hasher.finish()
    }

    /// The digest of `bytes` with this digest's algorithm (to verify content against it).
    pub fn matches(&self, bytes: &[u8]) -> bool {
        let mut hasher = Hasher::new(self.algorithm);
        hasher.update(bytes);
        hasher.finish() == *self
    }

    /// Parse a digest the store wrote: any algorithm it addresses content by, including
    /// those no client may name.
    pub fn parse_stored(s: &str) -> Result<Digest, DigestError> {
        Digest::parse(s, true)
    }

    fn parse(s: &str, stored: bool) -> Result<Digest, DigestError> {
        let (algorithm, hex) = s.split_once(':').ok_or(DigestError::MissingAlgorithm)?;
        let algorithm = match algorithm {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            "blake3" if stored => Algorithm::Blake3,
            other => return Err(DigestError::UnsupportedAlgorithm(other.to_owned())),
        };
        let valid = hex.len() == algorithm.hex_len()
            && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !valid {
            return Err(DigestError::BadEncoding {
                expected: algorithm.hex_len(),
            });
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    /// Parse a digest a client sent: registered algorithms only.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s, false)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Incremental hasher for one algorithm; feed it bytes as they stream in.
#[derive(Clone)]
pub enum Hasher {
    /// SHA-256 state.
    Sha256(sha2::Sha256),
    /// SHA-512 state.
    Sha512(sha2::Sha512),
    /// BLAKE3 state.
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    /// A fresh hasher for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
            Algorithm::Blake3 => Hasher::Blake3(Box::default()),
        }
    }

    /// Feed more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
            Hasher::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        let (algorithm, hex) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            Hasher::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
            Hasher::Blake3(h) => (Algorithm::Blake3, h.finalize().to_hex().to_string()),
        };
        Digest { algorithm, hex }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn empty_input_hashes_to_the_well_known_digest() {
        assert_eq!(Digest::sha256_of(b"").to_string(), EMPTY);
    }

    #[test]
    fn parse_round_trips_and_rejects_malformed_digests() {
        assert_eq!(
            EMPTY.parse::<Digest>().map(|d| d.to_string()),
            Ok(EMPTY.to_owned())
        );
        for bad in [
            "",
            "sha256",
            "sha256:",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:../../../../etc/passwd",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/..",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn blake3_digests_are_only_parsed_back_from_the_store() {
        let mut h = Hasher::new(Algorithm::Blake3);
        h.update(b"abc");
        let digest = h.finish();
        // The reference vector from the BLAKE3 test suite.
        assert_eq!(
            digest.to_string(),
            "blake3:6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        let printed = digest.to_string();
        assert_eq!(Digest::parse_stored(&printed), Ok(digest));
        assert_eq!(
            printed.parse::<Digest>(),
            Err(DigestError::UnsupportedAlgorithm("blake3".into()))
        );
        assert_eq!(
            Digest::parse_stored(EMPTY).map(|d| d.to_string()),
            Ok(EMPTY.to_owned())
        );
    }

    #[test]
    fn incremental_hashing_equals_one_shot() {
        let mut h = Hasher::new(Algorithm::Sha256);
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.finish(), Digest::sha256_of(b"hello world"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn whatever_parses_prints_back_the_same(s in "\\PC{0,80}|sha(256|512):[0-9a-fA-F]{60,130}") {
                if let Ok(digest) = s.parse::<Digest>() {
                    prop_assert_eq!(digest.to_string(), s);
                }
            }

            #[test]
            fn well_formed_digests_parse(hex in "[0-9a-f]{64}", hex512 in "[0-9a-f]{128}") {
                let digest: Digest = format!("sha256:{hex}").parse().unwrap();
                prop_assert_eq!(digest.hex(), hex.as_str());
                let digest: Digest = format!("sha512:{hex512}").parse().unwrap();
                prop_assert_eq!(digest.algorithm(), Algorithm::Sha512);
            }

            #[test]
            fn a_digest_is_safe_as_a_file_name(s in "sha256:[0-9a-f./A-F]{62,66}") {
                if let Ok(digest) = s.parse::<Digest>() {
                    prop_assert!(digest.hex().bytes().all(|b| b.is_ascii_hexdigit()));
                }
            }

            #[test]
            fn hashing_matches_its_own_digest(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                let digest = Digest::sha256_of(&bytes);
                prop_assert!(digest.matches(&bytes));
                prop_assert_eq!(digest.to_string().parse::<Digest>(), Ok(digest));
            }
        }
    }
}
