//! The HTTP client providers send upstream requests with: for a plain-HTTP upstream its own pool
//! of HTTP/1 connections (`http1.rs`), for HTTPS hyper-util's pooled client, one per thread, and
//! reqwest for upstreams the environment sends through a proxy.
//!
//! **Why not reqwest for everything.** reqwest wraps hyper-util's client in a redirect layer and
//! a retry layer and turns every URL into a URI and back (`url` and `idna` parse it twice per
//! request). A profile at full load put that wrapping at ~10 % of the gateway's CPU, more than
//! hyper's own client. The gateway needs none of it: it sends one POST to a fixed URL and must
//! not follow redirects (a 301/302 would turn a POST into a GET). So requests go straight to
//! hyper-util's client, TLS by rustls with the platform's verifier (as reqwest does), HTTP/2 by
//! ALPN. reqwest stays for one case: when `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` (minus
//! `NO_PROXY`) name a proxy for an upstream, requests to it go through reqwest, which speaks to
//! proxies (CONNECT tunnels, proxy credentials); redirects are not followed there either.
//!
//! **Why per thread.** A client keeps a pool of upstream connections, and each connection is
//! driven by a task on the runtime that opened it. With one client shared by every thread, a
//! request handled on one thread often goes out on a connection whose task lives on another:
//! two cross-thread wake-ups per call. The gateway runs one single-threaded runtime per core, so
//! a client per thread keeps a request, its upstream connection and that connection's task on
//! one thread, like a per-core event loop. The price: each thread opens its own upstream
//! connections (and TLS sessions).
//!
//! Only the event-loop threads send requests, and they live as long as the gateway. (A thread
//! that exits leaves its client to the next new thread; if the runtime behind its pooled
//! connections is gone by then, the pool drops them at checkout and connects anew.)

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_platform_verifier::ConfigVerifierExt;
use switchyard_core::{LlmError, LlmErrorKind};
use thread_local::ThreadLocal;

use crate::http1::Http1Pool;

pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A response body from either client.
pub type UpstreamBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

type Direct = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How requests to one upstream URL are sent.
#[derive(Debug, Clone)]
pub enum Path {
    /// A plain-HTTP upstream: on the upstream's own pool of HTTP/1 connections (`http1.rs`).
    Plain(Arc<Http1Pool>),
    /// HTTPS: on this thread's hyper-util client.
    Direct,
    /// Through the proxy the environment names for it (reqwest).
    Proxy,
}

/// Why the HTTP client cannot be set up (TLS configuration).
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the upstream HTTP client: {0}")]
pub struct HttpClientError(String);

/// Upstream clients built with the same settings, one per thread that asks for one.
pub struct HttpClient {
    tls: Arc<rustls::ClientConfig>,
    direct: ThreadLocal<Direct>,
    proxied: ThreadLocal<reqwest::Client>,
    /// The environment's proxy settings, read once.
    proxies: Matcher,
    /// Set when spans are exported: calls are traced, and carry their span's context.
    trace_headers: OnceLock<TraceHeaders>,
}

/// Writes the trace context of a call's span into its request headers (W3C `traceparent`):
/// given by the gateway, which owns the OpenTelemetry setup.
pub type TraceHeaders = fn(&tracing::Span, &mut http::HeaderMap);

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient").finish_non_exhaustive()
    }
}

impl HttpClient {
    /// Sets up TLS and reads the proxy environment variables, so a failure shows at start-up.
    pub fn new() -> Result<Self, HttpClientError> {
        let tls = rustls::ClientConfig::with_platform_verifier()
            .map_err(|e| HttpClientError(e.to_string()))?;
        let clients = Self {
            tls: Arc::new(tls),
            direct: ThreadLocal::new(),
            proxied: ThreadLocal::new(),
            proxies: Matcher::from_env(),
            trace_headers: OnceLock::new(),
        };
        clients.proxied()?;
        Ok(clients)
    }

    /// Traces every call from now on: each gets a client span, whose context `trace_headers`
    /// sends to the upstream. (Set once, when the gateway starts exporting spans.)
    pub fn trace_calls(&self, trace_headers: TraceHeaders) {
        let _ = self.trace_headers.set(trace_headers);
    }

    /// How a call's trace context gets into its headers, if calls are traced.
    pub(crate) fn trace_headers(&self) -> Option<TraceHeaders> {
        self.trace_headers.get().copied()
    }

    /// How requests to `url` go: through a proxy if the environment names one for it, else on
    /// a pool of its own for a plain-HTTP URL (each call of this makes a new one).
    pub fn path_to(&self, url: &http::Uri) -> Path {
        if self.proxies.intercept(url).is_some() {
            return Path::Proxy;
        }
        if url.scheme() == Some(&http::uri::Scheme::HTTP)
            && let Some(pool) = Http1Pool::new(url)
        {
            return Path::Plain(Arc::new(pool));
        }
        Path::Direct
    }

