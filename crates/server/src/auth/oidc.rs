//! CI identity tokens (OpenID Connect ID tokens, such as a GitHub Actions job's
//! `ACTIONS_ID_TOKEN`) as credentials: verified against their issuer's key set, then
//! mapped to rights by rules over their claims. The same rules give a token its
//! registry scopes and its Actions cache scopes, so one job has consistent rights on
//! both APIs.

use std::collections::{BTreeMap, HashMap};

use base64::Engine;
use globset::escape;
use jsonwebtoken::Header;
use regex::Regex;
use serde::{Deserialize, Serialize};

use super::RegistryScopes;
use crate::actions::token::{External, Grant, Issuer, IssuerError};

/// One rule: the claims a token must have, and the scopes it then gets. Scope
/// templates name claims (`{repository}`) and the named groups of the claim patterns
/// (`{pr}` from `ref = 'refs/pull/(?<pr>\d+)/merge'`); a value put into a repository
/// glob matches itself only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rule {
    /// The `iss` whose tokens it applies to [default: any trusted issuer].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Claim name to a regular expression its value must match whole.
    pub claims: BTreeMap<String, String>,
    /// Repository globs it may pull.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pull: Vec<String>,
    /// Repository globs it may push to (and pull).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub push: Vec<String>,
    /// Repository globs it may delete in.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub delete: Vec<String>,
    /// Actions cache scopes it may read, in lookup order (after the one it writes).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub actions_read: Vec<String>,
    /// The Actions cache scope it writes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actions_write: Option<String>,
}

/// A rule with its claim patterns compiled.
#[derive(Debug)]
struct CompiledRule {
    rule: Rule,
    claims: Vec<(String, Regex)>,
}

/// The rights a CI identity token carries.
#[derive(Debug, Clone, Default)]
pub struct Granted {
    /// Who it is: its `sub` (`repo:org/app:ref:refs/heads/main`).
    pub subject: String,
    /// Its registry rights.
    pub registry: RegistryScopes,
    /// Its Actions cache rights.
    pub actions: Grant,
    /// The claims the matching rules read, for the record.
    pub claims: BTreeMap<String, String>,
    /// When it expires (seconds since the epoch).
    pub expires: u64,
}

/// The trusted issuers of CI identity tokens and the rules over their claims.
#[derive(Default)]
pub struct Oidc {
    issuers: Vec<External>,
    rules: Vec<CompiledRule>,
}

impl Oidc {
    /// Trust `issuers` (their key sets are loaded now) with `rules`.
    pub async fn load(issuers: &[Issuer], rules: &[Rule]) -> Result<Oidc, IssuerError> {
        let mut compiled = Vec::new();
        for (index, rule) in rules.iter().enumerate() {
            let claims = rule
                .claims
                .iter()
                .map(|(name, pattern)| {
                    Regex::new(&format!("^(?:{pattern})$"))
                        .map(|re| (name.clone(), re))
                        .map_err(|e| {
                            IssuerError::new(format!("rule {}: claim {name}: {e}", index + 1))
                        })
                })
                .collect::<Result<_, _>>()?;
            compiled.push(CompiledRule {
                rule: rule.clone(),
                claims,
            });
        }
        let mut loaded = Vec::new();
        for issuer in issuers {
            // An identity token names the service it was requested for; without that check
            // one a job requested for any other service (a cloud, a vault) would push here.
            if issuer.audience.is_none() {
                return Err(IssuerError::new(format!(
                    "[[server.auth.issuers]] {}: set `audience` to the one the jobs request their \
                     identity tokens for (e.g. \"layercache\")",
                    issuer.issuer
                )));
            }
            loaded.push(External::load(issuer.clone()).await?);
        }
        Ok(Oidc {
            issuers: loaded,
            rules: compiled,
        })
    }

    /// Whether it trusts tokens from `issuer`.
    pub fn trusts(&self, issuer: Option<&str>) -> bool {
        self.issuer(issuer).is_some()
    }

    fn issuer(&self, issuer: Option<&str>) -> Option<&External> {
        let issuer = issuer?;
        self.issuers.iter().find(|e| e.issuer() == issuer)
    }

