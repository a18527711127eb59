//! JSON Web Tokens signed by a test issuer: RSA keys made with openssl, their key sets,
//! and tokens signed with them.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// An RSA key made with openssl, and its public half as a JSON Web Key Set.
pub struct Rsa {
    /// The private key, PEM.
    pub pem: PathBuf,
    /// The public key as a JSON Web Key Set.
    pub jwks: String,
}

pub fn rsa_key(dir: &Path, kid: &str) -> Rsa {
    let pem = dir.join(format!("{kid}.pem"));
    super::run_ok(
        Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&pem)
            .arg("2048"),
    );
    let out = Command::new("openssl")
        .args(["rsa", "-noout", "-modulus", "-in"])
        .arg(&pem)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let modulus = hex::decode(text.trim().trim_start_matches("Modulus=")).unwrap();
    let jwks = serde_json::json!({ "keys": [{
        "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
        "n": URL_SAFE_NO_PAD.encode(modulus), "e": "AQAB",
    }]})
    .to_string();
    Rsa { pem, jwks }
}

/// A JWT with `claims`, signed RS256 by `key` (with openssl), naming `kid`.
pub fn sign(key: &Rsa, kid: &str, claims: serde_json::Value) -> String {
    let header = serde_json::json!({ "alg": "RS256", "typ": "JWT", "kid": kid });
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let out = super::output_with_input(
        Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&key.pem),
        input.as_bytes(),
    );
    assert!(out.status.success());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(out.stdout))
}
