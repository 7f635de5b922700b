//! Data path end-to-end tests: both paths, correct to the last byte, in the
//! network-namespace bed. The path taken is asserted from the counters.
mod common;

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr},
    time::Duration,
};

use common::{Agent, connect, exchange, require_root};
use netbed::{Bed, servers};

fn echo_bed() -> (Bed, servers::Server) {
    let bed = Bed::new(1).expect("bed");
    let server = servers::Server::start(
        bed.backend(0),
        SocketAddr::new(bed.backend_addr(0).into(), 3001),
        servers::named_echo("foo"),
    )
    .expect("backend");
    (bed, server)
}

fn listener_addr(bed: &Bed, port: u16) -> SocketAddr {
    SocketAddr::new(bed.node_addr().into(), port)
}

#[test]
fn kernel_path_echo_and_counters() {
    require_root();
    let (bed, _server) = echo_bed();
    let route = format!("8088={}:3001", bed.backend_addr(0));
    let agent = Agent::start(&bed, &["--route", &route, "--datapath", "sockmap"], &[8088]);
    let addr = listener_addr(&bed, 8088);
    let reply = bed
        .client()
        .run(move || {
            let mut s = connect(addr).expect("connect");
            let a = exchange(&mut s, "hello\n");
            let b = exchange(&mut s, "again\n");
            (a, b)
        })
        .expect("client");
    assert_eq!(reply.0, "foo: hello\n");
    assert_eq!(reply.1, "foo: again\n");
    let stats = agent.stats(8088);
    assert_eq!(stats["accepted"], 1, "{stats}");
    assert_eq!(stats["kernel_connections"], 1, "{stats}");
    assert_eq!(stats["userspace_connections"], 0, "{stats}");
    assert_eq!(stats["bytes_client_to_backend_kernel"], 12, "{stats}");
    assert_eq!(stats["bytes_backend_to_client_kernel"], 22, "{stats}");
}
