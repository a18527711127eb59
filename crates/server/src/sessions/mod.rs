//! Build sessions: every registry request is attributed to the build that made it, and
//! each build's lookups, hits, misses and bytes are recorded, so a CI step can prove the
//! cache was used.
//!
//! A request belongs to the session its client names (the user name of its registry
//! credentials, or an `X-Layercache-Session` header); otherwise to the implicit session
//! of its client address, user agent and repository. Requests of layercache's own tools
//! belong to no session. A session closes after
//! `idle_gap` without requests. Open sessions are saved every few seconds and when they
//! close, so they survive restarts; saved sessions are pruned after `keep`.

mod record;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::http::HeaderMap;
use base64::Engine;
use store::{SessionFilter, SessionRecord, Store};

pub use record::{Counts, Outcome, Session};

/// How often open sessions are saved and idle ones closed.
const SAVE_INTERVAL: Duration = Duration::from_secs(5);
/// Most sessions one query returns.
pub const MAX_SESSIONS: usize = 1000;

/// The build-session section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// A session closes after this long without requests.
    #[serde(with = "humantime_serde")]
    pub idle_gap: Duration,
    /// Closed sessions are kept this long.
    #[serde(with = "humantime_serde")]
    pub keep: Duration,
    /// Answer registry requests without credentials (or a session header) with a Basic
    /// authentication challenge, so that `docker login -u run-1234` (any password) names
    /// every request of that build. Credentials are not checked: this names sessions,
    /// it does not protect anything.
    pub ask_credentials: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            idle_gap: Duration::from_secs(60),
            keep: Duration::from_secs(30 * 24 * 3600),
            ask_credentials: false,
        }
    }
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Client {
    /// The session it names, if any.
    pub name: Option<String>,
    /// Its address, when known.
    pub addr: Option<IpAddr>,
    /// Its `User-Agent`.
    pub user_agent: String,
}

impl Client {
    /// The client of a request with `headers`, from `addr`.
    pub fn of(headers: &HeaderMap, addr: Option<IpAddr>) -> Client {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let name = header("x-layercache-session")
            .map(str::to_owned)
            .or_else(|| header("authorization").and_then(basic_user))
            .filter(|n| !n.is_empty());
        Client {
            name,
            addr,
            user_agent: header("user-agent").unwrap_or("").to_owned(),
        }
    }

    /// Whether it is one of layercache's own tools (`explain`): what they read is no
    /// build's use of the cache.
    pub fn is_layercache(&self) -> bool {
        self.user_agent.starts_with(TOOL_AGENT_PREFIX)
    }
}

/// How the user agents of layercache's own tools begin (`layercache-explain/0.1.0`).
pub const TOOL_AGENT_PREFIX: &str = "layercache-";

/// The address a request came from, when the server records it.
pub fn remote_addr(parts: &axum::http::request::Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
}

/// The user name of `Basic` credentials.
fn basic_user(authorization: &str) -> Option<String> {
    let (scheme, encoded) = authorization.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(
        text.split_once(':')
            .map_or(text.as_str(), |(user, _)| user)
            .to_owned(),
    )
}

/// What identifies an open session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Named(String),
    Implicit {
        addr: Option<IpAddr>,
        user_agent: String,
        repo: String,
    },
}

/// The open sessions, and the saved ones through the store.
pub struct Sessions {
    live: Mutex<Live>,
    config: Config,
    store: Store,
}

/// Sessions in memory: the open ones, and those closed but not saved yet.
#[derive(Default)]
struct Live {
    open: HashMap<Key, Session>,
    closed: Vec<Session>,
}

impl Live {
    /// Every session in memory.
    fn all(&self) -> impl Iterator<Item = &Session> {
        self.open.values().chain(&self.closed)
    }
}

impl Sessions {
    /// Record sessions into `store`; starts the task that saves and closes them.
    pub fn start(store: Store, config: Config) -> Arc<Sessions> {
        let sessions = Arc::new(Sessions {
            live: Mutex::default(),
            config,
            store,
        });
        tokio::spawn(save_in_background(Arc::downgrade(&sessions)));
        sessions
    }

