//! Prometheus metrics (prometheus-client: one registry per gateway, no global state).
//!
//! Label values are bounded: endpoint, route, provider, chain, step and rule names come from the
//! config and the compiled chains, never from request contents or keys. A request for an
//! endpoint that does not exist is counted under `endpoint=""`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use switchyard_core::{AttemptOutcome, Observer};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    kind: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamErrorLabels {
    endpoint: String,
    kind: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    route: String,
    provider: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    endpoint: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    chain: String,
    step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointInfoLabels {
    endpoint: String,
    kind: &'static str,
    model: String,
    version: String,
    code_sha256: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 17,
    ))
}

fn overhead_histogram() -> Histogram {
    // 10 µs .. ~80 ms: what a gateway adds is small.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00001, 2.0, 14,
    ))
}

/// Handles to the series of one endpoint, looked up in their families once and then kept.
/// `Family::get_or_create` allocates its labels and hashes them with SipHash on every call,
/// which was 5 % of the instructions of a proxied request. A handle is set when its series is
/// first used, so /metrics shows the same series as without the cache.
#[derive(Default)]
struct EndpointSeries {
    /// By status class: 2xx, 4xx, 5xx, other.
    requests: [OnceLock<Counter>; 4],
    duration: OnceLock<Histogram>,
    overhead: OnceLock<Histogram>,
    /// Prompt, completion.
    tokens: OnceLock<[Counter; 2]>,
}

/// Handles to the series of one route and provider (see [`EndpointSeries`]).
#[derive(Default)]
struct RouteSeries {
    /// By [`AttemptOutcome`]: ok, retry, fallback, timeout, error, cancelled, overloaded.
    attempts: [OnceLock<Counter>; 7],
    duration: OnceLock<Histogram>,
    first_token: OnceLock<Histogram>,
}

/// Series handles by a name and a qualifier (endpoint and kind, route and provider). Names
/// come from the config, so the map stays small; a fast hash is enough.
struct Handles<T> {
    by_name: RwLock<HashMap<String, Qualified<T>, foldhash::fast::RandomState>>,
}

/// The series of one name, by qualifier.
type Qualified<T> = Vec<(String, Arc<T>)>;

impl<T> Default for Handles<T> {
    fn default() -> Self {
        Self {
            by_name: RwLock::default(),
        }
    }
}

impl<T: Default> Handles<T> {
    fn get(&self, name: &str, qualifier: &str) -> Arc<T> {
        let find = |list: &Qualified<T>| {
            list.iter()
                .find(|(q, _)| q == qualifier)
                .map(|(_, series)| series.clone())
        };
        let map = self.by_name.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = map.get(name).and_then(find) {
            return series;
        }
        drop(map);
        let mut map = self.by_name.write().unwrap_or_else(PoisonError::into_inner);
        let list = map.entry(name.to_owned()).or_default();
        find(list).unwrap_or_else(|| {
            let series = Arc::new(T::default());
            list.push((qualifier.to_owned(), series.clone()));
            series
        })
    }
}

