//! The forward path's backend selection table of a listener: [`FWD_SLOTS`] slots, each
//! holding the index of a backend, filled in proportion to the backends' weights.
//!
//! The slots are filled in Maglev's population order (Eisenbud et al., NSDI 2016): each
//! backend has its own permutation of the slots, derived from its identity (address and
//! port, or the backendRef of an invalid one), and backends take turns claiming the
//! next free slot of their permutation, each as often as its weight says. A backend that
//! comes or goes therefore moves few slots of the others, and every node computes the
//! same table from the same backends, so a client hashes to the same backend on every
//! node. A backend of weight 0 gets no slot; when no backend has a weight the table is
//! empty (`filled == 0`) and the forward program refuses every SYN.
use gateway_common::{FWD_SLOTS, SlotTable};

use crate::desired::Backend;

/// FNV-1a of `bytes`, then a 32-bit mix: a stable hash with no per-process seed.
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// The identity a backend's permutation is derived from.
fn identity(b: &Backend) -> Vec<u8> {
    match b.addr {
        Some(a) => a.to_string().into_bytes(),
        None => format!("invalid:{}", b.backend_ref).into_bytes(),
    }
}

/// The selection table for `backends` (index in the list = index in `GW_BACKENDS`).
pub fn table(backends: &[Backend]) -> SlotTable {
    let m = FWD_SLOTS as u64;
    let max_w = backends.iter().map(|b| b.weight).max().unwrap_or(0);
    let mut t = SlotTable::default();
    if max_w == 0 {
        return t;
    }
    // (offset, skip, next) per backend; skip is odd, so it is coprime with the
    // power-of-two slot count and the permutation visits every slot.
    let mut perm: Vec<(u64, u64, u64)> = backends
        .iter()
        .map(|b| {
            let id = identity(b);
            (hash(&id, 1) % m, (hash(&id, 2) % m) | 1, 0)
        })
        .collect();
    let mut credit = vec![0f64; backends.len()];
    let mut taken = vec![false; FWD_SLOTS];
    let mut filled = 0usize;
    while filled < FWD_SLOTS {
        for (i, b) in backends.iter().enumerate() {
            if b.weight == 0 {
                continue;
            }
            credit[i] += f64::from(b.weight) / f64::from(max_w);
            while credit[i] >= 1.0 && filled < FWD_SLOTS {
                credit[i] -= 1.0;
                let (offset, skip, next) = &mut perm[i];
                loop {
                    let slot = ((*offset + *next * *skip) % m) as usize;
                    *next += 1;
                    if !taken[slot] {
                        taken[slot] = true;
                        t.slots[slot] = i as u8;
                        filled += 1;
                        break;
                    }
                }
            }
        }
    }
    t.filled = FWD_SLOTS as u32;
    t
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn backend(addr: &str, weight: u32) -> Backend {
        Backend {
            addr: Some(addr.parse::<SocketAddr>().expect("address")),
            weight,
            backend_ref: "default/svc:80".into(),
            endpoint_slice: None,
        }
    }

    fn shares(t: &SlotTable, n: usize) -> Vec<usize> {
        let mut s = vec![0; n];
        for &i in &t.slots {
            s[usize::from(i)] += 1;
        }
        s
    }

    #[test]
    fn slots_follow_the_weights() {
        let b = [
            backend("10.0.0.1:80", 70),
            backend("10.0.0.2:80", 30),
            backend("10.0.0.3:80", 0),
        ];
        let t = table(&b);
        assert_eq!(t.filled, FWD_SLOTS as u32);
        let s = shares(&t, 3);
        assert_eq!(s[2], 0, "weight 0 is never picked");
        // 70 % of 1024 slots is 716.8.
        assert!(
            (710..=724).contains(&s[0]),
            "70% weight holds {} of 1024 slots",
            s[0]
        );
    }

    #[test]
    fn no_weight_no_slots() {
        assert_eq!(table(&[backend("10.0.0.1:80", 0)]).filled, 0);
        assert_eq!(table(&[]).filled, 0);
    }

    #[test]
    fn invalid_backend_keeps_its_share() {
        let mut b = vec![backend("10.0.0.1:80", 1), backend("10.0.0.2:80", 1)];
        b[1].addr = None;
        let s = shares(&table(&b), 2);
        assert_eq!(s[0], FWD_SLOTS / 2);
        assert_eq!(s[1], FWD_SLOTS / 2);
    }

    #[test]
    fn a_new_backend_moves_few_slots() {
        let before: Vec<Backend> = (1..=4)
            .map(|i| backend(&format!("10.0.0.{i}:80"), 1))
            .collect();
        let mut after = before.clone();
        after.push(backend("10.0.0.5:80", 1));
        let (a, b) = (table(&before), table(&after));
        let moved_between_old = a
            .slots
            .iter()
            .zip(&b.slots)
            .filter(|(x, y)| x != y && usize::from(**y) < 4)
            .count();
        // Maglev moves some slots between the old backends too, but far fewer than a
        // reshuffle (which would move about three quarters of them).
        assert!(
            moved_between_old < FWD_SLOTS / 8,
            "{moved_between_old} slots moved between backends that stayed"
        );
    }

    #[test]
    fn same_input_same_table() {
        let b = [backend("10.0.0.1:80", 3), backend("[fd00::2]:80", 1)];
        assert_eq!(table(&b), table(&b));
    }
}
