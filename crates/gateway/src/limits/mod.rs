//! Rate limits: `[[limits]]` rules in requests and tokens, per global / endpoint / API key /
//! user, counted in memory or in Redis (shared by replicas).
//!
//! Every rule that matches a request must admit it; the counters of all matching rules are
//! checked and taken in one step, so a request refused by one rule costs nothing in the others.
//! Token rules reserve an estimate (prompt size + `max_tokens`, or the rule's default) before
//! the upstream call and settle with the real usage after it.

mod gcra;
mod memory;
mod redis;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use sha2::{Digest, Sha256};
use switchyard_core::{ChatRequest, Secret};
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::config::{LimitRule, LimitScope, LimitsStoreConfig, OnError};
use crate::error::ApiError;
use crate::metrics::Metrics;
pub use gcra::{CellState, Gcra};

/// Where counters live. Kept across reloads (counters of unchanged rules survive).
pub enum Backend {
    Memory(memory::MemoryStore),
    Redis {
        store: Box<redis::RedisStore>,
        on_error: OnError,
        /// Where token settlements run after their response has gone out: serving waits for
        /// these tasks before it returns, so none is lost at shutdown.
        settling: TaskTracker,
    },
}

impl Backend {
    /// A store as `config` says; a Redis store settles token usage on `settling`.
    pub fn new(config: &LimitsStoreConfig, settling: &TaskTracker) -> Result<Self, String> {
        Ok(match config {
            LimitsStoreConfig::Memory => Self::Memory(memory::MemoryStore::new()),
            LimitsStoreConfig::Redis {
                url,
                password,
                on_error,
                timeout,
            } => Self::Redis {
                store: Box::new(redis::RedisStore::new(
                    url.expose(),
                    password.as_ref().map(Secret::expose),
                    *timeout,
                )?),
                on_error: *on_error,
                settling: settling.clone(),
            },
        })
    }

    async fn acquire(&self, cells: &[Cell]) -> Result<Decision, ApiError> {
        match self {
            Backend::Memory(store) => Ok(store.acquire(cells)),
            Backend::Redis {
                store, on_error, ..
            } => match store.acquire(cells).await {
                Ok(decision) => Ok(decision),
                // What Redis said is in the log (the degraded line), not for the client.
                Err(_) => match on_error {
                    OnError::Allow => Ok(Decision::Degraded),
                    OnError::Deny => Err(ApiError::limiter_unavailable(
                        "the rate limiter's store (Redis) is unavailable and \
                         limits_store.on_error = \"deny\" (the gateway's log says why)",
                    )),
                },
            },
        }
    }

    async fn adjust(&self, key: &str, gcra: Gcra, delta: i64) {
        match self {
            Backend::Memory(store) => store.adjust(key, gcra, delta),
            Backend::Redis { store, .. } => {
                if let Err(why) = store.adjust(key, gcra, delta).await {
                    warn!(error = %why, "could not settle token usage in Redis");
                }
            }
        }
    }

    /// Whether the limiter cannot reach its store right now.
    pub fn is_degraded(&self) -> bool {
        match self {
            Backend::Memory(_) => false,
            Backend::Redis { store, .. } => store.is_degraded(),
        }
    }

    /// Asks the store whether it answers now (Redis: a `PING`), so that [`Backend::is_degraded`]
    /// tells how it is, not how the last decision found it.
    pub async fn probe(&self) {
        if let Backend::Redis { store, .. } = self {
            store.probe().await;
        }
    }
}

/// One counter to take from.
pub struct Cell {
    pub key: String,
    pub gcra: Gcra,
    pub cost: u64,
}

pub enum Decision {
    Allowed(Vec<CellState>),
    Denied {
        retry_after: Duration,
        states: Vec<CellState>,
    },
    /// The store is down and the policy is to allow: no counting happened.
    Degraded,
}

/// A compiled rule.
struct Rule {
    /// `limits[<index>]`, the metrics label.
    label: String,
    rule: LimitRule,
    requests: Option<Budget>,
    tokens: Option<Budget>,
    /// Its `admitted` decisions counter, looked up once (the per-request path).
    admitted: Option<Counter>,
}