/// Every metric of a gateway.
pub struct Metrics {
    endpoint_series: Handles<EndpointSeries>,
    route_series: Handles<RouteSeries>,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    overhead: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    stream_errors: Family<StreamErrorLabels, Counter>,
    upstream_attempts: Family<AttemptLabels, Counter>,
    upstream_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    first_token: Family<RouteLabels, Histogram, fn() -> Histogram>,
    tokens: Family<TokenLabels, Counter>,
    ratelimit: Family<RuleLabels, Counter>,
    limiter_errors: Counter,
    in_flight: Family<ProviderLabels, Gauge>,
    queue_wait: Family<ProviderLabels, Histogram, fn() -> Histogram>,
    endpoint_info: Family<EndpointInfoLabels, Gauge>,
    step_duration: Family<StepLabels, Histogram, fn() -> Histogram>,
    step_errors: Family<StepLabels, Counter>,
    connections_open: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let latency = latency_histogram as fn() -> Histogram;
        let overhead_constructor = overhead_histogram as fn() -> Histogram;
        let metrics = Self {
            endpoint_series: Handles::default(),
            route_series: Handles::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency),
            overhead: Family::new_with_constructor(overhead_constructor),
            stream_errors: Family::default(),
            upstream_attempts: Family::default(),
            upstream_duration: Family::new_with_constructor(latency),
            first_token: Family::new_with_constructor(latency),
            tokens: Family::default(),
            ratelimit: Family::default(),
            limiter_errors: Counter::default(),
            in_flight: Family::default(),
            queue_wait: Family::new_with_constructor(latency),
            endpoint_info: Family::default(),
            step_duration: Family::new_with_constructor(latency),
            step_errors: Family::default(),
            connections_open: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "switchyard_requests",
            "Requests (chat and model) by endpoint, kind and status class",
            metrics.requests.clone(),
        );
        registry.register(
            "switchyard_request_duration_seconds",
            "Request duration (for streams: until the last chunk)",
            metrics.request_duration.clone(),
        );
        registry.register(
            "switchyard_gateway_overhead_seconds",
            "Time a request spent in the gateway itself: until the response started, minus the time waiting on upstreams",
            metrics.overhead.clone(),
        );
        registry.register(
            "switchyard_stream_errors",
            "Streams that ended with an error event after their 200 (reason: timeout, upstream_error), by endpoint and kind",
            metrics.stream_errors.clone(),
        );
        registry.register(
            "switchyard_upstream_attempts",
            "Upstream attempts by route, provider and outcome (ok, retry, fallback, timeout, error, cancelled, overloaded)",
            metrics.upstream_attempts.clone(),
        );
        registry.register(
            "switchyard_upstream_duration_seconds",
            "Upstream attempt duration (for streams: until the first chunk)",
            metrics.upstream_duration.clone(),
        );
        registry.register(
            "switchyard_upstream_time_to_first_token_seconds",
            "Time to the first chunk of streamed upstream calls",
            metrics.first_token.clone(),
        );
        registry.register(
            "switchyard_tokens",
            "Tokens by endpoint and direction (prompt, completion)",
            metrics.tokens.clone(),
        );
        registry.register(
            "switchyard_ratelimit_decisions",
            "Rate-limit decisions by rule and outcome (admitted, refused, degraded)",
            metrics.ratelimit.clone(),
        );
        registry.register(
            "switchyard_ratelimit_backend_errors",
            "Rate-limit decisions the store (Redis) did not make: it failed, or was out of reach and skipped; on_error applied",
            metrics.limiter_errors.clone(),
        );
        registry.register(
            "switchyard_provider_in_flight",
            "Calls in flight to providers with a concurrency cap",
            metrics.in_flight.clone(),
        );
        registry.register(
            "switchyard_provider_queue_wait_seconds",
            "Time calls waited for a slot under a provider's concurrency cap",
            metrics.queue_wait.clone(),
        );
        registry.register(
            "switchyard_endpoint_info",
            "Loaded endpoints: 1 per endpoint, with its model version and code hash",
            metrics.endpoint_info.clone(),
        );
        registry.register(
            "switchyard_chain_step_duration_seconds",
            "Chain step duration by chain and step (streamed steps: until the first chunk)",
            metrics.step_duration.clone(),
        );
        registry.register(
            "switchyard_chain_step_errors",
            "Chain step failures by chain and step",
            metrics.step_errors.clone(),
        );
        registry.register(
            "switchyard_connections_open",
            "Client connections open (at most [server] max_connections)",
            metrics.connections_open.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The gauge of open client connections, for the connection slots to keep.
    pub fn connections_open(&self) -> Gauge {
        self.connections_open.clone()
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }

    /// A stream that broke off after its response had started (the request counts as a 2xx).
    pub fn stream_error(&self, endpoint: &str, kind: &'static str, reason: &'static str) {
        self.stream_errors
            .get_or_create(&StreamErrorLabels {
                endpoint: endpoint.to_owned(),
                kind,
                reason,
            })
            .inc();
    }

    pub fn request(&self, endpoint: &str, kind: &'static str, status: u16, duration: Duration) {
        let (class, status) = match status {
            200..=299 => (0, "2xx"),
            400..=499 => (1, "4xx"),
            500..=599 => (2, "5xx"),
            _ => (3, "other"),
        };
        let series = self.endpoint_series.get(endpoint, kind);
        series.requests[class]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&RequestLabels {
                        endpoint: endpoint.to_owned(),
                        kind,
                        status,
                    })
                    .clone()
            })
            .inc();
        series
            .duration
            .get_or_init(|| {
                self.request_duration
                    .get_or_create(&EndpointLabels {
                        endpoint: endpoint.to_owned(),
                        kind,
                    })
                    .clone()
            })
            .observe(duration.as_secs_f64());
    }

    pub fn overhead(&self, endpoint: &str, kind: &'static str, overhead: Duration) {
        self.endpoint_series
            .get(endpoint, kind)
            .overhead
            .get_or_init(|| {
                self.overhead
                    .get_or_create(&EndpointLabels {
                        endpoint: endpoint.to_owned(),
                        kind,
                    })
                    .clone()
            })
            .observe(overhead.as_secs_f64());
    }

    /// Tokens of a request; `kind` is the endpoint's, as in [`Metrics::request`] (the token
    /// series themselves are by endpoint only).
    pub fn tokens(&self, endpoint: &str, kind: &'static str, prompt: u64, completion: u64) {
        let series = self.endpoint_series.get(endpoint, kind);
        let counters = series.tokens.get_or_init(|| {
            ["prompt", "completion"].map(|direction| {
                self.tokens
                    .get_or_create(&TokenLabels {
                        endpoint: endpoint.to_owned(),
                        direction,
                    })
                    .clone()
            })
        });
        counters[0].inc_by(prompt);
        counters[1].inc_by(completion);
    }

    pub fn ratelimit(&self, rule: &str, outcome: &'static str) {
        self.ratelimit_counter(rule, outcome).inc();
    }

    /// The counter of one rule and outcome, to keep and increment without a lookup.
    pub fn ratelimit_counter(&self, rule: &str, outcome: &'static str) -> Counter {
        self.ratelimit
            .get_or_create(&RuleLabels {
                rule: rule.to_owned(),
                outcome,
            })
            .clone()
    }

    fn route_histogram(
        family: &Family<RouteLabels, Histogram, fn() -> Histogram>,
        route: &str,
        provider: &str,
    ) -> Histogram {
        family
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
                provider: provider.to_owned(),
            })
            .clone()
    }

    pub fn limiter_error(&self) {
        self.limiter_errors.inc();
    }

    /// Replaces the endpoint info series with the endpoints of a new config generation (as
    /// `GET /admin/endpoints` describes them).
    pub fn set_endpoints(&self, endpoints: &[serde_json::Value]) {
        self.endpoint_info.clear();
        let text = |info: &serde_json::Value, key: &str| match &info[key] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        };
        for info in endpoints {
            self.endpoint_info
                .get_or_create(&EndpointInfoLabels {
                    endpoint: text(info, "name"),
                    kind: match info["kind"].as_str() {
                        Some("chain") => "chain",
                        Some("model") => "model",
                        _ => "route",
                    },
                    model: text(info, "resolved"),
                    version: text(info, "version"),
                    code_sha256: text(info, "code_sha256"),
                })
                .set(1);
        }
    }
}

