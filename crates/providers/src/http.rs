//! The HTTP client providers send upstream requests with: one reqwest client per thread.
//!
//! A reqwest client keeps a pool of upstream connections, and each connection is driven by a
//! task on the runtime that opened it. With one client shared by every thread, a request handled
//! on one thread often goes out on a connection whose task lives on another: two cross-thread
//! wake-ups per call. The gateway runs one single-threaded runtime per core, so a client per
//! thread keeps a request, its upstream connection and that connection's task on one thread,
//! like a per-core event loop. The price: each thread opens its own upstream connections (and
//! TLS sessions).
//!
//! Only the event-loop threads send requests, and they live as long as the gateway. (A thread
//! that exits leaves its client to the next new thread; if the runtime behind its pooled
//! connections is gone by then, reqwest drops them at checkout and connects anew.)

use std::time::Duration;

use thread_local::ThreadLocal;

/// reqwest clients built with the same settings, one per thread that asks for one.
#[derive(Debug, Default)]
pub struct HttpClient {
    per_thread: ThreadLocal<reqwest::Client>,
}

impl HttpClient {
    /// Checks that a client can be built here (TLS set-up), so a failure shows at start-up.
    pub fn new() -> Result<Self, reqwest::Error> {
        let clients = Self::default();
        clients.get()?;
        Ok(clients)
    }

    /// This thread's client.
    pub fn get(&self) -> Result<&reqwest::Client, reqwest::Error> {
        self.per_thread.get_or_try(build)
    }
}

fn build() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_gets_its_own_client_and_keeps_it() {
        let clients = HttpClient::new().expect("client");
        let here = |c: &reqwest::Client| format!("{c:p}");
        let first = here(clients.get().expect("client"));
        assert_eq!(first, here(clients.get().expect("client")));
        let other = std::thread::scope(|s| {
            s.spawn(|| here(clients.get().expect("client")))
                .join()
                .expect("thread")
        });
        assert_ne!(first, other);
    }
}