    /// Record one request of `client` to `repo`; returns the session's id.
    pub fn record(&self, client: &Client, repo: &str, outcome: Outcome) -> String {
        let key = match &client.name {
            Some(name) => Key::Named(name.clone()),
            None => Key::Implicit {
                addr: client.addr,
                user_agent: client.user_agent.clone(),
                repo: repo.to_owned(),
            },
        };
        let now = crate::now_ms();
        let mut live = self.lock();
        let idle = |s: &Session| now - s.ended_ms >= self.config.idle_gap.as_millis() as i64;
        if live.open.get(&key).is_some_and(idle)
            && let Some(mut ended) = live.open.remove(&key)
        {
            ended.close();
            live.closed.push(ended);
        }
        let session = live
            .open
            .entry(key)
            .or_insert_with(|| Session::new(client, now));
        session.record(repo, outcome, now);
        session.id.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a request of `client` with `headers` must first be asked for credentials
    /// (not one of layercache's own tools: they name no build).
    pub fn wants_credentials(&self, client: &Client, headers: &HeaderMap) -> bool {
        self.config.ask_credentials
            && !client.is_layercache()
            && !headers.contains_key("authorization")
            && !headers.contains_key("x-layercache-session")
    }

    /// How many sessions are open.
    pub fn open_count(&self) -> usize {
        self.lock().open.len()
    }

    /// Sessions active since `since` (seconds since the epoch), most recent first,
    /// filtered by repository and session name or id.
    pub async fn list(
        &self,
        since: i64,
        repo: Option<&str>,
        name: Option<&str>,
    ) -> store::Result<Vec<Session>> {
        let filter = SessionFilter {
            repo: repo.map(str::to_owned),
            session: name.map(str::to_owned),
        };
        let mut found: HashMap<String, Session> = HashMap::new();
        for saved in self.store.sessions(since, filter, MAX_SESSIONS).await? {
            match serde_json::from_str::<Session>(&saved.report) {
                Ok(session) => {
                    found.insert(session.id.clone(), session);
                }
                Err(e) => tracing::warn!(id = saved.id, error = %e, "unreadable saved session"),
            }
        }
        let wanted = |s: &&Session| {
            s.ended_ms / 1000 >= since
                && repo.is_none_or(|r| s.repositories.contains(r))
                && name.is_none_or(|n| s.id == n || s.name.as_deref() == Some(n))
        };
        for session in self.lock().all().filter(wanted) {
            found.insert(session.id.clone(), session.clone());
        }
        let mut sessions: Vec<Session> = found.into_values().collect();
        sessions.sort_by(|a, b| b.ended_ms.cmp(&a.ended_ms).then(b.id.cmp(&a.id)));
        sessions.truncate(MAX_SESSIONS);
        Ok(sessions)
    }

    /// Save every changed session, closing those idle for the gap (or all, at shutdown).
    /// A closed session stays in memory until it is saved, so listings never miss it.
    pub async fn save(&self, closing_all: bool) -> store::Result<()> {
        let now = crate::now_ms();
        let gap = self.config.idle_gap.as_millis() as i64;
        let due: Vec<Session> = {
            let mut live = self.lock();
            let idle: Vec<Key> = live
                .open
                .iter()
                .filter(|(_, s)| closing_all || now - s.ended_ms >= gap)
                .map(|(key, _)| key.clone())
                .collect();
            for key in idle {
                if let Some(mut session) = live.open.remove(&key) {
                    session.close();
                    live.closed.push(session);
                }
            }
            let mut due = live.closed.clone();
            for session in live.open.values_mut().filter(|s| s.unsaved) {
                session.unsaved = false;
                due.push(session.clone());
            }
            due
        };
        // Concurrently, so the metadata writer commits them in a few groups.
        let saves = due.iter().map(|session| {
            self.store.save_session(SessionRecord {
                id: session.id.clone(),
                name: session.name.clone(),
                repositories: session.repositories.iter().cloned().collect(),
                started_at: session.started_ms / 1000,
                ended_at: session.ended_ms / 1000,
                report: serde_json::to_string(session).unwrap_or_default(),
            })
        });
        let results = futures::future::join_all(saves).await;
        let mut live = self.lock();
        let mut failure = None;
        for (session, result) in due.iter().zip(results) {
            match result {
                Ok(()) if !session.open => live.closed.retain(|s| s.id != session.id),
                Ok(()) => {}
                Err(e) => {
                    // Try again at the next save.
                    if let Some(open) = live.open.values_mut().find(|s| s.id == session.id) {
                        open.unsaved = true;
                    }
                    failure = Some(e);
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

/// Save and close sessions every [`SAVE_INTERVAL`], and prune old ones, while the
/// recorder lives.
async fn save_in_background(sessions: Weak<Sessions>) {
    let mut tick = tokio::time::interval(SAVE_INTERVAL);
    loop {
        tick.tick().await;
        let Some(sessions) = sessions.upgrade() else {
            return;
        };
        if let Err(e) = sessions.save(false).await {
            tracing::warn!(error = %e, "saving build sessions failed");
        }
        let before = crate::now_ms() / 1000 - sessions.config.keep.as_secs() as i64;
        if let Err(e) = sessions.store.prune_sessions(before).await {
            tracing::warn!(error = %e, "pruning build sessions failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_named_by_header_or_by_the_credentials_user() {
        let mut headers = HeaderMap::new();
        headers.insert("user-agent", "buildkit/v0.12".parse().unwrap());
        assert_eq!(Client::of(&headers, None).name, None);
        // docker login -u run-1234 -p secret
        headers.insert(
            "authorization",
            "Basic cnVuLTEyMzQ6c2VjcmV0".parse().unwrap(),
        );
        assert_eq!(Client::of(&headers, None).name.as_deref(), Some("run-1234"));
        headers.insert("x-layercache-session", "job-7".parse().unwrap());
        assert_eq!(Client::of(&headers, None).name.as_deref(), Some("job-7"));
        headers.remove("x-layercache-session");
        headers.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(Client::of(&headers, None).name, None);
    }
}
