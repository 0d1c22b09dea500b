//! The least an HTTP/1 proxy on Switchyard's stack can do: hyper's server and hyper-util's
//! client, one single-threaded runtime per thread, every POST forwarded to one upstream URL as
//! it came, the answer passed back as it came. No routing, parsing, auth, limits, metrics or
//! logs. `bench/floor.sh` measures it next to nginx, HAProxy and Switchyard: what the Rust
//! HTTP stack itself costs on this machine, before any gateway logic.
//!
//!   bare-proxy --listen 127.0.0.1:19302 --upstream http://127.0.0.1:19300/v1/chat/completions

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    /// Where every request goes (http only).
    #[arg(long)]
    upstream: hyper::Uri,
    /// Event-loop threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

type Upstream = Client<HttpConnector, Full<Bytes>>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = std::net::TcpListener::bind(args.listen).context("bind")?;
    // A blocking accept loop hands connections to the threads in turn (as Switchyard does).
    let threads: Vec<_> = (0..args.threads.max(1))
        .map(|_| {
            let (sender, connections) = tokio::sync::mpsc::unbounded_channel();
            let upstream = args.upstream.clone();
            std::thread::spawn(move || serve(connections, upstream));
            sender
        })
        .collect();
    for thread in threads.iter().cycle() {
        let (stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        thread.send(stream)?;
    }
    Ok(())
}

/// Serves the connections it is given on its own single-threaded runtime.
fn serve(
    mut connections: tokio::sync::mpsc::UnboundedReceiver<std::net::TcpStream>,
    upstream: hyper::Uri,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client: Upstream = Client::builder(TokioExecutor::new()).build_http();
        while let Some(stream) = connections.recv().await {
            let stream = tokio::net::TcpStream::from_std(stream)?;
            let (client, upstream) = (client.clone(), upstream.clone());
            tokio::spawn(async move {
                let service =
                    service_fn(move |request| forward(client.clone(), upstream.clone(), request));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
        anyhow::Ok(())
    })
}

async fn forward(
    client: Upstream,
    upstream: hyper::Uri,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let answer = async {
        let (parts, body) = request.into_parts();
        let body = body.collect().await?.to_bytes();
        let mut outgoing = Request::post(upstream).body(Full::new(body))?;
        *outgoing.headers_mut() = parts.headers;
        outgoing.headers_mut().remove(hyper::header::HOST);
        let response = client.request(outgoing).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        anyhow::Ok(Response::from_parts(parts, Full::new(body)))
    };
    Ok(answer.await.unwrap_or_else(|error| {
        let mut response = Response::new(Full::new(Bytes::from(error.to_string())));
        *response.status_mut() = StatusCode::BAD_GATEWAY;
        response
    }))
}
