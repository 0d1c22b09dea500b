//! Counters in Redis, shared by every gateway replica: one atomic Lua script per decision, on
//! the Redis server's clock, so replicas with skewed clocks still share one budget.
//!
//! The request's own task talks to Redis: it takes an idle connection from its thread's small
//! pool, writes the command and reads the answer itself. redis-rs's async connections are
//! multiplexed (every command goes to a driver task and the answer comes back through a channel:
//! two more wake-ups per decision, ~0.04 ms here), so only its URL parsing, command packing and
//! script hash are used; replies are decoded with `redis-protocol`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use redis::{ConnectionAddr, IntoConnectionInfo};
use redis_protocol::resp2::types::OwnedFrame;
use thread_local::ThreadLocal;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{info, warn};

use super::gcra::{CellState, Gcra};
use super::{Cell, Decision};

/// Bumped whenever the script or the stored values change meaning, so that during a rolling
/// deploy old and new gateways never read each other's counters.
pub const SCRIPT_VERSION: &str = "v1";

/// The GCRA of `gcra.rs`, in microseconds of the Redis clock. ARGV[1] is "take" or "adjust";
/// then per key: interval (µs), capacity, cost (take) or delta (adjust). "take" admits all keys
/// or none; it returns {admitted, wait_us, remaining_1, reset_us_1, refused_1, remaining_2, ...}.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
local function tat_of(key)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  return tat
end
local function store(key, tat)
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
if mode == 'adjust' then
  for i = 1, #KEYS do
    local interval = tonumber(ARGV[i * 3 - 1])
    local delta = tonumber(ARGV[i * 3 + 1])
    local tat = tat_of(KEYS[i]) + delta * interval
    if tat < now then tat = now end
    store(KEYS[i], tat)
  end
  return {1}
end
local wait = 0
local tats = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[i * 3 - 1])
  local capacity = tonumber(ARGV[i * 3])
  local cost = tonumber(ARGV[i * 3 + 1])
  local tat = tat_of(KEYS[i])
  local new_tat = tat + cost * interval
  local allow_at = new_tat - capacity * interval
  if allow_at - now > wait then wait = allow_at - now end
  tats[i] = {tat, new_tat, interval, capacity, allow_at > now}
end
local admitted = wait <= 0
local result = {admitted and 1 or 0, math.ceil(wait)}
for i = 1, #KEYS do
  local tat = tats[i][1]
  if admitted then
    tat = tats[i][2]
    store(KEYS[i], tat)
  end
  local interval, capacity = tats[i][3], tats[i][4]
  -- Times near 1.8e15 us carry ~0.25 us of float rounding: within half a microsecond of a
  -- whole request counts as one (it showed one request too few from a full bucket).
  table.insert(result, math.min(capacity, math.floor((now - tat + capacity * interval + 0.5) / interval)))
  table.insert(result, math.ceil(tat - now))
  table.insert(result, (not admitted and tats[i][5]) and 1 or 0)
end
return result
"#;

/// Where Redis is and what a new connection sends first (AUTH, SELECT).
struct Server {
    address: ConnectionAddr,
    /// Packed commands, each answered by `+OK`.
    handshake: Vec<Vec<u8>>,
}

/// A TCP or Unix socket.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

/// One connection, used by one request at a time.
struct Connection {
    stream: Box<dyn Stream>,
    /// Bytes read and not yet decoded.
    buffer: Vec<u8>,
}

impl Connection {
    async fn open(server: &Server) -> Result<Self, String> {
        let cannot_connect = |e: std::io::Error| format!("cannot connect: {e}");
        let stream: Box<dyn Stream> = match &server.address {
            ConnectionAddr::Tcp(host, port) => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(cannot_connect)?;
                // Commands are small and answered at once: never wait for a delayed ACK.
                stream.set_nodelay(true).map_err(cannot_connect)?;
                Box::new(stream)
            }
            ConnectionAddr::Unix(path) => Box::new(
                tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(cannot_connect)?,
            ),
            _ => return Err("unsupported address".to_owned()),
        };
        let mut connection = Self {
            stream,
            buffer: Vec::with_capacity(256),
        };
        for command in &server.handshake {
            match connection.call(command).await? {
                OwnedFrame::SimpleString(_) => {}
                // Redis's refusals (WRONGPASS, NOAUTH, invalid DB index) never quote the password.
                OwnedFrame::Error(e) => return Err(format!("Redis refused the connection: {e}")),
                other => return Err(format!("unexpected answer to the handshake: {other:?}")),
            }
        }
        Ok(connection)
    }

    /// Writes one packed command and reads its reply.
    async fn call(&mut self, command: &[u8]) -> Result<OwnedFrame, String> {
        self.stream
            .write_all(command)
            .await
            .map_err(|e| format!("connection lost: {e}"))?;
        loop {
            let decoded = redis_protocol::resp2::decode::decode(&self.buffer)
                .map_err(|e| format!("unreadable answer from Redis: {e:?}"))?;
            if let Some((frame, used)) = decoded {
                self.buffer.drain(..used);
                return Ok(frame);
            }
            let read = self
                .stream
                .read_buf(&mut self.buffer)
                .await
                .map_err(|e| format!("connection lost: {e}"))?;
            if read == 0 {
                return Err("Redis closed the connection".to_owned());
            }
        }
    }
}

