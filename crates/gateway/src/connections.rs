//! The cap on open client connections (`[server] max_connections`), and closing connections.
//!
//! Every connection is a file: without a cap, enough clients exhaust the open-files limit, and
//! then the gateway can open no upstream connection either (every request fails) while new
//! clients are refused at random. At the cap a newly accepted client waits for a slot (those
//! behind it in the kernel's accept queue), and connections make room for it: an idle keep-alive
//! connection closes at once (one per waiting client; nginx reuses idle connections the same
//! way), and while a client waits every response says `Connection: close`, so busy keep-alive
//! connections close after their current request (Envoy's overload manager turns keep-alive off
//! the same way). Without that, idle clients would keep their slots until `header_timeout_ms`,
//! and busy ones for ever.
//!
//! The same signal closes every connection at shutdown ([`ConnectionSlots::close_all`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::warn;

/// How often, at most, a warning says the cap holds new connections back.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The slots for open connections, shared by every thread that accepts.
#[derive(Clone)]
pub(crate) struct ConnectionSlots(Arc<Inner>);

struct Inner {
    slots: Arc<Semaphore>,
    max: usize,
    open: Gauge,
    /// Accepted clients waiting for a slot: while there are any, responses close their
    /// connections.
    waiting: AtomicUsize,
    /// Idle connections wanted closed: one per waiting client, taken back when that client
    /// gets a slot some other way.
    idle_to_close: AtomicUsize,
    /// Set when serving stops: every connection closes.
    closing: AtomicBool,
    /// Wakes every connection's task to look at `idle_to_close` and `closing`; `wakes` counts
    /// the times, so that a task registers again only after one.
    wake: Arc<Notify>,
    wakes: AtomicU64,
    /// When the last warning was written, and how many clients have waited since.
    warned: Mutex<(Option<Instant>, u64)>,
}

impl ConnectionSlots {
    /// `max` connections, or, with `None`, half of the open-files limit (the other half is for
    /// upstream and Redis connections, the store and the logs). `open` counts them.
    pub(crate) fn new(max: Option<usize>, open: Gauge) -> Self {
        let files = open_files_limit();
        let half_the_files = files / 2;
        if let Some(max) = max
            && max > half_the_files
        {
            warn!(
                max_connections = max,
                open_files_limit = files,
                "max_connections is above half the open-files limit: at that many clients, \
                 upstream connections may find no file"
            );
        }
        let max = max
            .unwrap_or(half_the_files)
            .clamp(1, Semaphore::MAX_PERMITS);
        Self(Arc::new(Inner {
            slots: Arc::new(Semaphore::new(max)),
            max,
            open,
            waiting: AtomicUsize::new(0),
            idle_to_close: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            wake: Arc::new(Notify::new()),
            wakes: AtomicU64::new(0),
            warned: Mutex::new((None, 0)),
        }))
    }

    /// How many connections may be open at once.
    pub(crate) fn max(&self) -> usize {
        self.0.max
    }

    /// A slot for a client just accepted; while all are taken it waits, an idle connection
    /// closes, and busy ones close after their current request.
    async fn acquire(&self) -> Slot {
        let permit = match self.0.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let _waiting = Waiting::new(&self.0);
                self.wake_connections();
                self.warn_of_waiting();
                let permit = self.0.slots.clone().acquire_owned().await;
                match permit {
                    Ok(permit) => permit,
                    // Only a closed semaphore fails, and this one is never closed.
                    Err(_) => return std::future::pending().await,
                }
            }
        };
        self.0.open.inc();
        Slot {
            _permit: permit,
            slots: self.clone(),
        }
    }

    /// Whether a client waits for a slot: a response should then close its connection.
    pub(crate) fn clients_waiting(&self) -> bool {
        self.0.waiting.load(Ordering::Relaxed) > 0
    }

    /// Closes every connection: idle ones now, busy ones after their response, and those
    /// that have not sent a whole request yet at once (they have nothing to lose).
    pub(crate) fn close_all(&self) {
        self.0.closing.store(true, Ordering::SeqCst);
        self.wake_connections();
    }

    fn wake_connections(&self) {
        self.0.wakes.fetch_add(1, Ordering::SeqCst);
        self.0.wake.notify_waiters();
    }

    /// What a new connection's task consults on each wake-up.
    pub(crate) fn watch(&self) -> ConnectionWatch {
        ConnectionWatch {
            state: Arc::new(ConnectionState {
                slots: self.clone(),
                phase: AtomicU8::new(NEW),
            }),
            seen: 0,
            woken: None,
        }
    }

    fn warn_of_waiting(&self) {
        let mut warned = self.0.warned.lock().unwrap_or_else(PoisonError::into_inner);
        warned.1 += 1;
        if warned.0.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            warn!(
                max_connections = self.0.max,
                waited = warned.1,
                "connection limit reached: new clients wait, and connections close after their \
                 current request, until there is room"
            );
            *warned = (Some(Instant::now()), 0);
        }
    }
}