    /// The rights of `token`, once verified: the union of what every matching rule
    /// grants (nothing, when none matches).
    pub async fn grant(&self, token: &str) -> Result<Granted, String> {
        let header: Header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
        let issuer = unverified_issuer(token);
        let external = self
            .issuer(issuer.as_deref())
            .ok_or_else(|| format!("tokens of issuer {issuer:?} are not trusted"))?;
        let claims: serde_json::Map<String, serde_json::Value> =
            external.decode(token, &header).await?;
        Ok(self.apply(external.issuer(), &claims))
    }

    /// What the rules grant a verified token of `issuer` with `claims`.
    fn apply(&self, issuer: &str, claims: &serde_json::Map<String, serde_json::Value>) -> Granted {
        let text: HashMap<&str, String> = claims
            .iter()
            .filter_map(|(name, value)| {
                let value = match value {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => return None,
                };
                Some((name.as_str(), value))
            })
            .collect();
        let mut granted = Granted {
            subject: text.get("sub").cloned().unwrap_or_default(),
            expires: claims
                .get("exp")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
            actions: Grant {
                repository: text
                    .get("repository_id")
                    .or_else(|| text.get("repository"))
                    .cloned()
                    .unwrap_or_else(|| "0".into()),
                ..Grant::default()
            },
            ..Granted::default()
        };
        for compiled in &self.rules {
            let rule = &compiled.rule;
            if rule.issuer.as_deref().is_some_and(|i| i != issuer) {
                continue;
            }
            let Some(variables) = compiled.matches(&text) else {
                continue;
            };
            let registry = |templates: &[String]| -> Option<Vec<String>> {
                templates
                    .iter()
                    .map(|t| fill(t, &variables, true))
                    .collect()
            };
            let actions = |templates: &[String]| -> Option<Vec<String>> {
                templates
                    .iter()
                    .map(|t| fill(t, &variables, false))
                    .collect()
            };
            // A template naming a claim the token lacks voids the whole rule.
            let (Some(pull), Some(push), Some(delete), Some(read), Some(write)) = (
                registry(&rule.pull),
                registry(&rule.push),
                registry(&rule.delete),
                actions(&rule.actions_read),
                actions(rule.actions_write.as_slice()),
            ) else {
                tracing::debug!(subject = %granted.subject, "a rule names a claim the token lacks");
                continue;
            };
            extend_unique(&mut granted.registry.pull, pull);
            extend_unique(&mut granted.registry.push, push);
            extend_unique(&mut granted.registry.delete, delete);
            if granted.actions.write.is_none() {
                granted.actions.write = write.into_iter().next();
            }
            extend_unique(&mut granted.actions.read, read);
            for name in compiled.claims.iter().map(|(name, _)| name) {
                if let Some(value) = text.get(name.as_str()) {
                    granted.claims.insert(name.clone(), value.clone());
                }
            }
        }
        // The scope it writes is read first, as a runtime token's is.
        if let Some(write) = &granted.actions.write {
            granted.actions.read.retain(|s| s != write);
            granted.actions.read.insert(0, write.clone());
        }
        granted
    }
}

impl CompiledRule {
    /// The template variables of a token whose claims (as text) are `claims`, when it
    /// matches: every claim, and the named groups of the patterns.
    fn matches(&self, claims: &HashMap<&str, String>) -> Option<HashMap<String, String>> {
        let mut variables: HashMap<String, String> = claims
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        for (name, pattern) in &self.claims {
            let value = claims.get(name.as_str())?;
            let captures = pattern.captures(value)?;
            for group in pattern.capture_names().flatten() {
                if let Some(m) = captures.name(group) {
                    variables.insert(group.to_owned(), m.as_str().to_owned());
                }
            }
        }
        Some(variables)
    }
}

/// `template` with each `{name}` replaced by its variable (glob-escaped when `glob`);
/// `None` when one is missing or a brace is unclosed.
fn fill(template: &str, variables: &HashMap<String, String>, glob: bool) -> Option<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(rest.get(..open)?);
        let after = rest.get(open + 1..)?;
        let close = after.find('}')?;
        let value = variables.get(after.get(..close)?)?;
        if value.is_empty() {
            return None;
        }
        out.push_str(&if glob { escape(value) } else { value.clone() });
        rest = after.get(close + 1..)?;
    }
    out.push_str(rest);
    Some(out)
}

fn extend_unique(into: &mut Vec<String>, values: Vec<String>) {
    for value in values {
        if !into.contains(&value) {
            into.push(value);
        }
    }
}

