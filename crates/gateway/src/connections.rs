//! The cap on open client connections (`[server] max_connections`), and closing connections.
//!
//! Every connection is a file: without a cap, enough clients exhaust the open-files limit, and
//! then the gateway can open no upstream connection either (every request fails) while new
//! clients are refused at random. At the cap a newly accepted client waits for a slot (those
//! behind it in the kernel's accept queue, since one task accepts), and calls for a connection
//! to close: the connection idle the longest — a keep-alive one between requests, or one that
//! has sent nothing since it was accepted — if one has been idle for half a second, closes now
//! (nginx reuses idle connections the same way; one that has just answered is likely to carry
//! its client's next request any moment, which closing it would fail); else the first response
//! head to go out (a stream's too) takes the call, says `Connection: close`, and its connection
//! closes after that response. While the client still waits, the call is made again every half
//! second. Without that, idle and silent clients would keep their slots until
//! `header_timeout_ms`, and busy ones for ever. A connection whose request is arriving (bytes
//! have come in) is not idle.
//!
//! Closing every connection at shutdown ([`ConnectionSlots::close_all`]) goes through the same
//! register of open connections, which holds each one's task waker.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
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
    /// The call for room of the client waiting for a slot (one task accepts, so at most one
    /// waits): `NO_CLIENT`, `ANSWERED` or `OPEN`. Shared by every connection's state, so that a
    /// request need not touch `Inner`'s count.
    call: Arc<AtomicU8>,
    /// Set when serving stops: every connection closes.
    closing: AtomicBool,
    /// The open connections (once their task has run): how to find an idle one, and how to
    /// wake them all at shutdown.
    connections: Mutex<Register>,
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
            call: Arc::new(AtomicU8::new(NO_CLIENT)),
            closing: AtomicBool::new(false),
            connections: Mutex::new(Register::default()),
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
                        self.warn_of_waiting();
                        let acquire = self.0.slots.clone().acquire_owned();
                        let mut acquire = std::pin::pin!(acquire);
                        loop {
                            // Again while it waits: connections idle too recently at first may
                            // have been idle long enough since.
                            self.make_room();
                            let wait = Duration::from_millis(IDLE_ENOUGH_MS);
                            match tokio::time::timeout(wait, acquire.as_mut()).await {
                                Ok(Ok(permit)) => break permit,
                                // Only a closed semaphore fails, and this one is never closed.
                                Ok(Err(_)) => return std::future::pending().await,
                                Err(_) => {}
                            }
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
                // Idle until its first bytes arrive, as between two requests.
                phase: AtomicU8::new(IDLE),
                close: AtomicU8::new(STAYS),
                idle_since: AtomicU64::new(millis_now()),
                call: self.0.call.clone(),
                key: AtomicUsize::new(NOT_REGISTERED),
            }),
        }
    }

    /// Calls for a connection to close for the waiting client (again, if one already has: it
    /// may be slow to finish): the connection idle the longest (between requests, or silent
    /// since it was accepted), if one has been idle for `IDLE_ENOUGH_MS`, is told to, and
    /// woken; else the first response head to go out takes the call
    /// ([`ConnectionState::response_head`]).
    fn make_room(&self) {
        let call = &self.0.call;
        // Only for a client that waits; no unconditional store, so that a call cannot be lost.
        if call
            .compare_exchange(ANSWERED, OPEN, Ordering::SeqCst, Ordering::SeqCst)
            .is_err_and(|now| now == NO_CLIENT)
        {
            return;
        }
        // A connection that has just answered is likely to get its client's next request any
        // moment, and closing it would fail that request: a busy one says `Connection: close`.
        let now = millis_now();
        let chosen = self
            .connections()
            .iter()
            .map(|(_, entry)| entry)
            .filter(|(state, _)| {
                state.phase.load(Ordering::SeqCst) == IDLE
                    && state.close.load(Ordering::SeqCst) == STAYS
            })
            .map(|entry| (entry.0.idle_since.load(Ordering::Relaxed), entry))
            .filter(|(since, _)| now.saturating_sub(*since) >= IDLE_ENOUGH_MS)
            .min_by_key(|(since, _)| *since)
            .map(|(_, (state, waker))| (state.clone(), waker.clone()));
        // Woken outside the register's lock.
        if let Some((state, waker)) = chosen
            && take_call(call)
        {
            state.close.store(TOLD, Ordering::SeqCst);
            waker.wake();
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

    fn connections(&self) -> MutexGuard<'_, Register> {
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

/// The open connections, each with its task's waker.
type Register = slab::Slab<(Arc<ConnectionState>, Waker)>;

/// How long a connection must have been idle to be closed for a waiting client.
const IDLE_ENOUGH_MS: u64 = 500;

/// Milliseconds on a monotonic clock, from the first call.
fn millis_now() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// `Inner::call`: no client waits; one waits, and its call is answered (or not made yet); one
/// waits, and the first connection that can closes for it.
const NO_CLIENT: u8 = 0;
const ANSWERED: u8 = 1;
const OPEN: u8 = 2;

/// Takes an open call for room; whether there was one.
fn take_call(call: &AtomicU8) -> bool {
    // A load first: without a waiting client, no write to a shared cache line.
    call.load(Ordering::SeqCst) == OPEN
        && call
            .compare_exchange(OPEN, ANSWERED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
}

/// A client waiting for a slot, for as long as this lives (a wait that is dropped midway ends
/// too); its call for room ends with it. Only the accepting task makes one.
struct Waiting<'a>(&'a ConnectionSlots);

impl<'a> Waiting<'a> {
    fn new(slots: &'a ConnectionSlots) -> Self {
        slots.0.call.store(ANSWERED, Ordering::SeqCst);
        Self(slots)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.0.call.store(NO_CLIENT, Ordering::SeqCst);
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

/// Where a connection is: a request on its way (its first bytes have come in), a request being
/// answered, or none (between requests, or nothing sent yet).
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
    /// When it last became idle (`millis_now`).
    idle_since: AtomicU64,
    /// `Inner::call`.
    call: Arc<AtomicU8>,
    /// Its entry in the register of open connections.
    key: AtomicUsize,
}

impl ConnectionState {
    /// A request has arrived whole (its head, at least).
    pub(crate) fn request_started(&self) {
        self.phase.store(BUSY, Ordering::Relaxed);
    }

    /// A response's head is about to go out: whether it must say `Connection: close`, this
    /// connection closing after it for the waiting client: it was told to while idle and has
    /// answered a request since, or it takes the call now. A stream's too (one that lasts
    /// minutes holds the client up until the call is made again, half a second later): a
    /// client told in the head does not send its next request on a connection about to close.
    pub(crate) fn response_head(&self) -> bool {
        let told = self.close.load(Ordering::SeqCst) == TOLD
            && self
                .close
                .compare_exchange(TOLD, LEAVING, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
        if told || take_call(&self.call) {
            self.close.store(LEAVING, Ordering::SeqCst);
            return true;
        }
        false
    }

    /// Bytes came in: on an idle connection, a request has started.
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
    /// Whether the connection should close: four atomic loads, and at the first call an entry
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
        if state.close.load(Ordering::SeqCst) != TOLD {
            return None;
        }
        if phase == IDLE
            && state
                .close
                .compare_exchange(TOLD, LEAVING, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            return Some(Close::Gracefully);
        }
        // Its next request has started since it was told (its head would have taken the
        // telling over): it stays, and the call is made again.
        if state
            .close
            .compare_exchange(TOLD, STAYS, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.slots.make_room();
        }
        None
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
        self.state.idle_since.store(millis_now(), Ordering::Relaxed);
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
