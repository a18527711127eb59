//! Static users: a name, a password hash (bcrypt, as `htpasswd -B` writes, or argon2 in
//! its PHC string form) and the repositories they may use.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::PasswordVerifier;
use serde::{Deserialize, Serialize};

use super::RegistryScopes;

/// Failed password logins one client address may make in a [`LOGIN_WINDOW`].
pub(crate) const MAX_FAILED_LOGINS: u32 = 10;
/// The window failed logins are counted in.
pub(crate) const LOGIN_WINDOW: Duration = Duration::from_secs(60);

/// One `[[server.auth.users]]` entry: `name` and `password` (a hash), or one
/// `htpasswd` line holding both.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct User {
    /// The user name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The password's bcrypt (`$2y$…`) or argon2 (`$argon2id$…`) hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A line from `htpasswd -B`: `name:$2y$…`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub htpasswd: Option<String>,
    /// Repository globs it may pull.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pull: Vec<String>,
    /// Repository globs it may push to (and pull).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub push: Vec<String>,
    /// Repository globs it may delete in.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub delete: Vec<String>,
    /// It may read layercache's own API, `/metrics` and `/ui`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub view: bool,
    /// It may also administer (eviction passes, the audit log).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}

/// The kinds of password hash a user may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Bcrypt,
    Argon2,
}

/// A user ready to check passwords against.
#[derive(Debug, Clone)]
pub(crate) struct Account {
    pub(crate) name: String,
    hash: String,
    scheme: Scheme,
    pub(crate) scopes: RegistryScopes,
}

impl User {
    /// Its name and hash, checked to be a hash layercache can verify.
    pub(crate) fn account(&self) -> Result<Account, String> {
        let (name, hash) = match (&self.name, &self.password, &self.htpasswd) {
            (Some(name), Some(hash), None) => (name.clone(), hash.clone()),
            (None, None, Some(line)) => {
                let (name, hash) = line
                    .trim()
                    .split_once(':')
                    .ok_or("an htpasswd line is NAME:HASH")?;
                (name.to_owned(), hash.to_owned())
            }
            _ => return Err("a user has `name` and `password` (a hash), or `htpasswd`".into()),
        };
        let scheme = if ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) {
            hash.parse::<bcrypt::HashParts>()
                .map_err(|e| format!("user {name}: bad bcrypt hash: {e}"))?;
            Scheme::Bcrypt
        } else if hash.starts_with("$argon2") {
            argon2::PasswordHash::new(&hash)
                .map_err(|e| format!("user {name}: bad argon2 hash: {e}"))?;
            Scheme::Argon2
        } else {
            return Err(format!(
                "user {name}: the password must be a bcrypt hash (`htpasswd -nB {name}`) or an \
                 argon2 one; other htpasswd formats (MD5, SHA-1, crypt) are too weak"
            ));
        };
        let scopes = RegistryScopes {
            pull: self.pull.clone(),
            push: self.push.clone(),
            delete: self.delete.clone(),
            view: self.view,
            admin: self.admin,
        };
        scopes.check().map_err(|e| format!("user {name}: {e}"))?;
        Ok(Account {
            name,
            hash,
            scheme,
            scopes,
        })
    }
}

impl Account {
    /// Whether `password` is its password (slow on purpose: run it off the runtime).
    pub(crate) fn verify(&self, password: &str) -> bool {
        match self.scheme {
            Scheme::Bcrypt => bcrypt::verify(password, &self.hash).unwrap_or(false),
            Scheme::Argon2 => argon2::PasswordHash::new(&self.hash).is_ok_and(|hash| {
                argon2::Argon2::default()
                    .verify_password(password.as_bytes(), &hash)
                    .is_ok()
            }),
        }
    }
}

/// Failed password logins per client address, counted in windows of [`LOGIN_WINDOW`]:
/// past [`MAX_FAILED_LOGINS`] in one, that address's passwords are not checked until the
/// window ends, so guessing goes at ten passwords a minute and costs the server as many
/// hashes.
#[derive(Default)]
pub(crate) struct FailedLogins {
    /// When each address's window started, and its failures in it.
    windows: Mutex<HashMap<Option<IpAddr>, (Instant, u32)>>,
}

impl FailedLogins {
    /// How long `client` must wait before a password of its is checked, if it must.
    pub(crate) fn wait(&self, client: Option<IpAddr>) -> Option<Duration> {
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let (started, failures) = windows.get(&client)?;
        let left = LOGIN_WINDOW.checked_sub(started.elapsed())?;
        (*failures >= MAX_FAILED_LOGINS).then_some(left)
    }

    /// Count a failed login of `client`.
    pub(crate) fn count(&self, client: Option<IpAddr>) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= 10_000 {
            windows.retain(|_, (started, _)| started.elapsed() < LOGIN_WINDOW);
        }
        let window = windows.entry(client).or_insert((Instant::now(), 0));
        if window.0.elapsed() >= LOGIN_WINDOW {
            *window = (Instant::now(), 0);
        }
        window.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcrypt_htpasswd_lines_and_argon2_hashes_verify() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let user = User {
            htpasswd: Some(format!("ci:{hash}\n")),
            push: vec!["cache/**".into()],
            ..User::default()
        };
        let account = user.account().unwrap();
        assert_eq!(account.name, "ci");
        assert!(account.verify("s3cret"));
        assert!(!account.verify("s3cret "));

        use argon2::PasswordHasher;
        let phc: argon2::PasswordHash = argon2::Argon2::default()
            .hash_password_with_salt(b"pw", b"0123456789abcdef")
            .unwrap();
        let phc = phc.to_string();
        let user = User {
            name: Some("bot".into()),
            password: Some(phc),
            ..User::default()
        };
        let account = user.account().unwrap();
        assert!(account.verify("pw"));
        assert!(!account.verify("pW"));
    }

    #[test]
    fn an_address_past_its_failed_logins_waits_out_the_window() {
        let failed = FailedLogins::default();
        let (guesser, other) = (Some([10, 0, 0, 1].into()), Some([10, 0, 0, 2].into()));
        for _ in 0..MAX_FAILED_LOGINS {
            assert_eq!(failed.wait(guesser), None);
            failed.count(guesser);
        }
        let wait = failed.wait(guesser).unwrap();
        assert!(wait > LOGIN_WINDOW - Duration::from_secs(5) && wait <= LOGIN_WINDOW);
        assert_eq!(failed.wait(other), None);
        // Once the window is over, the count starts again.
        let started = Instant::now() - LOGIN_WINDOW;
        failed
            .windows
            .lock()
            .unwrap()
            .insert(guesser, (started, MAX_FAILED_LOGINS));
        assert_eq!(failed.wait(guesser), None);
        failed.count(guesser);
        assert_eq!(failed.windows.lock().unwrap()[&guesser].1, 1);
    }

    #[test]
    fn weak_or_malformed_hashes_are_refused() {
        for hash in [
            "$apr1$abc$def",
            "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
            "plain",
            "$2y$05$short",
        ] {
            let user = User {
                name: Some("u".into()),
                password: Some(hash.into()),
                ..User::default()
            };
            assert!(user.account().is_err(), "{hash}");
        }
        let both = User {
            name: Some("u".into()),
            htpasswd: Some("u:$2y$05$x".into()),
            ..User::default()
        };
        assert!(both.account().is_err());
    }
}