    /// Sends `request` on this thread's client and returns the response once its head has
    /// arrived; `path` is what [`HttpClient::path_to`] said for its URL. Redirects are not
    /// followed. Errors name the failure, never the headers (which carry the provider key).
    pub async fn send(
        &self,
        path: &Path,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<UpstreamBody>, LlmError> {
        match path {
            Path::Plain(pool) => return pool.send(request).await,
            Path::Proxy => return self.send_proxied(request).await,
            Path::Direct => {}
        }
        let response = self
            .direct()
            .request(request.map(Full::new))
            .await
            .map_err(|error| {
                let kind = if error.is_connect() {
                    LlmErrorKind::Connect
                } else {
                    LlmErrorKind::StreamInterrupted
                };
                transport_error(kind, &error)
            })?;
        Ok(response.map(|body| body.map_err(Into::into).boxed_unsync()))
    }

    async fn send_proxied(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<UpstreamBody>, LlmError> {
        let client = self
            .proxied()
            .map_err(|e| LlmError::new(LlmErrorKind::Connect, e.to_string()))?;
        let request = reqwest::Request::try_from(request.map(reqwest::Body::from))
            .map_err(|e| transport_error(LlmErrorKind::BadRequest, &e))?;
        let response = client.execute(request).await.map_err(|error| {
            let kind = if error.is_timeout() {
                LlmErrorKind::Timeout
            } else if error.is_connect() {
                LlmErrorKind::Connect
            } else {
                LlmErrorKind::StreamInterrupted
            };
            // reqwest names the upstream's URL, not the proxy it could not get through.
            let mut error = transport_error(kind, &error);
            error.message = format!(
                "{} (sent through the proxy that HTTPS_PROXY/HTTP_PROXY/ALL_PROXY name)",
                error.message
            );
            error
        })?;
        let response: http::Response<reqwest::Body> = response.into();
        Ok(response.map(|body| body.map_err(Into::into).boxed_unsync()))
    }

    /// This thread's direct client.
    fn direct(&self) -> &Direct {
        self.direct.get_or(|| self.build_direct())
    }

    fn build_direct(&self) -> Direct {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config((*self.tls).clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector)
    }

    fn proxied(&self) -> Result<&reqwest::Client, HttpClientError> {
        self.proxied.get_or_try(|| {
            reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .tcp_nodelay(true)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| HttpClientError(switchyard_core::error_chain(&e)))
        })
    }
}

pub(crate) fn transport_error(
    kind: LlmErrorKind,
    error: &(dyn std::error::Error + 'static),
) -> LlmError {
    LlmError::new(kind, switchyard_core::error_chain(error))
}

/// The whole body of a response, if it holds at most `limit` bytes (else an `InvalidResponse`
/// error, once the body has passed the limit: the rest is not read).
pub async fn read_body(body: UpstreamBody, limit: usize) -> Result<Bytes, LlmError> {
    let over = || {
        LlmError::new(
            LlmErrorKind::InvalidResponse,
            format!("its answer is over {limit} bytes"),
        )
    };
    // A declared length (`Content-Length`) is all hyper reads: within the limit, the body needs
    // no counting as it comes (what `Limited` costs per frame), and over it, no reading at all.
    let declared = body.size_hint();
    if declared.lower() > limit as u64 {
        return Err(over());
    }
    if declared.upper().is_some_and(|upper| upper <= limit as u64) {
        return match body.collect().await {
            Ok(body) => Ok(body.to_bytes()),
            Err(error) => Err(transport_error(
                LlmErrorKind::StreamInterrupted,
                error.as_ref(),
            )),
        };
    }
    // Boxed, so that the future does not name `Limited`'s generic error conversion (which trips
    // rustc's `Send` check of the providers' async-trait futures).
    let body = http_body_util::Limited::new(body, limit).boxed_unsync();
    match body.collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(over()),
        Err(error) => Err(transport_error(
            LlmErrorKind::StreamInterrupted,
            error.as_ref(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_gets_its_own_client_and_keeps_it() {
        let clients = HttpClient::new().expect("client");
        let here = |c: &HttpClient| format!("{:p}", c.direct());
        let first = here(&clients);
        assert_eq!(first, here(&clients));
        let other = std::thread::scope(|s| s.spawn(|| here(&clients)).join().expect("thread"));
        assert_ne!(first, other);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_an_invalid_response() {
        // With its length declared up front (`Full`, like a `Content-Length`), and without
        // (a stream of frames, like chunked encoding).
        let declared = || {
            Full::new(Bytes::from(vec![b'x'; 100]))
                .map_err(|never| match never {})
                .boxed_unsync()
        };
        let undeclared = || {
            let frames = (0..10).map(|_| Ok(hyper::body::Frame::data(Bytes::from(vec![b'x'; 10]))));
            http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
        };
        assert_eq!(undeclared().size_hint().upper(), None);
        for body in [declared, undeclared] {
            assert_eq!(read_body(body(), 100).await.unwrap().len(), 100);
            let error = read_body(body(), 99).await.unwrap_err();
            assert_eq!(error.kind, LlmErrorKind::InvalidResponse);
            assert_eq!(error.message, "its answer is over 99 bytes");
        }
    }
}
