//! `redis-rtt`: paced round trips to Redis from a tokio current-thread runtime (the gateway's
//! kind of event loop), optionally touching memory between two calls the way a gateway's other
//! work per request does, to see what the round trip costs on cold caches.
//!
//! Sends `PING`, or `EVALSHA` of an already loaded script with the arguments of one
//! rate-limit decision (the gateway's limiter script takes `1 KEY take INTERVAL CAPACITY COST`),
//! once per tick, and prints the p50 and p90 of the send alone and of the whole exchange.
//! `--threads N` makes the calls from N threads, each with its own runtime and connection and a
//! share of the rate, as the gateway's event loops (one per core) make theirs.
//!
//!   redis-rtt --port 6379                         # PING, hot loop
//!   redis-rtt --port 6379 --sha <SHA> --touch-mb 8  # the limiter's script, 8 MB touched per call
//!   redis-rtt --port 6379 --sha <SHA> --threads 2   # from two event loops, half the rate each

use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(
    name = "redis-rtt",
    about = "Paced Redis round trips, hot or on cold caches"
)]
struct Args {
    /// Redis port on 127.0.0.1.
    #[arg(long)]
    port: u16,
    /// SHA1 of a loaded script to call with one "take" decision; PING without it.
    #[arg(long)]
    sha: Option<String>,
    /// Round trips per second (from all threads together).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    /// Round trips in all.
    #[arg(long, default_value_t = 3000)]
    count: usize,
    /// Megabytes written (one byte per cache line) before each round trip; 0: none.
    #[arg(long, default_value_t = 0)]
    touch_mb: usize,
    /// Threads making the calls, each on its own runtime and connection at rate / threads,
    /// their calls spaced evenly between each other's (with more than one thread, at most 1000
    /// calls a second in all: tokio's timers round to whole milliseconds, so faster calls from
    /// several threads would bunch).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    threads: u32,
}

/// Where the threads meet once connected, and the instant their ticks count from.
struct Start {
    connected: Barrier,
    at: OnceLock<tokio::time::Instant>,
}

/// The send alone and the whole exchange of each round trip.
type Samples = (Vec<Duration>, Vec<Duration>);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let threads = args.threads;
    if threads > 1 && args.rate > 1000 {
        bail!("--threads above 1 takes --rate up to 1000 (tokio's timers round to 1 ms)");
    }
    // Thread i calls at ticks i, i + threads, i + 2 × threads … of the whole rate, counted
    // from when every thread has connected, so the threads together keep the rate and do not
    // call at the same instant.
    let tick = Duration::from_secs(1) / args.rate;
    let start = Arc::new(Start {
        connected: Barrier::new(threads as usize),
        at: OnceLock::new(),
    });
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let (port, sha, touch_mb, start) =
                (args.port, args.sha.clone(), args.touch_mb, start.clone());
            // The first threads take what does not divide evenly.
            let count = args.count / threads as usize
                + usize::from((i as usize) < args.count % threads as usize);
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(async {
                        let redis = connect(port).await;
                        start.connected.wait();
                        let first = *start
                            .at
                            .get_or_init(|| tokio::time::Instant::now() + Duration::from_millis(1))
                            + tick * i;
                        run(redis?, sha, first, tick * threads, count, touch_mb).await
                    })
            })
        })
        .collect();
    let (mut sends, mut exchanges) = (Vec::new(), Vec::new());
    for worker in workers {
        let (s, e) = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a thread panicked"))??;
        sends.extend(s);
        exchanges.extend(e);
    }
    if exchanges.is_empty() {
        bail!("--count 0: nothing measured");
    }
    let quantiles = |samples: &mut Vec<Duration>| {
        samples.sort();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
        format!("p50 {:.3} ms, p90 {:.3} ms", at(0.5), at(0.9))
    };
    println!(
        "{} round trips at {}/s from {threads} thread(s), {} MB touched before each: send {}; \
         whole exchange {}",
        exchanges.len(),
        args.rate,
        args.touch_mb,
        quantiles(&mut sends),
        quantiles(&mut exchanges),
    );
    Ok(())
}

fn command(parts: &[&str]) -> Vec<u8> {
    let mut packed = format!("*{}\r\n", parts.len()).into_bytes();
    for part in parts {
        packed.extend(format!("${}\r\n{part}\r\n", part.len()).into_bytes());
    }
    packed
}

async fn connect(port: u16) -> anyhow::Result<tokio::net::TcpStream> {
    let redis = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .context("connecting to Redis")?;
    redis.set_nodelay(true)?;
    Ok(redis)
}

/// `count` round trips on `redis`, the first at `first`, then one every `tick`.
async fn run(
    mut redis: tokio::net::TcpStream,
    sha: Option<String>,
    first: tokio::time::Instant,
    tick: Duration,
    count: usize,
    touch_mb: usize,
) -> anyhow::Result<Samples> {
    let packed = match &sha {
        Some(sha) => command(&[
            "EVALSHA",
            sha,
            "1",
            "switchyard:rl:redis-rtt",
            "take",
            "1",
            "100000000",
            "1",
        ]),
        None => command(&["PING"]),
    };
    let mut touched = vec![0u8; touch_mb << 20];
    let mut reply = vec![0u8; 512];
    let (mut sends, mut exchanges) = (Vec::new(), Vec::new());
    let mut next = first;
    for _ in 0..count {
        tokio::time::sleep_until(next).await;
        next += tick;
        for byte in touched.iter_mut().step_by(64) {
            *byte = byte.wrapping_add(1);
        }
        std::hint::black_box(&touched);
        let start = Instant::now();
        redis.write_all(&packed).await?;
        sends.push(start.elapsed());
        let read = redis.read(&mut reply).await?;
        exchanges.push(start.elapsed());
        match &reply[..read] {
            [] => bail!("Redis closed the connection"),
            [b'-', ..] => bail!("Redis refused: {}", String::from_utf8_lossy(&reply[..read])),
            _ => {}
        }
    }
    Ok((sends, exchanges))
}
