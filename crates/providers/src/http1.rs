//! Calls to a plain-HTTP upstream (`http://`, sent directly): the gateway's own pool of HTTP/1
//! connections over hyper's `client::conn::http1`, one pool per upstream, its idle connections
//! kept per thread.
//!
//! **Why not hyper-util's client**, as for HTTPS upstreams. Per request its pool finds the
//! upstream's connections three times in a SipHash map keyed by scheme and authority (~3.6 k
//! instructions, the authority hashed byte by byte), and, once the response head is in, spawns
//! a task that waits for the connection to be ready for another request before putting it back.
//! Here the pool belongs to the upstream (nothing to look up), and a connection goes back when
//! its response body is dropped, from the request's own task.
//!
//! **What it keeps of hyper-util's.** A request that a reused connection could not send (the
//! upstream closed it while it was idle) goes out again on another, then on a new one;
//! connections idle for [`IDLE_TIMEOUT`] are not reused; connecting times out after
//! [`CONNECT_TIMEOUT`]. A connection is reused only when hyper has kept it open: one whose body
//! was dropped midway (a client that left a stream, a deadline) is closed by hyper.
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
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use switchyard_core::{LlmError, LlmErrorKind};
use thread_local::ThreadLocal;

use crate::http::{
    CONNECT_TIMEOUT, POOL_IDLE_TIMEOUT as IDLE_TIMEOUT, UpstreamBody, transport_error,
};

/// Idle connections kept per thread; more are opened under load and closed when they come back.
const MAX_IDLE: usize = 256;

/// The connections to one plain-HTTP upstream.
pub struct Http1Pool {
    /// Where to connect: the URL's host (without an IPv6 address's brackets) and port.
    host: String,
    port: u16,
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
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Http1Pool {
    /// A pool for calls to `url`, an `http://` URL with a host.
    pub fn new(url: &http::Uri) -> Option<Self> {
        let host = url.host()?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let target = url
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .ok()?;
        Some(Self {
            host: host.to_owned(),
            port: url.port_u16().unwrap_or(80),
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
            // Its task may need a turn to finish the last answer (ready), or to close it.
            if let Err(error) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(transport_error(LlmErrorKind::Connect, &error));
            }
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
                Err(mut error) => match error.take_message() {
                    // Not sent: the connection had closed (the upstream ends idle ones).
                    Some(unsent) if reused => request = unsent,
                    _ => {
                        return Err(transport_error(
                            LlmErrorKind::StreamInterrupted,
                            &error.into_error(),
                        ));
                    }
                },
            }
        }
    }

    /// This thread's most recently used idle connection that is still open and fresh.
    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.get_or_default().borrow_mut();
        while let Some(Idle { sender, since }) = idle.pop_back() {
            if !sender.is_closed() && since.elapsed() < IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        None
    }