pub struct RedisStore {
    server: Server,
    /// Connections not in use, per thread: a socket belongs to the runtime of the thread that
    /// opened it (the gateway runs one runtime per thread), and using it from another would add
    /// a cross-thread wake-up to every call. A request takes one and gives it back only after a
    /// complete exchange, so a connection in an unknown state (timeout, cancelled request) is
    /// dropped.
    idle: ThreadLocal<Mutex<Vec<Connection>>>,
    /// Set when Redis could not be reached (no connection, or no answer within `timeout_ms`):
    /// decisions then go to `on_error` at once, and one request at a time tries Redis again,
    /// [`RETRY_EVERY`] after the last try failed, so a Redis that is down or hangs neither gets
    /// hammered nor holds every request for `timeout_ms`. (An error Redis answers with costs no
    /// wait: not counted.)
    unreachable: AtomicBool,
    /// Since when it was unreachable, or since when a decision has been trying it again.
    unreachable_at: Mutex<Option<Unreachable>>,
    script: redis::Script,
    timeout: Duration,
    degraded: AtomicBool,
    /// When the last [`RedisStore::probe`] began.
    last_probe: Mutex<Option<Instant>>,
}

/// Redis out of reach, as decisions see it.
#[derive(Clone, Copy)]
struct Unreachable {
    /// When the last try failed, or (`retrying`) when the try now running began.
    since: Instant,
    retrying: bool,
}

/// `/ready` probes Redis at most this often.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// While Redis is unreachable, one request tries it again this often; the others do not wait.
const RETRY_EVERY: Duration = Duration::from_millis(100);

/// Idle connections kept per thread; more are opened under load and closed when handed back.
/// (Per thread: a replica keeps up to this many times its number of threads.)
const MAX_IDLE: usize = 16;

impl RedisStore {
    /// A store at `url`; `password`, if given, is sent instead of any password in `url`.
    pub fn new(url: &str, password: Option<&str>, timeout: Duration) -> Result<Self, String> {
        // The error is not quoted: it may repeat the URL, password included.
        let info = url
            .into_connection_info()
            .map_err(|_| "limits_store.url is not a valid Redis URL".to_owned())?;
        let address = info.addr().clone();
        if !matches!(address, ConnectionAddr::Tcp(..) | ConnectionAddr::Unix(_)) {
            return Err("limits_store.url: TLS (rediss://) is not supported".to_owned());
        }
        let settings = info.redis_settings();
        let mut handshake = Vec::new();
        if let Some(password) = password.or(settings.password()) {
            let mut auth = redis::cmd("AUTH");
            if let Some(username) = settings.username() {
                auth.arg(username);
            }
            handshake.push(auth.arg(password).get_packed_command());
        }
        if settings.db() != 0 {
            handshake.push(redis::cmd("SELECT").arg(settings.db()).get_packed_command());
        }
        Ok(Self {
            server: Server { address, handshake },
            idle: ThreadLocal::new(),
            unreachable: AtomicBool::new(false),
            unreachable_at: Mutex::new(None),
            script: redis::Script::new(SCRIPT),
            timeout,
            degraded: AtomicBool::new(false),
            last_probe: Mutex::new(None),
        })
    }

