//! The agent's access log as the end-to-end tests read it: the JSON records of a log
//! file, waited for (bounded) and grouped by client port, the port a test knows its
//! connections by.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

/// How long [`records`] waits for the records it is asked for.
const WAIT: Duration = Duration::from_secs(15);

/// The records in `path` once it holds at least `n` (at most 15 s).
///
/// # Panics
///
/// When a line is not JSON, or fewer than `n` records are there in time.
pub fn records(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let recs: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
            .collect();
        if recs.len() >= n {
            return recs;
        }
        assert!(
            Instant::now() < deadline,
            "{} holds {} records, expected {n}:\n{text}",
            path.display(),
            recs.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The client port of a record.
///
/// # Panics
///
/// When the record has no `client` address.
pub fn client_port(r: &serde_json::Value) -> u16 {
    r["client"]
        .as_str()
        .and_then(|c| c.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| panic!("record without client: {r}"))
        .port()
}

/// Every record by client port, in the order of the log.
///
/// # Panics
///
/// When a record has no `client` address.
pub fn all_by_client_port(recs: &[serde_json::Value]) -> BTreeMap<u16, Vec<serde_json::Value>> {
    let mut by_port = BTreeMap::<u16, Vec<serde_json::Value>>::new();
    for r in recs {
        by_port.entry(client_port(r)).or_default().push(r.clone());
    }
    by_port
}

/// The record of each client port, one per connection.
///
/// # Panics
///
/// When a record has no `client` address, or a client port has two records.
pub fn by_client_port(recs: &[serde_json::Value]) -> BTreeMap<u16, serde_json::Value> {
    all_by_client_port(recs)
        .into_iter()
        .map(|(port, mut list)| {
            assert_eq!(list.len(), 1, "one record of client port {port}: {list:?}");
            (port, list.remove(0))
        })
        .collect()
}