    /// Puts a connection back whose last response body is gone, for this thread's next call.
    fn put_back(&self, sender: SendRequest<Full<Bytes>>) {
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

    /// A new connection, its task spawned on this thread's runtime.
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, LlmError> {
        let connect = async {
            let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
            // Requests are written whole: never wait for a delayed ACK.
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(stream)
        };
        let cannot = |why: String| {
            LlmError::new(
                LlmErrorKind::Connect,
                format!("cannot connect to {}:{}: {why}", self.host, self.port),
            )
        };
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(cannot(error.to_string())),
            Err(_) => {
                return Err(cannot(format!(
                    "no connection within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| transport_error(LlmErrorKind::Connect, &error))?;
        // Ends when the connection closes; its errors reach the request it was serving.
        tokio::spawn(connection);
        Ok(sender)
    }
}

/// A response body that puts its connection back in the pool when it is dropped, unless reading
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
    /// Whether the connection can serve another request is hyper's to say, and it may be even
    /// when the body was not read to its end: a stream's reader stops at `[DONE]`, and the
    /// chunked encoding's last bytes, which came with it, are read by the connection's task. A
    /// connection left midway is closed by that task, and dropped when it next comes up.
    fn drop(&mut self) {
        if let Some((sender, pool)) = self.connection.take() {
            pool.put_back(sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use super::*;

    /// What the test upstream answers the n-th request of the whole server (from 0), and
    /// whether it keeps the connection open after.
    type Answer = fn(usize) -> (&'static [u8], bool);

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

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
                        loop {
                            let mut head = Vec::new();
                            let mut length = 0;
                            loop {
                                let mut line = String::new();
                                if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                                    return;
                                }
                                let line = line.trim_end().to_owned();
                                if line.is_empty() {
                                    break;
                                }
                                if let Some(n) = line.strip_prefix("content-length: ") {
                                    length = n.parse().unwrap();
                                }
                                if head.is_empty() || line.starts_with("host: ") {
                                    head.push(line);
                                }
                            }
                            let mut body = vec![0; length];
                            stream.read_exact(&mut body).await.unwrap();
                            seen.lock().unwrap()[index].push(head.join(" | "));
                            let n = served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let (answer, keep_open) = answer(n);
                            if stream.get_mut().write_all(answer).await.is_err() || !keep_open {
                                return;
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
        let host = format!("{}:{}", pool.host, pool.port);
        http::Request::post("http://ignored.example/other")
            .header(http::header::HOST, host)
            .body(Bytes::from_static(b"{}"))
            .unwrap()
    }

    async fn call(pool: &Arc<Http1Pool>) -> Result<Bytes, LlmError> {
        let response = pool.send(request(pool)).await?;
        let body = response.into_body().collect().await.unwrap();
        Ok(body.to_bytes())
    }

    #[tokio::test]
    async fn calls_one_after_another_share_one_connection_and_send_the_origin_form() {
        let upstream = Upstream::start(|_| (OK, true)).await;
        let pool = upstream.pool();
        for _ in 0..3 {
            assert_eq!(call(&pool).await.unwrap(), "ok");
        }
        assert_eq!(upstream.requests_per_connection(), [3]);
        let host = format!("host: {}:{}", pool.host, pool.port);
        let seen = upstream.connections.lock().unwrap()[0][0].clone();
        assert_eq!(seen, format!("POST /v1/chat/completions HTTP/1.1 | {host}"));
    }

    #[tokio::test]
    async fn calls_at_the_same_time_get_connections_of_their_own_then_reuse_them() {
        let upstream = Upstream::start(|_| (OK, true)).await;
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
                false,
            ),
            1 => (OK, false),
            _ => (OK, true),
        })
        .await;
        let pool = upstream.pool();
        assert_eq!(call(&pool).await.unwrap(), "ok");
        assert_eq!(call(&pool).await.unwrap(), "ok");
        // The second connection's end (the server stopped after its answer) has reached its
        // task once `ready` fails (no wait on time); it goes back to the pool as it was.
        let idle = pool.idle.get_or_default().borrow_mut().pop_back().unwrap();
        let mut sender = idle.sender;
        assert!(sender.ready().await.is_err());
        let idle = Idle { sender, ..idle };
        pool.idle.get_or_default().borrow_mut().push_back(idle);
        assert_eq!(call(&pool).await.unwrap(), "ok");
        assert_eq!(upstream.requests_per_connection(), [1, 1, 1]);
    }

    #[tokio::test]
    async fn a_connection_whose_answer_was_left_midway_is_not_reused() {
        // The body says 10 bytes and sends 5: the caller reads one frame and gives up.
        let upstream = Upstream::start(|n| match n {
            // Kept open: hyper closes it, the body being unfinished.
            0 => (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello", true),
            _ => (OK, true),
        })
        .await;
        let pool = upstream.pool();
        let mut body = pool.send(request(&pool)).await.unwrap().into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "hello");
        drop(body);
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
                true,
            ),
            _ => (OK, true),
        })
        .await;
        let pool = upstream.pool();
        let mut body = pool.send(request(&pool)).await.unwrap().into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "data: [DONE]\n\n");
        drop(body);
        assert_eq!(call(&pool).await.unwrap(), "ok");
        assert_eq!(upstream.requests_per_connection(), [2]);
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
    fn connects_to_the_host_without_brackets_and_the_scheme_s_port() {
        let pool = |url: &str| Http1Pool::new(&url.parse().unwrap()).unwrap();
        let v6 = pool("http://[::1]:8080/v1/chat/completions?x=1");
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 8080));
        assert_eq!(v6.target, "/v1/chat/completions?x=1");
        let named = pool("http://llm.internal/v1");
        assert_eq!((named.host.as_str(), named.port), ("llm.internal", 80));
    }
}
