//! The cap on open client connections (`[server] max_connections`).
//!
//! Every connection is a file: without a cap, enough clients exhaust the open-files limit, and
//! then the gateway can open no upstream connection either (every request fails) while new
//! clients are refused at random. At the cap the gateway stops accepting, as HAProxy's
//! `maxconn` does: new clients wait in the kernel's accept queue until a connection closes
//! (idle keep-alive connections close after `header_timeout_ms`).

use std::io;
use std::pin::Pin;
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
    /// When the last warning was written, and how many connections have waited since.
    warned: Mutex<(Option<Instant>, u64)>,
}

impl ConnectionSlots {
    /// `max` connections, or, with `None`, half of the open-files limit (the other half is for
    /// upstream and Redis connections, the store and the logs). `open` counts them.
    pub(crate) fn new(max: Option<usize>, open: Gauge) -> Self {
        let max = max
            .unwrap_or_else(default_max)
            .clamp(1, Semaphore::MAX_PERMITS);
        Self(Arc::new(Inner {
            slots: Arc::new(Semaphore::new(max)),
            max,
            open,
            warned: Mutex::new((None, 0)),
        }))
    }

    /// How many connections may be open at once.
    pub(crate) fn max(&self) -> usize {
        self.0.max
    }

    /// A slot for the next connection; waits while all are taken.
    async fn acquire(&self) -> OwnedSemaphorePermit {
        if let Ok(permit) = self.0.slots.clone().try_acquire_owned() {
            return permit;
        }
        self.waiting();
        match self.0.slots.clone().acquire_owned().await {
            Ok(permit) => permit,
            // Only a closed semaphore fails, and this one is never closed.
            Err(_) => std::future::pending().await,
        }
    }

    /// `permit` taken by a connection now open.
    fn open(&self, permit: OwnedSemaphorePermit) -> Slot {
        self.0.open.inc();
        Slot {
            _permit: permit,
            open: self.0.open.clone(),
        }
    }

    fn waiting(&self) {
        let mut warned = self.0.warned.lock().unwrap_or_else(PoisonError::into_inner);
        warned.1 += 1;
        if warned.0.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            warn!(
                max_connections = self.0.max,
                waited = warned.1,
                "connection limit reached: new connections wait until one closes"
            );
            *warned = (Some(Instant::now()), 0);
        }
    }
}

fn default_max() -> usize {
    #[cfg(unix)]
    if let Ok((soft, _hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        return usize::try_from(soft / 2).unwrap_or(usize::MAX);
    }
    4096
}

/// One open connection's slot, given back when the connection is dropped.
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
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

/// A listener that takes a slot before it accepts: at the cap, it stops accepting.
pub(crate) struct CappedListener<L> {
    pub(crate) inner: L,
    pub(crate) slots: ConnectionSlots,
}

impl<L: axum::serve::Listener> axum::serve::Listener for CappedListener<L> {
    type Io = Counted<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = self.slots.acquire().await;
        let (io, address) = self.inner.accept().await;
        let slot = self.slots.open(permit);
        (Counted { io, slot }, address)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