    /// Whether the last exchange with Redis (a decision, or a [`RedisStore::probe`]) failed.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// This thread's idle connections.
    fn idle(&self) -> MutexGuard<'_, Vec<Connection>> {
        self.idle
            .get_or_default()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops every thread's idle connections: they most likely died with the one that failed
    /// (Redis restarted).
    fn drop_idle(&self) {
        for idle in self.idle.iter() {
            idle.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }

    /// An idle connection (`true`: reused), else a new one.
    async fn connection(&self) -> Result<(Connection, bool), String> {
        let reused = self.idle().pop();
        match reused {
            Some(connection) => Ok((connection, true)),
            None => Ok((Connection::open(&self.server).await?, false)),
        }
    }

    fn unreachable_at(&self) -> MutexGuard<'_, Option<Unreachable>> {
        self.unreachable_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this decision skips Redis: it was unreachable less than [`RETRY_EVERY`] ago, or
    /// another decision is trying it again. Otherwise this decision is the retry, and the others
    /// skip while it runs: it ends within `timeout_ms` (one whose request was dropped midway
    /// never reports, so after that long it counts as over).
    fn skips_redis(&self) -> bool {
        // The atomic first: a healthy limiter takes no lock here.
        if !self.unreachable.load(Ordering::Relaxed) {
            return false;
        }
        let mut at = self.unreachable_at();
        let skips = at.is_some_and(|u| {
            let wait = if u.retrying {
                self.timeout
            } else {
                Duration::ZERO
            };
            u.since.elapsed() < wait + RETRY_EVERY
        });
        if !skips {
            *at = Some(Unreachable {
                since: Instant::now(),
                retrying: true,
            });
        }
        skips
    }

    /// Whether an exchange that began at `started` and succeeded says Redis is back: one that
    /// began before Redis was found unreachable says nothing of now.
    fn answered_since(&self, started: Instant) -> bool {
        if !self.unreachable.load(Ordering::Relaxed) {
            return true;
        }
        let mut at = self.unreachable_at();
        if at.is_some_and(|u| started < u.since) {
            return false;
        }
        *at = None;
        self.unreachable.store(false, Ordering::Relaxed);
        true
    }

    fn record(&self, ok: bool, why: &str) {
        let was_degraded = self.degraded.swap(!ok, Ordering::Relaxed);
        if !ok && !was_degraded {
            warn!(
                error = why,
                "rate limiter degraded: Redis failed; applying limits_store.on_error"
            );
        } else if ok && was_degraded {
            info!("rate limiter recovered: Redis answers again");
        }
    }

    /// Runs the script: `EVALSHA`, or `EVAL` once if this Redis has not seen it yet.
    async fn invoke(
        &self,
        connection: &mut Connection,
        args: &[Vec<u8>],
    ) -> Result<Vec<i64>, String> {
        let mut packed = redis::cmd("EVALSHA")
            .arg(self.script.get_hash())
            .arg(args)
            .get_packed_command();
        let mut reply = connection.call(&packed).await?;
        if matches!(&reply, OwnedFrame::Error(e) if e.starts_with("NOSCRIPT")) {
            packed = redis::cmd("EVAL")
                .arg(SCRIPT)
                .arg(args)
                .get_packed_command();
            reply = connection.call(&packed).await?;
        }
        match reply {
            OwnedFrame::Array(values) => values
                .into_iter()
                .map(|value| match value {
                    OwnedFrame::Integer(n) => Ok(n),
                    other => Err(format!("unexpected value from the script: {other:?}")),
                })
                .collect(),
            OwnedFrame::Error(e) => Err(format!("the script failed: {e}")),
            other => Err(format!("unexpected answer from the script: {other:?}")),
        }
    }

    async fn run(
        &self,
        mode: &str,
        cells: &[(String, Gcra, i64, u64)],
    ) -> Result<Vec<i64>, String> {
        // EVAL's arguments after the script: numkeys, the keys, then ARGV.
        let mut args = vec![cells.len().to_string().into_bytes()];
        for (key, ..) in cells {
            args.push(format!("switchyard:rl:{SCRIPT_VERSION}:{key}").into_bytes());
        }
        args.push(mode.as_bytes().to_vec());
        for (_, gcra, cost, capacity) in cells {
            args.push((gcra.interval_ns as f64 / 1000.0).to_string().into_bytes());
            args.push(capacity.to_string().into_bytes());
            args.push(cost.to_string().into_bytes());
        }
        if self.skips_redis() {
            return Err(format!(
                "Redis is unreachable (tried again every {} ms)",
                RETRY_EVERY.as_millis()
            ));
        }
        let started = Instant::now();
        // Whether the failure was Redis out of reach (no connection), rather than an answer.
        let mut no_connection = false;
        let exchange = async {
            let (mut connection, reused) = self
                .connection()
                .await
                .inspect_err(|_| no_connection = true)?;
            let values = match self.invoke(&mut connection, &args).await {
                // An idle connection may have died with a Redis that restarted since: once more
                // on a new one. (Should the script have run before the connection broke, this
                // request counts twice: the safe side for a limiter.)
                Err(_) if reused => {
                    self.drop_idle();
                    connection = Connection::open(&self.server)
                        .await
                        .inspect_err(|_| no_connection = true)?;
                    self.invoke(&mut connection, &args).await?
                }
                result => result?,
            };
            let mut idle = self.idle();
            if idle.len() < MAX_IDLE {
                idle.push(connection);
            }
            Ok(values)
        };
        let (result, unreachable) = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => (result, no_connection),
            Err(_) => (
                Err(format!("no answer within {} ms", self.timeout.as_millis())),
                true,
            ),
        };
        match &result {
            Ok(_) => {
                if self.answered_since(started) {
                    self.record(true, "");
                }
            }
            Err(why) if unreachable => self.mark_unreachable(why, started),
            Err(why) => {
                // Redis answered (with an error): it is within reach, whatever this retry was.
                self.answered_since(started);
                self.drop_idle();
                self.record(false, why);
            }
        }
        result
    }

