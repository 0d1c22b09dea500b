//! `sse-load`: an open-loop, fixed-rate load client that measures time to first byte and to last
//! byte of each response, built for SSE streams (oha only sees the whole response).
//!
//! Requests are *scheduled* at `start + i / rate` and every latency is measured from the
//! scheduled instant, not from when the request actually went out. A server that stalls
//! therefore shows its stall in every request that should have been sent meanwhile: this is
//! the coordinated-omission correction of wrk2 and `oha --latency-correction`. The schedule
//! runs on a plain OS thread with `std::thread::sleep` (about 60 µs precision on Linux) because
//! tokio's timer wheel rounds to whole milliseconds, which would blur sub-millisecond figures.
//!
//! Prints one JSON object: counts, achieved rate and the raw per-request samples in
//! microseconds (`ttfb_us`, `ttlb_us`, successful requests only), so the caller can merge
//! interleaved rounds before taking percentiles.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "sse-load",
    about = "Fixed-rate load client measuring time to first and last byte"
)]
struct Args {
    /// Full URL to POST to, e.g. http://127.0.0.1:9100/v1/chat/completions.
    #[arg(long)]
    url: String,
    /// Requests per second, scheduled evenly.
    #[arg(long)]
    rate: f64,
    /// Seconds of load.
    #[arg(long)]
    duration: f64,
    /// JSON request body.
    #[arg(long)]
    body: String,
    /// A response counts as a success only if its body ends with `data: [DONE]`.
    #[arg(long)]
    expect_done: bool,
    /// Per-request deadline in seconds; a request past it is a failure.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Tokio worker threads for the client.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// One finished request.
struct Sample {
    ok: bool,
    ttfb: Duration,
    ttlb: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.rate > 0.0 && args.duration > 0.0,
        "--rate and --duration must be positive"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .build()
        .context("cannot build the HTTP client")?;
    let body = Bytes::from(args.body.clone());
    let timeout = Duration::from_secs_f64(args.timeout);
    // Truncation is intended: a fractional last request is not sent.
    let total = (args.rate * args.duration) as u64;
    let interval = Duration::from_secs_f64(1.0 / args.rate);

    // A few unmeasured requests open connections first.
    runtime.block_on(async {
        for _ in 0..4 {
            let _ = one(
                &client,
                &args.url,
                body.clone(),
                Instant::now(),
                timeout,
                false,
            )
            .await;
        }
    });

    let start = Instant::now() + Duration::from_millis(20);
    let mut handles = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        let now = Instant::now();
        if scheduled > now {
            std::thread::sleep(scheduled - now);
        }
        let client = client.clone();
        let url = args.url.clone();
        let body = body.clone();
        let expect_done = args.expect_done;
        handles.push(
            runtime.spawn(async move {
                one(&client, &url, body, scheduled, timeout, expect_done).await
            }),
        );
    }
    let samples: Vec<Sample> = runtime.block_on(async {
        let mut samples = Vec::with_capacity(handles.len());
        for handle in handles {
            if let Ok(sample) = handle.await {
                samples.push(sample);
            }
        }
        samples
    });
    let elapsed = start.elapsed().as_secs_f64();
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    let report = json!({
        "sent": total,
        "ok": ok.len(),
        "failed": total as usize - ok.len(),
        "elapsed_s": elapsed,
        "achieved_rps": ok.len() as f64 / elapsed,
        "ttfb_us": ok.iter().map(|s| micros(s.ttfb)).collect::<Vec<_>>(),
        "ttlb_us": ok.iter().map(|s| micros(s.ttlb)).collect::<Vec<_>>(),
    });
    println!("{report}");
    Ok(())
}

/// Sends one request and reads its body to the end; times are measured from `scheduled`.
async fn one(
    client: &reqwest::Client,
    url: &str,
    body: Bytes,
    scheduled: Instant,
    timeout: Duration,
    expect_done: bool,
) -> Sample {
    let work = async {
        let mut response = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await?;
        let status_ok = response.status().is_success();
        let mut first = None;
        // The last bytes of the body, enough to recognise `data: [DONE]\n\n`.
        let mut tail: Vec<u8> = Vec::with_capacity(64);
        while let Some(piece) = response.chunk().await? {
            if first.is_none() {
                first = Some(Instant::now());
            }
            tail.extend_from_slice(&piece);
            if tail.len() > 32 {
                tail.drain(..tail.len() - 32);
            }
        }
        let end = Instant::now();
        let done = tail.trim_ascii_end().ends_with(b"data: [DONE]");
        Ok::<_, reqwest::Error>((
            status_ok && (done || !expect_done),
            first.unwrap_or(end),
            end,
        ))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok((ok, first, end))) => Sample {
            ok,
            ttfb: first.saturating_duration_since(scheduled),
            ttlb: end.saturating_duration_since(scheduled),
        },
        _ => Sample {
            ok: false,
            ttfb: timeout,
            ttlb: timeout,
        },
    }
}
