//! The soak's backend: a separate process per backend namespace (this same executable,
//! started with [`ENV`] set), so that the soak can kill it with SIGKILL and start it
//! again as it would a real server. It speaks a one-byte protocol chosen by the client:
//!
//! * [`SHORT`]: writes its name and a newline, closes its write side, reads to EOF.
//! * [`ECHO`]: echoes every byte until EOF, then closes its write side (the client
//!   half-closes first; the echo keeps flowing after it).
//! * [`DOWNLOAD`] + length + seed (little-endian `u64`s): writes that many bytes of the
//!   seed's stream, closes its write side first (the server half-closes), then reads
//!   until the client closes.
//! * [`RESET`]: closes at once with `SO_LINGER` 0, so the client gets a reset.
use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Stdio},
};

use super::stream;
use crate::{BedError, Netns};

/// The variable that makes this executable a soak backend: `NAME,ADDR`.
pub const ENV: &str = "NETBED_SOAK_BACKEND";

/// Modes (the first byte a client sends).
pub const SHORT: u8 = b'S';
pub const ECHO: u8 = b'E';
pub const DOWNLOAD: u8 = b'D';
pub const RESET: u8 = b'X';

/// When this process was started as a soak backend ([`ENV`] set), serves until killed
/// and never returns; otherwise returns at once. Call it first in `main` of every
/// executable that runs the soak.
pub fn serve_if_asked() {
    let Ok(spec) = std::env::var(ENV) else {
        return;
    };
    let Some((name, addr)) = spec
        .split_once(',')
        .and_then(|(n, a)| Some((n.to_owned(), a.parse::<SocketAddr>().ok()?)))
    else {
        eprintln!("soak backend: {ENV}={spec} is not NAME,ADDR");
        std::process::exit(2);
    };
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("soak backend {name}: bind {addr}: {e}");
            std::process::exit(1);
        }
    };
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = handle(&name, stream);
        });
    }
    std::process::exit(0);
}

/// Sets `SO_LINGER` 0: the last close of `s` sends a reset.
pub fn linger_zero(s: &TcpStream) -> io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &l).map_err(io::Error::from)
}

fn handle(name: &str, mut s: TcpStream) -> io::Result<()> {
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode)?;
    match mode[0] {
        SHORT => {
            s.write_all(format!("{name}\n").as_bytes())?;
            s.shutdown(std::net::Shutdown::Write)?;
            drain(&mut s)
        }
        ECHO => {
            let mut out = s.try_clone()?;
            io::copy(&mut s, &mut out)?;
            out.shutdown(std::net::Shutdown::Write)
        }
        DOWNLOAD => {
            let mut head = [0u8; 16];
            s.read_exact(&mut head)?;
            let len = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
            let seed = u64::from_le_bytes(head[8..].try_into().unwrap_or_default());
            let mut buf = vec![0u8; 64 * 1024];
            let mut off = 0;
            while off < len {
                let n = (len - off).min(buf.len() as u64) as usize;
                stream::fill(seed, off, &mut buf[..n]);
                s.write_all(&buf[..n])?;
                off += n as u64;
            }
            s.shutdown(std::net::Shutdown::Write)?;
            drain(&mut s)
        }
        RESET => linger_zero(&s),
        _ => Ok(()),
    }
}

fn drain(s: &mut TcpStream) -> io::Result<()> {
    let mut sink = [0u8; 4096];
    while s.read(&mut sink)? > 0 {}
    Ok(())
}

/// A backend process inside a namespace; killed (SIGKILL) on drop.
pub struct Process {
    name: String,
    addr: SocketAddr,
    child: Option<Child>,
}

impl Process {
    /// Starts backend `name` on `addr` inside `ns` (this executable again).
    pub fn start(ns: &Netns, name: &str, addr: SocketAddr) -> Result<Self, BedError> {
        let mut p = Self {
            name: name.to_owned(),
            addr,
            child: None,
        };
        p.restart(ns)?;
        Ok(p)
    }

    /// Starts the process again (after [`Process::kill`]).
    pub fn restart(&mut self, ns: &Netns) -> Result<(), BedError> {
        self.kill();
        let exe = std::env::current_exe().map_err(|source| BedError::Spawn {
            cmd: "current_exe".into(),
            source,
        })?;
        let mut cmd = ns.command(&exe);
        cmd.env(ENV, format!("{},{}", self.name, self.addr))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: prctl is async-signal-safe; the backend dies with the soak.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| BedError::Spawn {
            cmd: format!("{} as backend {}", exe.display(), self.name),
            source,
        })?;
        self.child = Some(child);
        Ok(())
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process is running (it exits at once when it cannot bind).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