/// The `iss` a JWT claims, unverified: only to pick the keys that verify it.
pub(crate) fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    #[derive(Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    serde_json::from_slice::<Iss>(&bytes).ok()?.iss
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oidc(rules: Vec<Rule>) -> Oidc {
        Oidc {
            issuers: Vec::new(),
            rules: rules
                .into_iter()
                .map(|rule| CompiledRule {
                    claims: rule
                        .claims
                        .iter()
                        .map(|(k, v)| (k.clone(), Regex::new(&format!("^(?:{v})$")).unwrap()))
                        .collect(),
                    rule,
                })
                .collect(),
        }
    }

    fn rules() -> Vec<Rule> {
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        vec![
            Rule {
                claims: [
                    ("repository".into(), "org/app".into()),
                    ("ref".into(), "refs/heads/main".into()),
                ]
                .into(),
                pull: strings(&["cache/{repository}/**"]),
                push: strings(&["cache/{repository}/**"]),
                actions_write: Some("{ref}".into()),
                ..Rule::default()
            },
            Rule {
                claims: [
                    ("repository".into(), "org/app".into()),
                    ("ref".into(), r"refs/pull/(?<pr>\d+)/merge".into()),
                ]
                .into(),
                pull: strings(&["cache/{repository}/**"]),
                push: strings(&["cache/{repository}/pr-{pr}/**"]),
                actions_read: strings(&["refs/heads/{base_ref}"]),
                actions_write: Some("{ref}".into()),
                ..Rule::default()
            },
        ]
    }

    fn claims(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn the_default_branch_and_a_pull_request_get_their_own_scopes() {
        let oidc = oidc(rules());
        let main = oidc.apply(
            "iss",
            &claims(serde_json::json!({
                "sub": "repo:org/app:ref:refs/heads/main", "repository": "org/app",
                "repository_id": "42", "ref": "refs/heads/main", "exp": 99,
            })),
        );
        assert_eq!(main.registry.push, ["cache/org/app/**"]);
        assert_eq!(main.actions.write.as_deref(), Some("refs/heads/main"));
        assert_eq!(main.actions.read, ["refs/heads/main"]);
        assert_eq!(main.actions.repository, "42");
        assert_eq!(main.expires, 99);

        let pr = oidc.apply(
            "iss",
            &claims(serde_json::json!({
                "sub": "repo:org/app:pull_request", "repository": "org/app",
                "ref": "refs/pull/7/merge", "base_ref": "main",
            })),
        );
        assert_eq!(pr.registry.pull, ["cache/org/app/**"]);
        assert_eq!(pr.registry.push, ["cache/org/app/pr-7/**"]);
        assert_eq!(pr.actions.write.as_deref(), Some("refs/pull/7/merge"));
        assert_eq!(pr.actions.read, ["refs/pull/7/merge", "refs/heads/main"]);
        assert_eq!(pr.claims.get("ref").unwrap(), "refs/pull/7/merge");
    }

    #[test]
    fn patterns_match_whole_values_and_values_cannot_widen_a_glob() {
        let oidc = oidc(rules());
        let other = oidc.apply(
            "iss",
            &claims(serde_json::json!({
                "repository": "org/app-fork", "ref": "refs/heads/main",
            })),
        );
        assert!(other.registry.is_empty());
        let sneaky = oidc.apply(
            "iss",
            &claims(serde_json::json!({
                "repository": "org/app", "ref": "refs/pull/7/merge", "base_ref": "main",
            })),
        );
        assert!(!sneaky.registry.push.iter().any(|g| g.contains("**/")));
        let mut variables = HashMap::new();
        variables.insert("repository".to_owned(), "org/*".to_owned());
        assert_eq!(
            fill("cache/{repository}/**", &variables, true).as_deref(),
            Some("cache/org/[*]/**")
        );
        assert_eq!(fill("cache/{missing}", &variables, true), None);
        assert_eq!(fill("cache/{repository", &variables, true), None);
    }

    #[test]
    fn the_issuer_is_read_from_the_payload() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(r#"{"iss":"https://ci.example","sub":"x"}"#);
        assert_eq!(
            unverified_issuer(&format!("e30.{payload}.sig")).as_deref(),
            Some("https://ci.example")
        );
        assert_eq!(unverified_issuer("garbage"), None);
    }
}
