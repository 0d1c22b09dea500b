//! Calls to a plain-HTTP upstream (`http://`, sent directly): the gateway's own pool of HTTP/1
//! connections over hyper's `client::conn::http1`, one pool per upstream, its idle connections
//! kept per thread.
//!
//! **Why not hyper-util's client**, as for HTTPS upstreams. Per request its pool finds the
//! upstream's connections three times in a SipHash map keyed by scheme and authority (~3.6 k
//! instructions, the authority hashed byte by byte), and, once the response head is in, spawns
//! a task that waits for the connection to be ready for another request before putting it back.
//! Here the pool belongs to the upstream (nothing to look up), and a connection goes back when
//! its response body is dropped, from the request's own task (a task waits only for a connection
//! hyper is not done with yet).
//!
//! **What it keeps of hyper-util's.** Connecting is hyper-util's `HttpConnector` (DNS, an
//! IPv6/IPv4 fallback after 300 ms, [`CONNECT_TIMEOUT`], `TCP_NODELAY`). A request that a reused
//! connection could not send (the upstream closed it while it was idle) goes out again on
//! another, then on a new one; connections idle for [`IDLE_TIMEOUT`] are not reused. Only a
//! connection hyper says is ready for another request is reused: one whose body was dropped
//! before its end is closed by hyper unless the rest had already arrived (a client that left a
//! stream, a deadline; a stream's last bytes after `[DONE]` are read in the background for that
//! reason: `upstream::finish_in_background`), and one still busy with its last exchange when
//! its body is dropped (an upstream that answered before reading all of a large request) goes
//! back only once hyper has finished it, within [`READY_WITHIN`].
//!
//! **Per thread**, like the clients in `http.rs`: each connection is driven by a task on the
//! runtime of the thread that opened it, and requests on that thread take it again, so a call
//! never wakes another thread. Idle connections are dropped when they expire or when the pool
//! is full, as they come up; a pool that gets no more calls keeps its idle connections open
//! until the upstream closes them.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use switchyard_core::{LlmError, LlmErrorKind};
use thread_local::ThreadLocal;
use tower_service::Service as _;

use crate::http::{
    CONNECT_TIMEOUT, POOL_IDLE_TIMEOUT as IDLE_TIMEOUT, UpstreamBody, transport_error,
};

/// Idle connections kept per thread; more are opened under load and closed when they come back.
const MAX_IDLE: usize = 256;

/// How long a connection whose body is gone may take to finish its exchange (read the rest of
/// the answer, write the rest of the request) before it is closed instead of reused.
const READY_WITHIN: Duration = Duration::from_secs(1);

/// The connections to one plain-HTTP upstream.
pub struct Http1Pool {
    /// The upstream's URL, which the connector connects to.
    url: http::Uri,
    connector: HttpConnector,
    /// The request target sent on the request line (`/v1/chat/completions`): origin form, as a
    /// server expects it from a client that is not a proxy.
    target: http::Uri,
    /// Connections whose last response body is gone, per thread, the most recent last.
    idle: ThreadLocal<RefCell<VecDeque<Idle>>>,
}

struct Idle {
    sender: SendRequest<Full<Bytes>>,
    since: Instant,
}

