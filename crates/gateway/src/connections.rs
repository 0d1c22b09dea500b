//! The cap on open client connections (`[server] max_connections`), and closing connections.
//!
//! Every connection is a file: without a cap, enough clients exhaust the open-files limit, and
//! then the gateway can open no upstream connection either (every request fails) while new
//! clients are refused at random. At the cap a newly accepted client waits for a slot (those
//! behind it in the kernel's accept queue, since one task accepts), and one connection makes
//! room for it: an idle keep-alive connection closes at once (nginx reuses idle connections the
//! same way), or, when none is idle, the next response that is not a stream says
//! `Connection: close`, or the next connection to finish its response closes. Without that,
//! idle clients would keep their slots until `header_timeout_ms`, and busy ones for ever.
//! A connection whose next request has started to arrive is not idle.
//!
//! Closing every connection at shutdown ([`ConnectionSlots::close_all`]) goes through the same
//! register of open connections, which holds each one's task waker.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

/// How often, at most, a warning says the cap holds new connections back.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The slots for open connections, shared by every thread that serves them.
#[derive(Clone)]
pub(crate) struct ConnectionSlots(Arc<Inner>);

struct Inner {
    slots: Arc<Semaphore>,
    max: usize,
    open: Gauge,
    /// Whether a client waits for a slot (one task accepts, so at most one does).
    waiting: AtomicBool,
    /// Whether it still needs a connection to close for it: taken by the first that can.
    /// Shared by every connection's state, so that a request need not touch `Inner`'s count.
    room_wanted: Arc<AtomicBool>,
    /// Set when serving stops: every connection closes.
    closing: AtomicBool,
    /// The open connections (once their task has run): how to find an idle one, and how to
    /// wake them all at shutdown.
    connections: Mutex<slab::Slab<(Arc<ConnectionState>, Waker)>>,
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
            waiting: AtomicBool::new(false),
            room_wanted: Arc::new(AtomicBool::new(false)),
            closing: AtomicBool::new(false),
            connections: Mutex::new(slab::Slab::new()),
            warned: Mutex::new((None, 0)),
        }))
    }

    /// How many connections may be open at once.
    pub(crate) fn max(&self) -> usize {
        self.0.max
    }

    /// A slot for a client just accepted; while all are taken it waits, and one connection
    /// closes to make room (see the module's documentation).
    async fn acquire(&self) -> Slot {
        let permit = match self.0.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let _waiting = Waiting::new(self);
                // A slot given back meanwhile needs no connection to close.
                match self.0.slots.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        self.make_room();
                        self.warn_of_waiting();
                        match self.0.slots.clone().acquire_owned().await {
                            Ok(permit) => permit,
                            // Only a closed semaphore fails, and this one is never closed.
                            Err(_) => return std::future::pending().await,
                        }
                    }
                }
            }
        };
        self.0.open.inc();
        Slot {
            _permit: permit,
            slots: self.clone(),
            state: Arc::new(ConnectionState {
                phase: AtomicU8::new(NEW),
                close: AtomicU8::new(STAYS),
                room_wanted: self.0.room_wanted.clone(),
                key: AtomicUsize::new(NOT_REGISTERED),
            }),
        }
    }

    /// Asks for a connection to close for the waiting client: an idle one now if there is one
    /// (told, and woken), else the first that can (see [`ConnectionState::take_room_wanted`]).
    fn make_room(&self) {
        let room_wanted = &self.0.room_wanted;
        // Set before looking for an idle connection, and a connection sets itself idle before
        // it looks at this: one of the two sees the other.
        room_wanted.store(true, Ordering::SeqCst);
        if !self.0.waiting.load(Ordering::SeqCst) {
            // The client got its slot meanwhile (`Waiting::drop` clears the call after it
            // clears `waiting`).
            room_wanted.store(false, Ordering::SeqCst);
            return;
        }
        let connections = self.connections();
        let idle = connections
            .iter()
            .map(|(_, entry)| entry)
            .find(|(state, _)| {
                state.phase.load(Ordering::SeqCst) == IDLE
                    && state.close.load(Ordering::SeqCst) == STAYS
            });
        if let Some((state, waker)) = idle
            && room_wanted.load(Ordering::SeqCst)
            && room_wanted.swap(false, Ordering::SeqCst)
        {
            state.close.store(TOLD, Ordering::SeqCst);
            waker.wake_by_ref();
        }
    }

    /// Closes every connection: idle ones now, busy ones after their response, and those
    /// whose request has not arrived whole yet at once (they have nothing to lose).
    pub(crate) fn close_all(&self) {
        if self.0.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        // Woken outside the lock: a thread's wake-up of another thread's task writes to that
        // thread's eventfd.
        let wakers: Vec<Waker> = self
            .connections()
            .iter()
            .map(|(_, (_, waker))| waker.clone())
            .collect();
        for waker in wakers {
            waker.wake();
        }
    }

    fn connections(&self) -> MutexGuard<'_, slab::Slab<(Arc<ConnectionState>, Waker)>> {
        self.0
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// What the task of a connection just accepted consults on each wake-up.
    pub(crate) fn watch(&self, state: Arc<ConnectionState>) -> ConnectionWatch {
        ConnectionWatch {
            slots: self.clone(),
            state,
        }
    }

    fn warn_of_waiting(&self) {
        let mut warned = self.0.warned.lock().unwrap_or_else(PoisonError::into_inner);
        warned.1 += 1;
        if warned.0.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            warn!(
                max_connections = self.0.max,
                waited = warned.1,
                "connection limit reached: new clients wait, and a connection closes for each, \
                 until there is room"
            );
            *warned = (Some(Instant::now()), 0);
        }
    }
}

