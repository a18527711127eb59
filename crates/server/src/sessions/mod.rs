//! Build sessions: every registry request is attributed to the build that made it, and
//! each build's lookups, hits, misses and bytes are recorded, so a CI step can prove the
//! cache was used.
//!
//! A request belongs to the session its client names (the user name of its registry
//! credentials, or an `X-Layercache-Session` header); otherwise to the implicit session
//! of its client address (for the Actions cache, of its address and scope), whatever
//! tool sent it, so a build's pull and the push that follows it belong together. An
//! implicit session that has written something ends where a new build starts: at a
//! lookup that turns out to be a new cache import (see [`Boundary`]). Requests of
//! layercache's own tools belong to no session. A session closes after `idle_gap`
//! without requests. Open sessions are saved every few seconds and when they close, so
//! they survive restarts; saved sessions are pruned after `keep`.

mod record;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::http::HeaderMap;
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
    /// The `Host` it addressed: how it reaches this server.
    pub host: Option<String>,
}

impl Client {
    /// The client of a request with `headers`, from `addr`.
    pub fn of(headers: &HeaderMap, addr: Option<IpAddr>) -> Client {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let name = header("x-layercache-session")
            .map(str::to_owned)
            .or_else(|| {
                header("authorization")
                    .and_then(crate::auth::basic)
                    .map(|(user, _)| user)
            })
            .filter(|n| !n.is_empty());
        Client {
            name,
            addr,
            user_agent: header("user-agent").unwrap_or("").to_owned(),
            host: header("host").map(str::to_owned),
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

/// How the repository of an Actions cache request begins (`actions:<scope>`).
pub const ACTIONS_AREA: &str = "actions:";

/// Follow the boundary of an implicit session at a request to `repo` with `outcome`:
/// returns the next build's session (with the requests since the boundary) when the
/// request confirms one.
fn next_build(
    open: &mut Open,
    client: &Client,
    repo: &str,
    outcome: &Outcome,
    now: i64,
) -> Option<Session> {
    if open.boundary.is_none()
        && open.session.counts.writes() > 0
        && let Outcome::ManifestLookup {
            reference,
            by_tag,
            head,
            ..
        } = outcome
        && (*by_tag || !*head)
    {
        let boundary = open.boundary.insert(Boundary {
            before: open.session.clone(),
            tag: reference.clone(),
            repo: repo.to_owned(),
            pending: Vec::new(),
        });
        // A manifest fetched at once is an import: a new build, with nothing to replay.
        let fetched = matches!(
            outcome,
            Outcome::ManifestLookup {
                head: false,
                found: true,
                ..
            }
        );
        if !fetched {
            boundary
                .pending
                .push((repo.to_owned(), outcome.clone(), now));
            return None;
        }
    }
    let boundary = open.boundary.as_mut()?;
    if boundary.confirmed_by(repo, outcome) {
        let boundary = open.boundary.take()?;
        let started = boundary.pending.first().map_or(now, |p| p.2);
        let mut next = Session::new(client, started);
        for (repo, outcome, at) in boundary.pending {
            next.record(&repo, outcome, at);
        }
        open.session = boundary.before;
        return Some(next);
    }
    if boundary.dropped_by(outcome) || boundary.pending.len() >= MAX_PENDING {
        open.boundary = None;
    } else {
        boundary
            .pending
            .push((repo.to_owned(), outcome.clone(), now));
    }
    None
}

/// The address a request came from, when the server records it.
pub fn remote_addr(extensions: &axum::http::Extensions) -> Option<IpAddr> {
    extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
}

/// What identifies an open session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Named(String),
    /// Unnamed: one client address, on the registry or in one Actions cache scope.
    Implicit {
        addr: Option<IpAddr>,
        area: String,
    },
}

/// Most requests held while a boundary between two builds is unconfirmed.
const MAX_PENDING: usize = 1000;

/// A tag lookup made after an implicit session wrote something: a push checking its own
/// tag, or the first request of the next build. It is confirmed as the next build's
/// start by a request no push makes (a manifest fetched, a blob downloaded, the same tag
/// looked up again, a write to another repository), and dropped when the tag is pushed.
struct Boundary {
    /// The session as it was before the lookup.
    before: Session,
    /// The tag looked up (`repo:tag`) and its repository.
    tag: String,
    repo: String,
    /// The requests since, with their times, to replay into the next build's session.
    pending: Vec<(String, Outcome, i64)>,
}

impl Boundary {
    /// Whether a request to `repo` with `outcome`, after the lookup, shows a new build.
    fn confirmed_by(&self, repo: &str, outcome: &Outcome) -> bool {
        match outcome {
            Outcome::ManifestLookup {
                head: false,
                found: true,
                ..
            }
            | Outcome::BlobServed { .. } => true,
            Outcome::ManifestLookup { reference, .. } => *reference == self.tag,
            Outcome::BlobWritten { .. }
            | Outcome::BlobMounted { .. }
            | Outcome::ManifestWritten { .. } => repo != self.repo,
            _ => false,
        }
    }

    /// Whether `outcome` pushes the tag: the lookup was the push's check.
    fn dropped_by(&self, outcome: &Outcome) -> bool {
        matches!(outcome, Outcome::ManifestWritten { tag: Some(t) } if *t == self.tag)
    }
}

/// An open session, with the boundary it may end at.
struct Open {
    session: Session,
    boundary: Option<Boundary>,
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
    open: HashMap<Key, Open>,
    closed: Vec<Session>,
}

impl Live {
    /// Every session in memory.
    fn all(&self) -> impl Iterator<Item = &Session> {
        self.open.values().map(|o| &o.session).chain(&self.closed)
    }

    /// Close the open session of `key`.
    fn close(&mut self, key: &Key) {
        if let Some(mut ended) = self.open.remove(key) {
            ended.session.close();
            self.closed.push(ended.session);
        }
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
                area: if repo.starts_with(ACTIONS_AREA) {
                    repo.to_owned()
                } else {
                    String::new()
                },
            },
        };
        let now = crate::now_ms();
        let mut live = self.lock();
        let idle = |o: &Open| now - o.session.ended_ms >= self.config.idle_gap.as_millis() as i64;
        if live.open.get(&key).is_some_and(idle) {
            live.close(&key);
        }
        let open = live.open.entry(key.clone()).or_insert_with(|| Open {
            session: Session::new(client, now),
            boundary: None,
        });
        let ended = match key {
            Key::Implicit { .. } => next_build(open, client, repo, &outcome, now)
                .map(|next| std::mem::replace(&mut open.session, next)),
            Key::Named(_) => None,
        };
        open.session.record(repo, outcome, now);
        open.session.note_agent(&client.user_agent);
        let id = open.session.id.clone();
        if let Some(mut ended) = ended {
            ended.close();
            live.closed.push(ended);
        }
        id
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
                .filter(|(_, o)| closing_all || now - o.session.ended_ms >= gap)
                .map(|(key, _)| key.clone())
                .collect();
            for key in idle {
                live.close(&key);
            }
            let mut due = live.closed.clone();
            let open = live.open.values_mut().map(|o| &mut o.session);
            for session in open.filter(|s| s.unsaved) {
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
                    let open = live.open.values_mut().map(|o| &mut o.session);
                    if let Some(open) = open.into_iter().find(|s| s.id == session.id) {
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

    fn miss(reference: &str) -> Outcome {
        Outcome::ManifestLookup {
            filled: false,
            reference: reference.to_owned(),
            by_tag: true,
            head: true,
            found: false,
            records: None,
        }
    }

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

    fn lookup(reference: &str, head: bool) -> Outcome {
        Outcome::ManifestLookup {
            filled: false,
            reference: reference.to_owned(),
            by_tag: !reference.contains('@'),
            head,
            found: true,
            records: Some(oci::CacheRecords::Inline),
        }
    }

    fn pushed(repo: &str, tag: &str) -> Vec<(&'static str, String, Outcome)> {
        let digest = format!("sha256:{repo}");
        vec![
            (
                "docker/20.10",
                repo.to_owned(),
                Outcome::BlobWritten {
                    digest: digest.clone(),
                    bytes: 5,
                },
            ),
            (
                "docker/20.10",
                repo.to_owned(),
                Outcome::ManifestWritten {
                    tag: Some(format!("{repo}:{tag}")),
                },
            ),
        ]
    }

    /// The implicit sessions of one client address after `requests`, oldest first.
    async fn sessions_after(requests: Vec<(&str, String, Outcome)>) -> Vec<Session> {
        let (store, _dir) = crate::temporary_store().await;
        let sessions = Sessions::start(store, Config::default());
        for (user_agent, repo, outcome) in requests {
            let client = Client {
                name: None,
                addr: Some([10, 0, 0, 7].into()),
                user_agent: user_agent.to_owned(),
                host: None,
            };
            sessions.record(&client, &repo, outcome);
        }
        let mut all = sessions.list(0, None, None).await.unwrap();
        all.reverse();
        all
    }

    #[tokio::test]
    async fn one_docker_build_is_one_session_and_the_next_build_another() {
        let import = |tag: &str| {
            vec![
                ("containerd/1.6", "app".to_owned(), lookup(tag, true)),
                (
                    "containerd/1.6",
                    "app".into(),
                    lookup("app@sha256:1", false),
                ),
            ]
        };
        // Build 1 imports app:v1 and docker pushes app:v2; build 2 imports app:v2.
        let mut requests = import("app:v1");
        requests.extend(pushed("app", "v2"));
        requests.extend(import("app:v2"));
        requests.extend(pushed("app", "v3"));
        let all = sessions_after(requests).await;
        assert_eq!(all.len(), 2, "{all:#?}");
        for session in &all {
            assert_eq!(
                (
                    session.counts.cache_imports,
                    session.counts.manifests_written
                ),
                (1, 1)
            );
            assert_eq!(session.user_agents.len(), 2);
        }
        let second = all.iter().find(|s| s.tags.contains("app:v3")).unwrap();
        assert!(second.tags.contains("app:v2") && !second.tags.contains("app:v1"));
        assert_eq!(all.iter().filter(|s| s.open).count(), 1);
    }

    #[tokio::test]
    async fn a_push_checking_its_tags_stays_in_its_build() {
        // BuildKit pushes its image (checking the tag first), then exports its cache.
        let buildkit = "buildkit/v0.12";
        let mut requests = vec![(buildkit, "cache".to_owned(), lookup("cache:main", true))];
        requests.push((buildkit, "cache".into(), lookup("cache@sha256:1", false)));
        for (repo, tag) in [("app", "v1"), ("cache", "main")] {
            requests.push((
                buildkit,
                repo.into(),
                lookup(&format!("{repo}:{tag}"), true),
            ));
            for (_, repo, outcome) in pushed(repo, tag) {
                requests.push((buildkit, repo, outcome));
            }
        }
        let all = sessions_after(requests.clone()).await;
        assert_eq!(all.len(), 1, "{all:#?}");
        assert_eq!(all[0].counts.push_probes, 2);
        // The same build again, cold (nothing to import): its failed import of
        // cache:main is confirmed as a new build by its push to another repository.
        let mut cold = requests;
        cold.push((buildkit, "cache".into(), miss("cache:other")));
        cold.push((buildkit, "app".into(), lookup("app:v2", true)));
        for (_, repo, outcome) in pushed("app", "v2") {
            cold.push((buildkit, repo, outcome));
        }
        let all = sessions_after(cold).await;
        assert_eq!(all.len(), 2, "{all:#?}");
        let second = all.iter().find(|s| !s.missed.is_empty()).unwrap();
        assert_eq!(second.missed, ["cache:other"]);
        assert_eq!(second.counts.manifests_written, 1);
    }
}