/// One of a rule's two budgets, requests or tokens.
struct Budget {
    gcra: Gcra,
    /// Identifies its counters across reloads: a hash of what it counts and its limit, so that
    /// a counter whose definition is unchanged keeps counting across a reload (even when the
    /// rule's other budget, its `default_max_tokens` or its position changed) and a changed one
    /// starts afresh.
    id: String,
}

/// The rules of one config generation, over a backend that outlives it.
pub struct Limits {
    rules: Vec<Rule>,
    backend: Arc<Backend>,
    metrics: Option<Arc<Metrics>>,
}

/// Who is asking, for scoping counters.
pub struct Caller<'a> {
    pub endpoint: &'a str,
    pub api_key: Option<&'a str>,
    pub user: Option<&'a str>,
}

/// An admitted request: its rate-limit headers, and the token reservations to settle.
#[derive(Default)]
pub struct Admission {
    headers: Vec<(HeaderName, HeaderValue)>,
    reservations: Vec<(String, Gcra, u64)>,
    backend: Option<Arc<Backend>>,
}

impl Limits {
    pub fn new(
        rules: &[LimitRule],
        backend: Arc<Backend>,
        metrics: impl Into<Option<Arc<Metrics>>>,
    ) -> Self {
        let metrics: Option<Arc<Metrics>> = metrics.into();
        // Two rules may define the same budget (a copy, or one that differs in the other
        // budget only): each keeps its own counters, told apart by their order.
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut budget = |definition: String, gcra: Gcra| {
            let copies = seen.entry(definition.clone()).or_default();
            *copies += 1;
            let id = short_hash(&format!("{definition} #{copies}"));
            Budget { gcra, id }
        };
        let rules = rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                let label = format!("limits[{index}]");
                let (scope, endpoints) = (&rule.scope, &rule.endpoints);
                Rule {
                    admitted: metrics
                        .as_ref()
                        .map(|m| m.ratelimit_counter(&label, "admitted")),
                    label,
                    requests: rule.requests.map(|r| {
                        budget(
                            format!("requests {r:?} by {scope:?} on {endpoints:?}"),
                            Gcra::new(r.count, r.period, r.burst),
                        )
                    }),
                    tokens: rule.tokens_per_minute.map(|t| {
                        budget(
                            format!("tokens {t} per minute by {scope:?} on {endpoints:?}"),
                            Gcra::new(t, Duration::from_secs(60), 0),
                        )
                    }),
                    rule: rule.clone(),
                }
            })
            .collect();
        Self {
            rules,
            backend,
            metrics,
        }
    }

    /// Whether the limiter cannot use its store right now (Redis down, or refusing us), asked
    /// of the store itself (see [`Backend::probe`]).
    pub async fn probe_degraded(&self) -> bool {
        self.backend.probe().await;
        self.backend.is_degraded()
    }

    /// Takes from every matching rule's counters, or refuses with 429 (or 503 when Redis is down
    /// and `on_error = "deny"`).
    pub async fn admit(
        &self,
        caller: &Caller<'_>,
        request: Option<&ChatRequest>,
    ) -> Result<Admission, ApiError> {
        let mut cells = Vec::new();
        let mut kinds = Vec::new();
        let mut owners: Vec<&Rule> = Vec::new();
        let mut matching: Vec<&Rule> = Vec::new();
        for rule in self
            .rules
            .iter()
            .filter(|r| applies(&r.rule, caller.endpoint))
        {
            // Only chat requests spend tokens: a model's prediction is not held back by a
            // token budget (one a long answer overdrew, say).
            let tokens = rule.tokens.as_ref().zip(request);
            if rule.requests.is_none() && tokens.is_none() {
                continue;
            }
            matching.push(rule);
            let scope = scope_key(&rule.rule.scope, caller);
            if let Some(budget) = &rule.requests {
                cells.push(Cell {
                    key: cell_key(&budget.id, &scope),
                    gcra: budget.gcra,
                    cost: 1,
                });
                kinds.push(Kind::Requests);
                owners.push(rule);
            }
            if let Some((budget, request)) = tokens {
                cells.push(Cell {
                    key: cell_key(&budget.id, &scope),
                    gcra: budget.gcra,
                    cost: estimate_tokens(request, rule.rule.default_max_tokens),
                });
                kinds.push(Kind::Tokens);
                owners.push(rule);
            }
        }
        if cells.is_empty() {
            return Ok(Admission::default());
        }
        let decision = self.backend.acquire(&cells).await;
        if let Some(metrics) = &self.metrics {
            self.count(metrics, &matching, &owners, &decision);
        }
        match decision? {
            Decision::Allowed(states) => Ok(Admission {
                headers: headers_for(&kinds, &states),
                reservations: cells
                    .into_iter()
                    .zip(&kinds)
                    .filter(|(_, kind)| **kind == Kind::Tokens)
                    // What was really charged: a cost above the capacity is charged as the
                    // capacity, and settles from there.
                    .map(|(cell, _)| (cell.key, cell.gcra, cell.gcra.admissible(cell.cost)))
                    .collect(),
                backend: Some(self.backend.clone()),
            }),
            Decision::Degraded => Ok(Admission::default()),
            Decision::Denied {
                retry_after,
                states,
            } => {
                // The counters that refused say which budgets ran out (the wait is the
                // longest of theirs).
                let mut refused: Vec<String> = states
                    .iter()
                    .enumerate()
                    .filter(|(_, state)| state.refused)
                    .map(|(i, _)| owners[i].describe(kinds[i]))
                    .collect();
                refused.dedup();
                let refused = match refused.is_empty() {
                    true => String::new(),
                    false => format!(" ({})", refused.join("; ")),
                };
                let mut error = ApiError::rate_limited(
                    format!(
                        "Rate limit reached for endpoint '{}'{refused}; retry after {:.1} s",
                        caller.endpoint,
                        retry_after.as_secs_f64()
                    ),
                    retry_after,
                );
                error.headers = Some(Box::new(headers_for(&kinds, &states)));
                Err(error)
            }
        }
    }
}