/// One accepted client waiting for a slot, and its call for an idle connection to close, for
/// as long as this lives (a wait that is dropped midway ends too).
struct Waiting<'a>(&'a Inner);

impl<'a> Waiting<'a> {
    fn new(inner: &'a Inner) -> Self {
        inner.waiting.fetch_add(1, Ordering::Relaxed);
        inner.idle_to_close.fetch_add(1, Ordering::SeqCst);
        Self(inner)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
        // Its call, unless an idle connection has answered it (then the count may be 0).
        let _ = take_one(&self.0.idle_to_close);
    }
}

/// Takes one from `count` unless it is 0; whether it did.
fn take_one(count: &AtomicUsize) -> bool {
    count.load(Ordering::SeqCst) > 0
        && count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
}

/// Where a connection is: no whole request yet, a request being answered, or between requests.
const NEW: u8 = 0;
const BUSY: u8 = 1;
const IDLE: u8 = 2;

/// One connection's phase, shared by its task, its requests and their response bodies.
pub(crate) struct ConnectionState {
    slots: ConnectionSlots,
    phase: AtomicU8,
}

impl ConnectionState {
    /// A request has arrived whole (its head, at least).
    pub(crate) fn request_started(&self) {
        self.phase.store(BUSY, Ordering::Relaxed);
    }

    /// Whether a client waits for a slot: the response should close its connection.
    pub(crate) fn clients_waiting(&self) -> bool {
        self.slots.clients_waiting()
    }
}

/// How a connection's task should close it.
pub(crate) enum Close {
    /// Now, unanswered: it has not sent a whole request.
    Drop,
    /// hyper's graceful shutdown: now if idle, else after the current response.
    Gracefully,
}

/// What a connection's task consults on each wake-up (see [`ConnectionSlots::watch`]).
pub(crate) struct ConnectionWatch {
    pub(crate) state: Arc<ConnectionState>,
    /// `wakes` when `woken` was made.
    seen: u64,
    /// Registered to wake this task at the next wake-up (made at the first call).
    woken: Option<Pin<Box<OwnedNotified>>>,
}

impl ConnectionWatch {
    /// Whether the connection should close. Costs three atomic loads unless the connections
    /// were woken since the last call: `woken` stays registered between wake-ups (polling a
    /// `Notified` takes a lock).
    pub(crate) fn poll_close(&mut self, cx: &mut Context<'_>) -> Option<Close> {
        let inner = &self.state.slots.0;
        loop {
            let wakes = inner.wakes.load(Ordering::SeqCst);
            if self.woken.is_some() && wakes == self.seen {
                break;
            }
            // Registered before the checks below, so no wake-up after them is missed.
            self.seen = wakes;
            let woken = inner.wake.clone().notified_owned();
            let woken = match &mut self.woken {
                Some(old) => {
                    old.set(woken);
                    old
                }
                None => self.woken.insert(Box::pin(woken)),
            };
            if woken.as_mut().poll(cx).is_pending() {
                break;
            }
            // Woken since `wakes` was read: register again.
        }
        let phase = self.state.phase.load(Ordering::Relaxed);
        if inner.closing.load(Ordering::SeqCst) {
            return Some(match phase {
                NEW => Close::Drop,
                _ => Close::Gracefully,
            });
        }
        (phase == IDLE && take_one(&inner.idle_to_close)).then_some(Close::Gracefully)
    }
}

/// A response body that marks its connection idle once hyper is done with it (written, or
/// given up).
pub(crate) struct UntilSent<B> {
    pub(crate) body: B,
    pub(crate) state: Arc<ConnectionState>,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for UntilSent<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl<B> Drop for UntilSent<B> {
    fn drop(&mut self) {
        self.state.phase.store(IDLE, Ordering::Relaxed);
    }
}

/// The soft limit on open files (8192 where it cannot be read).
fn open_files_limit() -> usize {
    #[cfg(unix)]
    if let Ok((soft, _hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        return usize::try_from(soft).unwrap_or(usize::MAX);
    }
    8192
}

/// One open connection's slot, given back when the connection is dropped.
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    slots: ConnectionSlots,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.0.open.dec();
    }
}

/// A connection holding its slot for as long as it is open.
pub(crate) struct Counted<T> {
    pub(crate) io: T,
    pub(crate) slot: Slot,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A listener whose connections each take a slot once accepted: at the cap, the client just
/// accepted waits for one (and the next ones in the kernel's accept queue).
pub(crate) struct CappedListener<L> {
    pub(crate) inner: L,
    pub(crate) slots: ConnectionSlots,
}

impl<L: axum::serve::Listener> axum::serve::Listener for CappedListener<L> {
    type Io = Counted<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, address) = self.inner.accept().await;
        let slot = self.slots.acquire().await;
        (Counted { io, slot }, address)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
