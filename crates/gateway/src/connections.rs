//! The cap on open client connections (`[server] max_connections`).
//!
//! Every connection is a file: without a cap, enough clients exhaust the open-files limit, and
//! then the gateway can open no upstream connection either (every request fails) while new
//! clients are refused at random. At the cap a newly accepted client waits for a slot (those
//! behind it in the kernel's accept queue), and while one waits every response says
//! `Connection: close`, so keep-alive connections close after their current request and make
//! room: without that, busy keep-alive clients would keep their slots for ever (Envoy's
//! overload manager turns keep-alive off the same way).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
            warned: Mutex::new((None, 0)),
        }))
    }

    /// How many connections may be open at once.
    pub(crate) fn max(&self) -> usize {
        self.0.max
    }

    /// A slot for a client just accepted; while all are taken it waits, and the connections
    /// open close after their current request.
    async fn acquire(&self) -> Slot {
        let permit = match self.0.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let _waiting = Waiting::new(&self.0.waiting);
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

/// One accepted client waiting for a slot, for as long as this lives (a wait that is dropped
/// midway ends too).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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

impl Slot {
    /// The slots this one is of.
    pub(crate) fn slots(&self) -> ConnectionSlots {
        self.slots.clone()
    }
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