impl std::fmt::Debug for Http1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Pool")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Http1Pool {
    /// A pool for calls to `url`, an `http://` URL with a host.
    pub fn new(url: &http::Uri) -> Option<Self> {
        url.host()?;
        let target = url
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .ok()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        Some(Self {
            url: url.clone(),
            connector,
            target,
            idle: ThreadLocal::new(),
        })
    }

    /// Sends `request` (its URI is replaced by the upstream's target; it must carry `Host`) and
    /// returns the response once its head has arrived.
    pub async fn send(
        self: &Arc<Self>,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<UpstreamBody>, LlmError> {
        let mut request = request.map(Full::new);
        *request.uri_mut() = self.target.clone();
        loop {
            let (mut sender, reused) = match self.take_idle() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let pool = Arc::clone(self);
                    return Ok(response.map(|body| {
                        ReturnsConnection {
                            body,
                            connection: Some((sender, pool)),
                        }
                        .map_err(Into::into)
                        .boxed_unsync()
                    }));
                }
                Err(mut error) => {
                    let kind = match error.take_message() {
                        // Not sent: the connection had closed (the upstream ends idle ones).
                        Some(unsent) if reused => {
                            request = unsent;
                            continue;
                        }
                        // Not sent either, on a new connection: the upstream saw nothing.
                        Some(_) => LlmErrorKind::Connect,
                        None => LlmErrorKind::StreamInterrupted,
                    };
                    return Err(transport_error(kind, &error.into_error()));
                }
            }
        }
    }

    /// How many idle connections this thread has.
    #[cfg(test)]
    pub(crate) fn idle_here(&self) -> usize {
        self.idle.get_or_default().borrow().len()
    }

    /// This thread's most recently used idle connection that is still ready and fresh.
    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.get_or_default().borrow_mut();
        while let Some(Idle { sender, since }) = idle.pop_back() {
            if sender.is_ready() && since.elapsed() < IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        None
    }

    /// Puts a connection back whose last response body is gone, for this thread's next call:
    /// at once if hyper is ready to send another request on it, else once it is (a task on this
    /// thread's runtime waits for it, [`READY_WITHIN`] at most).
    fn put_back(self: Arc<Self>, mut sender: SendRequest<Full<Bytes>>) {
        if sender.is_ready() {
            self.keep(sender);
        } else if !sender.is_closed()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if let Ok(Ok(())) = tokio::time::timeout(READY_WITHIN, sender.ready()).await {
                    self.keep(sender);
                }
            });
        }
    }

    fn keep(&self, sender: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.get_or_default().borrow_mut();
        let now = Instant::now();
        // The oldest are at the front: drop those that expired, and one if the pool is full.
        while idle
            .front()
            .is_some_and(|oldest| now.duration_since(oldest.since) >= IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() >= MAX_IDLE {
            idle.pop_front();
        }
        idle.push_back(Idle { sender, since: now });
    }

    /// A new connection, its task spawned on this thread's runtime, ready for a request.
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, LlmError> {
        let stream = self
            .connector
            .clone()
            .call(self.url.clone())
            .await
            .map_err(|error| {
                let host = self.url.host().unwrap_or_default();
                let port = self.url.port_u16().unwrap_or(80);
                let why = switchyard_core::error_chain(&error);
                LlmError::new(
                    LlmErrorKind::Connect,
                    format!("cannot connect to {host}:{port}: {why}"),
                )
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(stream)
            .await
            .map_err(|error| transport_error(LlmErrorKind::Connect, &error))?;
        // Ends when the connection closes; its errors reach the request it was serving.
        tokio::spawn(connection);
        // Its task needs a turn before the connection takes a request.
        sender
            .ready()
            .await
            .map_err(|error| transport_error(LlmErrorKind::Connect, &error))?;
        Ok(sender)
    }
}

/// A response body that hands its connection back to the pool when it is dropped, unless reading
/// it failed.
struct ReturnsConnection {
    body: Incoming,
    connection: Option<(SendRequest<Full<Bytes>>, Arc<Http1Pool>)>,
}

impl Body for ReturnsConnection {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        if matches!(frame, Some(Err(_))) {
            this.connection = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ReturnsConnection {
    /// Whether the connection can serve another request is hyper's to say: it may be even when
    /// the body was not read to its end (the connection's task reads the rest if it has already
    /// arrived); one left midway is closed by that task.
    fn drop(&mut self) {
        if let Some((sender, pool)) = self.connection.take() {
            pool.put_back(sender);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use super::*;

    /// What the test upstream answers the n-th request of the whole server (from 0), and what
    /// it does then.
    type Answer = fn(usize) -> (&'static [u8], Then);

    #[derive(Clone, Copy, PartialEq)]
    enum Then {
        KeepOpen,
        Close,
        /// Answers as soon as the request's head is in, then holds the connection open without
        /// reading (as a server that refuses a large request early may).
        StopReading,
    }
    use Then::*;

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    /// Reads a request's head from a test upstream's connection: its lines, without their line
    /// ends, and its `content-length` (0 without one). None once the client has closed.
    pub(crate) async fn read_head(
        stream: &mut BufReader<tokio::net::TcpStream>,
    ) -> Option<(Vec<String>, usize)> {
        let (mut head, mut length) = (Vec::new(), 0);
        loop {
            let mut line = String::new();
            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                return None;
            }
            let line = line.trim_end().to_owned();
            if line.is_empty() {
                return Some((head, length));
            }
            if let Some(n) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
                length = n.parse().unwrap();
            }
            head.push(line);
        }
    }

    /// An upstream on 127.0.0.1 that reads requests (head and `content-length` body), answers
    /// each with `answer`, and records each connection's requests (request line and `Host`).
    struct Upstream {
        url: http::Uri,
        connections: Arc<Mutex<Vec<Vec<String>>>>,
    }

    impl Upstream {
        async fn start(answer: Answer) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!(
                "http://{}/v1/chat/completions",
                listener.local_addr().unwrap()
            );
            let connections = Arc::new(Mutex::new(Vec::new()));
            let seen = Arc::clone(&connections);
            tokio::spawn(async move {
                let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let index = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(Vec::new());
                        seen.len() - 1
                    };
                    let (seen, served) = (Arc::clone(&seen), Arc::clone(&served));
                    tokio::spawn(async move {
                        let mut stream = BufReader::new(stream);
                        while let Some((head, length)) = read_head(&mut stream).await {
                            // The request line and `Host`.
                            let kept: Vec<_> = head
                                .into_iter()
                                .enumerate()
                                .filter(|(i, line)| *i == 0 || line.starts_with("host: "))
                                .map(|(_, line)| line)
                                .collect();
                            seen.lock().unwrap()[index].push(kept.join(" | "));
                            let n = served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let (answer, then) = answer(n);
                            if then != StopReading {
                                let mut body = vec![0; length];
                                stream.read_exact(&mut body).await.unwrap();
                            }
                            if stream.get_mut().write_all(answer).await.is_err() || then == Close {
                                return;
                            }
                            if then == StopReading {
                                std::future::pending::<()>().await;
                            }
                        }
                    });
                }
            });
            Self {
                url: url.parse().unwrap(),
                connections,
            }
        }

        fn requests_per_connection(&self) -> Vec<usize> {
            self.connections
                .lock()
                .unwrap()
                .iter()
                .map(Vec::len)
                .collect()
        }

        fn pool(&self) -> Arc<Http1Pool> {
            Arc::new(Http1Pool::new(&self.url).unwrap())
        }
    }

    fn request(pool: &Http1Pool) -> http::Request<Bytes> {
        let host = pool.url.authority().unwrap().as_str();
        http::Request::post("http://ignored.example/other")
            .header(http::header::HOST, host)
            .body(Bytes::from_static(b"{}"))
            .unwrap()
    }

    fn idle(pool: &Http1Pool) -> std::cell::Ref<'_, VecDeque<Idle>> {
        pool.idle.get_or_default().borrow()
    }

    /// Lets the runtime run other tasks (connections', the pool's) until `done` holds, checking
    /// after each turn; fails after 10 s.
    pub(crate) async fn until(done: impl Fn() -> bool) {
        let turns = async {
            while !done() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), turns)
            .await
            .expect("did not happen within 10 s");
    }

    /// Sends a request and reads the first frame of its answer's body; the rest is dropped.
    async fn first_frame_only(pool: &Arc<Http1Pool>) -> Bytes {
        let mut body = pool.send(request(pool)).await.unwrap().into_body();
        let frame = body.frame().await.unwrap().unwrap();
        frame.into_data().unwrap()
    }

    async fn call(pool: &Arc<Http1Pool>) -> Result<Bytes, LlmError> {
        let response = pool.send(request(pool)).await?;
        let body = response.into_body().collect().await.unwrap();
        Ok(body.to_bytes())
    }

    #[tokio::test]
    async fn calls_one_after_another_share_one_connection_and_send_the_origin_form() {
        let upstream = Upstream::start(|_| (OK, KeepOpen)).await;
        let pool = upstream.pool();
        for _ in 0..3 {
            assert_eq!(call(&pool).await.unwrap(), "ok");
        }
        assert_eq!(upstream.requests_per_connection(), [3]);
        let host = format!("host: {}", pool.url.authority().unwrap());
        let seen = upstream.connections.lock().unwrap()[0][0].clone();
        assert_eq!(seen, format!("POST /v1/chat/completions HTTP/1.1 | {host}"));
    }

    #[tokio::test]
    async fn calls_at_the_same_time_get_connections_of_their_own_then_reuse_them() {
        let upstream = Upstream::start(|_| (OK, KeepOpen)).await;
        let pool = upstream.pool();
        // Both heads in before either body is read: the first connection is not back yet.
        let first = pool.send(request(&pool)).await.unwrap();
        let second = pool.send(request(&pool)).await.unwrap();
        for response in [first, second] {
            assert_eq!(
                response.into_body().collect().await.unwrap().to_bytes(),
                "ok"
            );
        }
        for _ in 0..4 {
            call(&pool).await.unwrap();
        }
        let mut counts = upstream.requests_per_connection();
        counts.sort_unstable();
        assert_eq!(counts.iter().sum::<usize>(), 6);
        assert_eq!(counts.len(), 2, "{counts:?}");
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closes_is_not_reused() {
        // The first answer says `Connection: close`, the second closes without saying so (as a
        // server ending an idle keep-alive connection does): the calls after each one go out on
        // a new connection, and none fails.
        let upstream = Upstream::start(|n| match n {
            0 => (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                Close,
            ),
            1 => (OK, Close),
            _ => (OK, KeepOpen),
        })
        .await;
        let pool = upstream.pool();
        assert_eq!(call(&pool).await.unwrap(), "ok");
        assert_eq!(call(&pool).await.unwrap(), "ok");
        // Once the second connection's end (the server stopped after its answer) has reached its
        // task: the connection was not kept, or is kept but no longer ready.
        until(|| idle(&pool).iter().all(|i| !i.sender.is_ready())).await;
        assert_eq!(call(&pool).await.unwrap(), "ok");
        assert_eq!(upstream.requests_per_connection(), [1, 1, 1]);
    }

    #[tokio::test]
    async fn a_connection_whose_answer_was_left_midway_is_not_reused() {
        // The body says 10 bytes and sends 5: the caller reads one frame and gives up.
        let upstream = Upstream::start(|n| match n {
            // Kept open: hyper closes it, the body being unfinished.
            0 => (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello",
                KeepOpen,
            ),
            _ => (OK, KeepOpen),
        })
        .await;
        let pool = upstream.pool();
        assert_eq!(first_frame_only(&pool).await, "hello");
        assert_eq!(call(&pool).await.unwrap(), "ok");
        assert_eq!(upstream.requests_per_connection(), [1, 1]);
    }

    #[tokio::test]
    async fn a_stream_read_to_its_last_event_leaves_its_connection_reusable() {
        // A stream's reader stops at its last event (`[DONE]`) and never sees the body's end:
        // the chunked encoding's last chunk came in the same packet, and hyper reads it.
        let upstream = Upstream::start(|n| match n {
            0 => (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                  e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n",
                KeepOpen,
            ),
            _ => (OK, KeepOpen),
        })
        .await;
        let pool = upstream.pool();
        assert_eq!(first_frame_only(&pool).await, "data: [DONE]\n\n");
        // Not ready yet when dropped: it comes back once its task has read the last bytes.
        until(|| idle(&pool).len() == 1).await;
        assert_eq!(call(&pool).await.unwrap(), "ok");
        assert_eq!(upstream.requests_per_connection(), [2]);
    }

    #[tokio::test]
    async fn a_connection_still_sending_its_request_is_not_reused() {
        // The upstream answers a 32 MB request before reading it, then stops reading: hyper is
        // still writing when the answer has been read. The next call must not wait for that
        // connection: it goes out on a new one.
        let upstream = Upstream::start(|n| match n {
            0 => (
                b"HTTP/1.1 413 Too Large\r\ncontent-length: 2\r\n\r\nno",
                StopReading,
            ),
            _ => (OK, KeepOpen),
        })
        .await;
        let pool = upstream.pool();
        let mut large = request(&pool);
        *large.body_mut() = Bytes::from(vec![b' '; 32 << 20]);
        let response = pool.send(large).await.unwrap();
        assert_eq!(response.status(), 413);
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "no"
        );
        assert_eq!(call(&pool).await.unwrap(), "ok");
        assert_eq!(upstream.requests_per_connection(), [1, 1]);
    }

    #[tokio::test]
    async fn an_upstream_that_refuses_connections_is_a_connect_error() {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap().port()
        };
        let url: http::Uri = format!("http://127.0.0.1:{port}/v1").parse().unwrap();
        let pool = Arc::new(Http1Pool::new(&url).unwrap());
        let error = pool.send(request(&pool)).await.unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::Connect);
        assert!(
            error
                .message
                .starts_with(&format!("cannot connect to 127.0.0.1:{port}: ")),
            "{}",
            error.message
        );
    }

    #[test]
    fn the_request_target_is_the_url_s_path_and_query() {
        let pool = |url: &str| Http1Pool::new(&url.parse().unwrap()).unwrap();
        assert_eq!(pool("http://[::1]:8080/v1/chat?x=1").target, "/v1/chat?x=1");
        assert_eq!(pool("http://llm.internal").target, "/");
    }
}