    /// Redis could not be reached by an exchange that began at `started`: decisions skip it for
    /// [`RETRY_EVERY`] (unless a retry that began since is running: its outcome is newer).
    fn mark_unreachable(&self, why: &str, started: Instant) {
        {
            let mut at = self.unreachable_at();
            if !at.is_some_and(|u| u.retrying && u.since > started) {
                *at = Some(Unreachable {
                    since: Instant::now(),
                    retrying: false,
                });
            }
        }
        self.unreachable.store(true, Ordering::Relaxed);
        self.drop_idle();
        self.record(false, why);
    }

    /// Asks Redis whether it answers (`PING`) and records what it says: at start-up (an
    /// unreachable Redis or a wrong password shows in the log without waiting for a request) and
    /// for `/ready` (which then tells how Redis is now, without traffic). At most one probe a
    /// [`PROBE_EVERY`]: `/ready` is public, and a probe opens a connection. Calls in between
    /// leave the last outcome as it is.
    pub async fn probe(&self) {
        {
            let mut last = self
                .last_probe
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < PROBE_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let started = Instant::now();
        // On a new connection: a pooled one may have died quietly (an idle timeout), which says
        // nothing of Redis now.
        let ping = async {
            let mut connection = Connection::open(&self.server).await?;
            match connection
                .call(&redis::cmd("PING").get_packed_command())
                .await?
            {
                OwnedFrame::Error(e) => Err(format!("PING failed: {e}")),
                _ => Ok(connection),
            }
        };
        match tokio::time::timeout(self.timeout, ping).await {
            Ok(Ok(connection)) => {
                let mut idle = self.idle();
                if idle.len() < MAX_IDLE {
                    idle.push(connection);
                }
                drop(idle);
                // A PING answers for a Redis out of reach, not for the errors Redis answers a
                // decision with (READONLY, OOM): those stay until a decision succeeds.
                if self.unreachable.load(Ordering::Relaxed) && self.answered_since(started) {
                    self.record(true, "");
                }
            }
            Ok(Err(why)) => self.mark_unreachable(&why, started),
            Err(_) => self.mark_unreachable(
                &format!("no answer within {} ms", self.timeout.as_millis()),
                started,
            ),
        }
    }

    pub async fn acquire(&self, cells: &[Cell]) -> Result<Decision, String> {
        let args: Vec<(String, Gcra, i64, u64)> = cells
            .iter()
            .map(|c| {
                (
                    c.key.clone(),
                    c.gcra,
                    i64::try_from(c.gcra.admissible(c.cost)).unwrap_or(i64::MAX),
                    c.gcra.capacity,
                )
            })
            .collect();
        let values = self.run("take", &args).await?;
        let number = |i: usize| values.get(i).copied().unwrap_or(0).max(0).unsigned_abs();
        let states = cells
            .iter()
            .enumerate()
            .map(|(i, c)| CellState {
                capacity: c.gcra.capacity,
                remaining: number(2 + 3 * i),
                reset: Duration::from_micros(number(3 + 3 * i)),
                refused: number(4 + 3 * i) == 1,
            })
            .collect();
        if number(0) == 1 {
            Ok(Decision::Allowed(states))
        } else {
            Ok(Decision::Denied {
                retry_after: Duration::from_micros(number(1)),
                states,
            })
        }
    }

    pub async fn adjust(&self, key: &str, gcra: Gcra, delta: i64) -> Result<(), String> {
        self.run("adjust", &[(key.to_owned(), gcra, delta, gcra.capacity)])
            .await
            .map(|_| ())
    }
}