impl Limits {
    /// Rate-limit metrics: every matching rule counts an admitted request; on a refusal only
    /// the rules whose counters refused count it, so the binding rule shows.
    fn count(
        &self,
        metrics: &Metrics,
        matching: &[&Rule],
        owners: &[&Rule],
        decision: &Result<Decision, ApiError>,
    ) {
        match decision {
            Ok(Decision::Allowed(_)) => {
                // Rules have their counter whenever there are metrics.
                for counter in matching.iter().filter_map(|rule| rule.admitted.as_ref()) {
                    counter.inc();
                }
            }
            Ok(Decision::Denied { states, .. }) => {
                let mut refusing: Vec<&str> = owners
                    .iter()
                    .zip(states)
                    .filter(|(_, state)| state.refused)
                    .map(|(owner, _)| owner.label.as_str())
                    .collect();
                refusing.dedup();
                for label in refusing {
                    metrics.ratelimit(label, "refused");
                }
            }
            Ok(Decision::Degraded) | Err(_) => {
                metrics.limiter_error();
                for rule in matching {
                    metrics.ratelimit(&rule.label, "degraded");
                }
            }
        }
    }
}

impl Admission {
    /// The `x-ratelimit-*` headers, for the one response they go to (a second call gets none).
    pub fn take_headers(&mut self) -> Vec<(HeaderName, HeaderValue)> {
        std::mem::take(&mut self.headers)
    }

    /// Settles the token reservations: replaces the estimate with what was spent.
    /// In memory this happens at once; with Redis it runs in the background.
    pub fn settle(self, spent: Spent) {
        let Some(backend) = self.backend else {
            return;
        };
        let deltas: Vec<(String, Gcra, i64)> = self
            .reservations
            .into_iter()
            .map(|(key, gcra, reserved)| {
                let reserved = i64::try_from(reserved).unwrap_or(i64::MAX);
                // The usage is the upstream's word: however much it says (a broken server's
                // 2^64), one answer costs at most a full counter, so it blocks its rule for at
                // most one period.
                let charged =
                    |used: u64| i64::try_from(used.min(gcra.capacity)).unwrap_or(i64::MAX);
                let delta = match spent {
                    Spent::Exactly(used) => charged(used) - reserved,
                    Spent::AtLeast(used) => (charged(used) - reserved).max(0),
                };
                (key, gcra, delta)
            })
            .filter(|(_, _, delta)| *delta != 0)
            .collect();
        match &*backend {
            Backend::Memory(store) => {
                for (key, gcra, delta) in deltas {
                    store.adjust(&key, gcra, delta);
                }
            }
            Backend::Redis { settling, .. } if !deltas.is_empty() => {
                let backend = backend.clone();
                settling.spawn(async move {
                    for (key, gcra, delta) in deltas {
                        backend.adjust(&key, gcra, delta).await;
                    }
                });
            }
            Backend::Redis { .. } => {}
        }
    }
}

