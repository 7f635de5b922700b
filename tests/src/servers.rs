//! Small TCP servers that run on threads inside a namespace: backends for the tests
//! and the demo.
use std::{
    io::{self, BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{BedError, Netns};

/// What a server does with each accepted connection.
pub type Handler = Arc<dyn Fn(TcpStream) + Send + Sync + 'static>;

/// A server thread; stopped and joined on drop.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on `addr` inside `ns` and runs `handler` on a thread per connection.
    pub fn start(ns: &Netns, addr: SocketAddr, handler: Handler) -> Result<Self, BedError> {
        let listener = ns
            .run(move || {
                let l = TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                io::Result::Ok(l)
            })?
            .map_err(|source| BedError::Spawn {
                cmd: format!("bind {addr}"),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| BedError::Spawn {
            cmd: "local_addr".into(),
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (stop2, accepted2) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        accepted2.fetch_add(1, Ordering::Relaxed);
                        let _ = stream.set_nonblocking(false);
                        let h = handler.clone();
                        std::thread::spawn(move || h(stream));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers every line with `NAME: LINE`, so a client sees which backend it reached.
pub fn named_echo(name: &str) -> Handler {
    let name = name.to_owned();
    Arc::new(move |stream: TcpStream| {
        let Ok(mut out) = stream.try_clone() else {
            return;
        };
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if writeln!(out, "{name}: {line}").is_err() {
                break;
            }
        }
    })
}

/// Echoes every byte back until EOF, then closes its write side.
pub fn echo() -> Handler {
    Arc::new(|mut stream: TcpStream| {
        let Ok(mut out) = stream.try_clone() else {
            return;
        };
        let _ = io::copy(&mut stream, &mut out);
        let _ = out.shutdown(std::net::Shutdown::Write);
    })
}

/// Writes `banner` first (a server-first protocol), then echoes.
pub fn banner_echo(banner: &'static [u8]) -> Handler {
    Arc::new(move |mut stream: TcpStream| {
        if stream.write_all(banner).is_err() {
            return;
        }
        echo()(stream);
    })
}

/// Waits for one byte of request, answers with its name and closes: one short
/// exchange per connection.
pub fn name_and_close(name: &str) -> Handler {
    let name = name.to_owned();
    Arc::new(move |mut stream: TcpStream| {
        let mut request = [0u8; 1];
        if io::Read::read(&mut stream, &mut request).unwrap_or(0) == 0 {
            return;
        }
        let _ = stream.write_all(name.as_bytes());
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 64];
        let _ = io::Read::read(&mut stream, &mut sink);
    })
}