/// A client waiting for a slot, for as long as this lives (a wait that is dropped midway ends
/// too); its call for room ends with it.
struct Waiting<'a>(&'a ConnectionSlots);

impl<'a> Waiting<'a> {
    fn new(slots: &'a ConnectionSlots) -> Self {
        slots.0.waiting.store(true, Ordering::SeqCst);
        Self(slots)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let inner = &self.0.0;
        inner.waiting.store(false, Ordering::SeqCst);
        inner.room_wanted.store(false, Ordering::SeqCst);
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

/// One open connection's slot, given back when the connection is dropped, and its state.
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    slots: ConnectionSlots,
    pub(crate) state: Arc<ConnectionState>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Out of the register before the slot is given back (the permit, a field, is dropped
        // after this): a client that gets the slot must not find this connection idle.
        let key = self.state.key.load(Ordering::SeqCst);
        if key != NOT_REGISTERED {
            self.slots.connections().remove(key);
        }
        self.slots.0.open.dec();
    }
}

/// Where a connection is: a request on its way (none yet, or the next one's first bytes), a
/// request being answered, or between requests.
const NEW: u8 = 0;
const BUSY: u8 = 1;
const IDLE: u8 = 2;

/// Whether a connection closes for a waiting client: not, told to (while idle), or it will.
const STAYS: u8 = 0;
const TOLD: u8 = 1;
const LEAVING: u8 = 2;

/// `key` of a connection whose task has not run yet.
const NOT_REGISTERED: usize = usize::MAX;

/// One connection's phase, shared by its socket, its task, its requests and their responses.
pub(crate) struct ConnectionState {
    phase: AtomicU8,
    close: AtomicU8,
    /// `Inner::room_wanted`.
    room_wanted: Arc<AtomicBool>,
    /// Its entry in the register of open connections.
    key: AtomicUsize,
}

impl ConnectionState {
    /// A request has arrived whole (its head, at least).
    pub(crate) fn request_started(&self) {
        self.phase.store(BUSY, Ordering::Relaxed);
    }

    /// Takes the waiting client's call for room, if there is one: this connection then closes
    /// after its current response (and must say so).
    pub(crate) fn take_room_wanted(&self) -> bool {
        // A load first: without a waiting client, no write to a shared cache line.
        let taken = self.room_wanted.load(Ordering::SeqCst)
            && self.room_wanted.swap(false, Ordering::SeqCst);
        if taken {
            self.close.store(LEAVING, Ordering::SeqCst);
        }
        taken
    }

    /// Bytes came in: on an idle connection, the next request has started.
    fn bytes_arrived(&self) {
        if self.phase.load(Ordering::Relaxed) == IDLE {
            self.phase.store(NEW, Ordering::SeqCst);
        }
    }
}

/// How a connection's task should close it.
pub(crate) enum Close {
    /// Now, unanswered: its request has not arrived whole.
    Drop,
    /// hyper's graceful shutdown: now if idle, else after the current response.
    Gracefully,
}

/// What a connection's task consults on each wake-up (see [`ConnectionSlots::watch`]).
pub(crate) struct ConnectionWatch {
    slots: ConnectionSlots,
    pub(crate) state: Arc<ConnectionState>,
}

impl ConnectionWatch {
    /// Whether the connection should close: three atomic loads, and at the first call an entry
    /// in the register of open connections (left in `Slot::drop`) with this task's waker. That
    /// one waker is enough because the task's future is polled by tokio's task itself (in a
    /// `JoinSet`, under a task-local scope, neither of which substitutes a waker of its own),
    /// and a tokio task's waker wakes it for as long as it lives, wherever it runs.
    pub(crate) fn poll_close(&mut self, cx: &mut Context<'_>) -> Option<Close> {
        let state = &self.state;
        if state.key.load(Ordering::Relaxed) == NOT_REGISTERED {
            let entry = (state.clone(), cx.waker().clone());
            let key = self.slots.connections().insert(entry);
            state.key.store(key, Ordering::SeqCst);
        }
        let phase = state.phase.load(Ordering::SeqCst);
        if self.slots.0.closing.load(Ordering::SeqCst) {
            return Some(match phase {
                NEW => Close::Drop,
                _ => Close::Gracefully,
            });
        }
        match state.close.load(Ordering::SeqCst) {
            TOLD if phase == IDLE => {}
            // Its next request has started since it was told: it stays, and the call goes on.
            TOLD => {
                state.close.store(STAYS, Ordering::SeqCst);
                self.slots.make_room();
                return None;
            }
            STAYS if phase == IDLE && state.take_room_wanted() => {}
            _ => return None,
        }
        state.close.store(LEAVING, Ordering::SeqCst);
        Some(Close::Gracefully)
    }
}

/// A response body that marks its connection idle once hyper is done with it (its last bytes
/// handed to the socket's buffer, or given up).
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
        // Before the task looks for a waiting client (`poll_close`), which the waiting client's
        // search for an idle connection must not miss.
        self.state.phase.store(IDLE, Ordering::SeqCst);
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
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.slot.state.bytes_arrived();
        }
        read
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