/// The tokens a request spent, for settling its reservations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spent {
    /// Known: the upstream reported it, or nothing was generated (`Exactly(0)`).
    Exactly(u64),
    /// Unknown, at least this much (an answer that broke off, a timeout: the upstream may
    /// have generated, and billed, up to the estimate): the estimate stands unless this is more.
    AtLeast(u64),
}

impl Spent {
    /// What a request spent: the usage its answer `reported` (`None`: no usage, as from a
    /// stream that broke off) or what its chain's calls reported, whichever is more. Exactly
    /// that, unless it is unknown, or a call failed after the upstream may have generated
    /// tokens (`maybe_generated`: a timeout, an answer that broke off, billed all the same):
    /// then the estimate stands if it is more. A failed request reports `Some(0)`: the tokens
    /// nothing was generated for go back.
    pub fn of(reported: Option<u64>, used_by_chain: u64, maybe_generated: bool) -> Self {
        match reported {
            Some(reported) if !maybe_generated => Self::Exactly(reported.max(used_by_chain)),
            reported => Self::AtLeast(reported.unwrap_or(0).max(used_by_chain)),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Requests,
    Tokens,
}

fn applies(rule: &LimitRule, endpoint: &str) -> bool {
    rule.endpoints
        .as_ref()
        .is_none_or(|only| only.iter().any(|e| e == endpoint))
}

impl Rule {
    /// The rule as a client may read it: `limits[1]: requests per API key and user`.
    fn describe(&self, kind: Kind) -> String {
        let what = match kind {
            Kind::Requests => "requests",
            Kind::Tokens => "tokens",
        };
        let per: Vec<&str> = self
            .rule
            .scope
            .iter()
            .filter_map(|scope| match scope {
                LimitScope::Global => None,
                LimitScope::Endpoint => Some("endpoint"),
                LimitScope::ApiKey => Some("API key"),
                LimitScope::User => Some("user"),
            })
            .collect();
        if per.is_empty() {
            format!("{}: {what} in total", self.label)
        } else {
            format!("{}: {what} per {}", self.label, per.join(" and "))
        }
    }
}

fn scope_key(scope: &[LimitScope], caller: &Caller<'_>) -> String {
    let mut key = String::with_capacity(64);
    for (i, s) in scope.iter().enumerate() {
        if i > 0 {
            key.push(',');
        }
        match s {
            LimitScope::Global => key.push_str("global"),
            LimitScope::Endpoint => key.extend(["e=", caller.endpoint]),
            LimitScope::ApiKey => key.extend(["k=", caller.api_key.unwrap_or("-")]),
            // User values come from clients: hash them so keys stay short and printable. The
            // requests without a user share one counter, `u=-`, which no hash can be.
            LimitScope::User => match caller.user {
                Some(user) => key.extend(["u=", &short_hash(user)]),
                None => key.push_str("u=-"),
            },
        }
    }
    key
}

/// A counter's key: `<budget id>:<scope key>`.
fn cell_key(budget_id: &str, scope: &str) -> String {
    [budget_id, ":", scope].concat()
}

fn short_hash(text: &str) -> String {
    switchyard_core::code_hash::hex(&Sha256::digest(text.as_bytes())[..8])
}

/// Prompt tokens (about four characters a token) plus the completion budget of each of the `n`
/// choices asked for: the larger of `max_tokens` and `max_completion_tokens` (a server may
/// honour either), or the rule's default.
fn estimate_tokens(request: &ChatRequest, default_max_tokens: u64) -> u64 {
    let characters: usize = request.messages.iter().map(|m| m.text().len()).sum();
    let prompt = (characters as u64).div_ceil(4);
    let completion = match (request.max_completion_tokens, request.max_tokens) {
        (None, None) => default_max_tokens,
        (a, b) => a.max(b).unwrap_or_default(),
    };
    // These come from the client: never let them overflow.
    prompt.saturating_add(completion.saturating_mul(request.choices_asked()))
}

/// The `x-ratelimit-*` headers of the tightest request counter and the tightest token counter.
fn headers_for(kinds: &[Kind], states: &[CellState]) -> Vec<(HeaderName, HeaderValue)> {
    // Constants: `HeaderName::from_static` checks its text each time it runs outside of one.
    const NAMES: [(Kind, [HeaderName; 3]); 2] = [
        (
            Kind::Requests,
            [
                HeaderName::from_static("x-ratelimit-limit-requests"),
                HeaderName::from_static("x-ratelimit-remaining-requests"),
                HeaderName::from_static("x-ratelimit-reset-requests"),
            ],
        ),
        (
            Kind::Tokens,
            [
                HeaderName::from_static("x-ratelimit-limit-tokens"),
                HeaderName::from_static("x-ratelimit-remaining-tokens"),
                HeaderName::from_static("x-ratelimit-reset-tokens"),
            ],
        ),
    ];
    let number = HeaderValue::from;
    let mut headers = Vec::with_capacity(6);
    for (kind, [limit, remaining, reset]) in NAMES {
        let tightest = kinds
            .iter()
            .zip(states)
            .filter(|(k, _)| **k == kind)
            .map(|(_, s)| s)
            .min_by_key(|s| s.remaining);
        if let Some(state) = tightest {
            headers.extend([
                (limit, number(state.capacity)),
                (remaining, number(state.remaining)),
            ]);
            // From the `String` itself: its buffer becomes the header value's.
            if let Ok(value) = HeaderValue::try_from(format_reset(state.reset)) {
                headers.push((reset, value));
            }
        }
    }
    headers
}

/// OpenAI's reset format: `20ms`, `1.5s`, `6m0s`.
fn format_reset(reset: Duration) -> String {
    let ms = reset.as_millis();
    if ms < 1000 {
        // The common case (a limit far from its end), written without `core::fmt`.
        let mut text = String::with_capacity(5);
        text.push_str(itoa::Buffer::new().format(ms));
        text.push_str("ms");
        text
    } else if ms < 60_000 {
        let text = format!("{:.3}", reset.as_secs_f64());
        format!("{}s", text.trim_end_matches('0').trim_end_matches('.'))
    } else {
        // Whole seconds, rounded up: a client waiting this long finds the budget back.
        let secs = ms.div_ceil(1000);
        format!("{}m{}s", secs / 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateConfig;
    use switchyard_core::Message;

    fn rule(scope: Vec<LimitScope>, per_minute: u64, burst: u64) -> LimitRule {
        LimitRule {
            scope,
            endpoints: None,
            requests: Some(RateConfig {
                count: per_minute,
                period: Duration::from_secs(60),
                burst,
            }),
            tokens_per_minute: None,
            default_max_tokens: 100,
        }
    }

    fn memory_limits(rules: &[LimitRule]) -> Limits {
        let backend = Backend::new(&LimitsStoreConfig::Memory, &TaskTracker::new()).unwrap();
        Limits::new(rules, Arc::new(backend), None)
    }

    fn request() -> ChatRequest {
        ChatRequest::new("e", vec![Message::user("12345678")])
    }

    fn caller<'a>(key: &'a str, user: &'a str) -> Caller<'a> {
        Caller {
            endpoint: "e",
            api_key: Some(key),
            user: Some(user),
        }
    }

    #[tokio::test]
    async fn admits_limit_plus_burst_per_key_then_refuses_with_retry_after() {
        let limits = memory_limits(&[rule(vec![LimitScope::ApiKey], 3, 2)]);
        for i in 0..5 {
            let admission = limits
                .admit(&caller("a", "u"), Some(&request()))
                .await
                .unwrap();
            assert_eq!(remaining(&admission, "requests"), 4 - i);
        }
        let refused = limits
            .admit(&caller("a", "u"), Some(&request()))
            .await
            .err()
            .unwrap();
        assert_eq!(refused.status, 429);
        let wait = refused.retry_after.unwrap();
        assert!(
            wait > Duration::from_secs(19) && wait <= Duration::from_secs(20),
            "one request every 20 s: {wait:?}"
        );
        // Another key has its own budget.
        assert!(
            limits
                .admit(&caller("b", "u"), Some(&request()))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_refusal_by_one_rule_costs_nothing_in_the_others() {
        let rules = [
            rule(vec![LimitScope::Global], 100, 0),
            rule(vec![LimitScope::User], 1, 0),
        ];
        let limits = memory_limits(&rules);
        limits
            .admit(&caller("a", "ann"), Some(&request()))
            .await
            .unwrap();
        for _ in 0..5 {
            assert!(
                limits
                    .admit(&caller("a", "ann"), Some(&request()))
                    .await
                    .is_err()
            );
        }
        let bob = limits
            .admit(&caller("a", "bob"), Some(&request()))
            .await
            .unwrap();
        assert_eq!(
            remaining(&bob, "requests"),
            0,
            "the tightest counter (bob's own) is reported"
        );
    }

    #[tokio::test]
    async fn a_refusal_names_every_rule_that_refused() {
        let rules = [
            rule(vec![LimitScope::ApiKey], 1, 0),
            rule(vec![LimitScope::Global], 100, 0),
            rule(vec![LimitScope::User], 1, 0),
        ];
        let limits = memory_limits(&rules);
        limits
            .admit(&caller("a", "ann"), Some(&request()))
            .await
            .unwrap();
        let refused = limits
            .admit(&caller("a", "ann"), Some(&request()))
            .await
            .err()
            .unwrap();
        assert!(
            refused.message.starts_with(
                "Rate limit reached for endpoint 'e' (limits[0]: requests per API key; \
                 limits[2]: requests per user); retry after"
            ),
            "{}",
            refused.message
        );
    }

    fn token_limits(tokens_per_minute: u64, default_max_tokens: u64) -> Limits {
        let token_rule = LimitRule {
            scope: vec![LimitScope::Global],
            endpoints: None,
            requests: None,
            tokens_per_minute: Some(tokens_per_minute),
            default_max_tokens,
        };
        memory_limits(&[token_rule])
    }

    fn remaining_tokens(admission: &Admission) -> u64 {
        remaining(admission, "tokens")
    }

    /// The `x-ratelimit-remaining-{unit}` header of an admission.
    fn remaining(admission: &Admission, unit: &str) -> u64 {
        let name = format!("x-ratelimit-remaining-{unit}");
        admission
            .headers
            .iter()
            .find(|(n, _)| n == name.as_str())
            .unwrap()
            .1
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn token_rules_reserve_an_estimate_and_settle_with_what_was_spent() {
        let limits = token_limits(1000, 400);
        let (caller, request) = (caller("a", "u"), request());
        let admit = || limits.admit(&caller, Some(&request));
        // 8 characters = 2 prompt tokens + 400 completion = 402 reserved.
        let first = admit().await.unwrap();
        assert_eq!(remaining_tokens(&first), 598);
        // The call used 12 tokens: 390 go back.
        first.settle(Spent::Exactly(12));
        let second = admit().await.unwrap();
        // 598 + 390 - 402 = 586, give or take what refilled meanwhile.
        let remaining = remaining_tokens(&second);
        assert!((586..=590).contains(&remaining), "{remaining}");
        // Unknown but at least 12 (a call that timed out): the estimate stands.
        second.settle(Spent::AtLeast(12));
        let third = admit().await.unwrap();
        let remaining = remaining_tokens(&third);
        assert!((184..=190).contains(&remaining), "586 - 402: {remaining}");
        // At least 500, more than the 402 reserved: 98 more are charged.
        third.settle(Spent::AtLeast(500));
        let refused = admit().await.map(|_| ()).unwrap_err();
        assert_eq!(refused.status.as_u16(), 429);
    }

    #[test]
    fn the_estimate_reserves_the_larger_completion_budget_for_every_choice() {
        let mut request = request(); // 8 characters: 2 prompt tokens
        assert_eq!(estimate_tokens(&request, 400), 402);
        request.max_completion_tokens = Some(1);
        request.max_tokens = Some(100);
        request.extra.insert("n".to_owned(), serde_json::json!(3));
        assert_eq!(estimate_tokens(&request, 400), 2 + 100 * 3);
        request.max_tokens = Some(u64::MAX);
        assert_eq!(estimate_tokens(&request, 400), u64::MAX);
    }

    #[tokio::test]
    async fn an_upstreams_absurd_usage_blocks_a_token_rule_for_one_period_at_most() {
        let limits = token_limits(1000, 400);
        let (caller, request) = (caller("a", "u"), request());
        let first = limits.admit(&caller, Some(&request)).await.unwrap();
        first.settle(Spent::Exactly(u64::MAX));
        let refused = limits
            .admit(&caller, Some(&request))
            .await
            .map(|_| ())
            .unwrap_err();
        let wait = refused.retry_after.unwrap();
        // Charged a full counter (1000 tokens = 60 s of refill), less the 1000 a full counter
        // holds, plus this request's 402: 24.1 s (2^64 tokens would be 35 trillion years).
        assert!(
            (Duration::from_secs(24)..=Duration::from_secs(25)).contains(&wait),
            "{wait:?}"
        );
    }

    #[tokio::test]
    async fn a_token_budget_overdrawn_by_a_long_answer_holds_back_chat_but_not_predictions() {
        let limits = token_limits(100, 50);
        let chat = limits
            .admit(&caller("a", "u"), Some(&request()))
            .await
            .unwrap();
        assert_eq!(remaining_tokens(&chat), 48);
        chat.settle(Spent::Exactly(500));
        let refused = limits
            .admit(&caller("a", "u"), Some(&request()))
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(refused.status.as_u16(), 429);
        // A model's prediction spends no tokens: the token rule does not apply to it.
        let prediction = limits.admit(&caller("a", "u"), None).await.unwrap();
        assert!(prediction.headers.is_empty());
        assert!(prediction.reservations.is_empty());
    }

    #[tokio::test]
    async fn a_budget_keeps_its_counters_while_its_own_definition_stays_the_same() {
        let backend =
            Arc::new(Backend::new(&LimitsStoreConfig::Memory, &TaskTracker::new()).unwrap());
        // Each `Limits` is a config generation over the one backend, as a reload makes.
        let admitted = |rules: Vec<LimitRule>, count: usize| {
            let limits = Limits::new(&rules, backend.clone(), None);
            async move {
                let mut admitted = 0;
                for _ in 0..count {
                    if limits
                        .admit(&caller("a", "u"), Some(&request()))
                        .await
                        .is_ok()
                    {
                        admitted += 1;
                    }
                }
                admitted
            }
        };
        let two = rule(vec![LimitScope::Global], 2, 0);
        assert_eq!(admitted(vec![two.clone()], 3).await, 2);
        // A token budget added to the rule, and a rule before it: the request counter stays.
        let mut with_tokens = two.clone();
        with_tokens.tokens_per_minute = Some(100_000);
        let other = rule(vec![LimitScope::User], 100, 0);
        assert_eq!(admitted(vec![other, with_tokens], 1).await, 0);
        // Its limit changed: a new counter.
        assert_eq!(
            admitted(vec![rule(vec![LimitScope::Global], 3, 0)], 4).await,
            3
        );
        // Two rules alike keep a counter each: every request takes one from both.
        let five = rule(vec![LimitScope::Global], 5, 0);
        assert_eq!(admitted(vec![five.clone(), five], 6).await, 5);
    }

    #[test]
    fn what_a_request_spent_is_exact_only_when_known() {
        assert_eq!(Spent::of(Some(12), 0, false), Spent::Exactly(12));
        // A chain whose calls reported more than its answer: the calls count.
        assert_eq!(Spent::of(Some(12), 40, false), Spent::Exactly(40));
        // A failure (`Some(0)`): what the chain's calls used, or nothing.
        assert_eq!(Spent::of(Some(0), 0, false), Spent::Exactly(0));
        // No usage, or a call that may have generated unreported tokens: at least.
        assert_eq!(Spent::of(None, 7, false), Spent::AtLeast(7));
        assert_eq!(Spent::of(Some(12), 0, true), Spent::AtLeast(12));
        assert_eq!(Spent::of(Some(0), 5, true), Spent::AtLeast(5));
    }

    #[test]
    fn formats_reset_like_openai() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(2)), "2s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        // Rounded up, never early.
        assert_eq!(format_reset(Duration::from_millis(69_990)), "1m10s");
        assert_eq!(format_reset(Duration::from_millis(119_001)), "2m0s");
    }
}
