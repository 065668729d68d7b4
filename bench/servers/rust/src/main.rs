//! echo_tokio: a TCP echo server on tokio, the peer a Rust engineer would write: the
//! multi-threaded runtime as `#[tokio::main]` builds it (one worker per CPU the process may
//! run on: one, pinned), a task per connection, read then write_all of a 16 KiB buffer.
//!
//! Usage: echo_tokio --port 0 [--backlog 511]
//! Prints {"event": "listening", "address": "127.0.0.1:PORT"} once bound.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn option(args: &[String], name: &str, default: u32) -> u32 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port = option(&args, "--port", 0) as u16;
    let backlog = option(&args, "--backlog", 511);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(serve(port, backlog));
}

async fn serve(port: u16, backlog: u32) {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let socket = TcpSocket::new_v4().expect("a socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(addr).expect("bind");
    let listener = socket.listen(backlog).expect("listen");
    let bound = listener.local_addr().expect("the bound address");
    println!("{{\"event\": \"listening\", \"address\": \"{}\"}}", bound);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(echo(stream));
            }
            Err(e) => {
                // EMFILE and the like: wait a little rather than spin.
                eprintln!("accept: {}", e);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn echo(mut stream: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
