//! The bytes of the soak's hashed transfers: a stream generated from a seed (so the
//! sender needs no buffer of it) and a streaming hash (so the receiver keeps none).
//! Both sides hash what they wrote or read; equal hashes and lengths mean every byte
//! arrived intact and in order.

/// Fills `buf` with the bytes at `offset..offset + buf.len()` of the stream of `seed`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = offset + i as u64;
        let word = splitmix(seed ^ (pos >> 3));
        *b = word.to_le_bytes()[(pos & 7) as usize];
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A streaming FNV-1a hash over 8-byte words (the tail padded), independent of how the
/// bytes were split into reads.
#[derive(Clone, Debug)]
pub struct Hasher {
    state: u64,
    pending: [u8; 8],
    len: u64,
}

impl Default for Hasher {
    fn default() -> Self {
        Self {
            state: 0xcbf2_9ce4_8422_2325,
            pending: [0; 8],
            len: 0,
        }
    }
}

impl Hasher {
    /// Adds `data`.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let at = (self.len & 7) as usize;
            if at == 0 && data.len() >= 8 {
                let (words, rest) = data.split_at(data.len() & !7);
                for w in words.chunks_exact(8) {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(w);
                    self.mix(u64::from_le_bytes(word));
                }
                self.len += words.len() as u64;
                data = rest;
                continue;
            }
            let take = (8 - at).min(data.len());
            self.pending[at..at + take].copy_from_slice(&data[..take]);
            self.len += take as u64;
            data = &data[take..];
            if self.len.trailing_zeros() >= 3 {
                self.mix(u64::from_le_bytes(self.pending));
            }
        }
    }

    fn mix(&mut self, word: u64) {
        self.state = (self.state ^ word).wrapping_mul(0x0000_0100_0000_01b3);
        self.state ^= self.state >> 29;
    }

    /// Bytes added so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The hash of everything added (length included).
    pub fn finish(&self) -> u64 {
        let mut h = self.clone();
        let at = (h.len & 7) as usize;
        if at != 0 {
            h.pending[at..].fill(0);
            h.mix(u64::from_le_bytes(h.pending));
        }
        h.mix(self.len);
        h.state
    }
}

/// The hash of `len` bytes of the stream of `seed`.
pub fn hash_of(seed: u64, len: u64) -> u64 {
    let mut h = Hasher::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        fill(seed, off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_does_not_depend_on_the_split() {
        let mut data = vec![0u8; 1000];
        fill(7, 0, &mut data);
        let mut whole = Hasher::default();
        whole.update(&data);
        for split in [1, 3, 7, 8, 9, 500, 999] {
            let mut h = Hasher::default();
            for part in data.chunks(split) {
                h.update(part);
            }
            assert_eq!(h.finish(), whole.finish(), "split {split}");
        }
        assert_eq!(whole.finish(), hash_of(7, 1000));
    }

    #[test]
    fn hash_sees_a_changed_or_missing_byte() {
        let mut data = vec![0u8; 4096];
        fill(1, 0, &mut data);
        let mut h = Hasher::default();
        h.update(&data);
        let good = h.finish();
        data[100] ^= 1;
        let mut h = Hasher::default();
        h.update(&data);
        assert_ne!(h.finish(), good);
        let mut h = Hasher::default();
        h.update(&data[..4095]);
        assert_ne!(h.finish(), hash_of(1, 4096));
    }

    #[test]
    fn fill_at_an_offset_continues_the_stream() {
        let mut whole = [0u8; 100];
        fill(3, 0, &mut whole);
        let mut tail = [0u8; 37];
        fill(3, 63, &mut tail);
        assert_eq!(&whole[63..], &tail);
    }
}