impl Observer for Metrics {
    fn upstream_attempt(
        &self,
        route: &str,
        provider: &str,
        outcome: AttemptOutcome,
        duration: Duration,
    ) {
        let series = self.route_series.get(route, provider);
        let index = match outcome {
            AttemptOutcome::Ok => 0,
            AttemptOutcome::Retry => 1,
            AttemptOutcome::Fallback => 2,
            AttemptOutcome::Timeout => 3,
            AttemptOutcome::Error => 4,
            AttemptOutcome::Cancelled => 5,
            AttemptOutcome::Overloaded => 6,
        };
        series.attempts[index]
            .get_or_init(|| {
                self.upstream_attempts
                    .get_or_create(&AttemptLabels {
                        route: route.to_owned(),
                        provider: provider.to_owned(),
                        outcome: outcome.as_str(),
                    })
                    .clone()
            })
            .inc();
        series
            .duration
            .get_or_init(|| Self::route_histogram(&self.upstream_duration, route, provider))
            .observe(duration.as_secs_f64());
    }

    fn first_token(&self, route: &str, provider: &str, duration: Duration) {
        self.route_series
            .get(route, provider)
            .first_token
            .get_or_init(|| Self::route_histogram(&self.first_token, route, provider))
            .observe(duration.as_secs_f64());
    }

    fn provider_in_flight(&self, provider: &str, in_flight: usize) {
        self.in_flight
            .get_or_create(&ProviderLabels {
                provider: provider.to_owned(),
            })
            .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
    }

    fn provider_queue_wait(&self, provider: &str, wait: Duration) {
        self.queue_wait
            .get_or_create(&ProviderLabels {
                provider: provider.to_owned(),
            })
            .observe(wait.as_secs_f64());
    }

    fn chain_step(&self, chain: &str, step: &str, duration: Duration, ok: bool) {
        let labels = StepLabels {
            chain: chain.to_owned(),
            step: step.to_owned(),
        };
        self.step_duration
            .get_or_create(&labels)
            .observe(duration.as_secs_f64());
        if !ok {
            self.step_errors.get_or_create(&labels).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_one_per_name_and_qualifier() {
        let handles = Handles::<EndpointSeries>::default();
        let chat_route = handles.get("chat", "route");
        assert!(Arc::ptr_eq(&chat_route, &handles.get("chat", "route")));
        let others = [
            handles.get("chat", "chain"),
            handles.get("support", "route"),
            // Not a concatenation: "chatr" + "oute" is another pair.
            handles.get("chatr", "oute"),
        ];
        for (i, series) in others.iter().enumerate() {
            assert!(!Arc::ptr_eq(&chat_route, series), "{i}");
            for other in &others[i + 1..] {
                assert!(!Arc::ptr_eq(series, other));
            }
        }
    }
}
