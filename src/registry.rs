//! Registry: every open stream, in a sharded slab addressed by the stream's token.
//!
//! Owns the token → stream mapping and nothing else: it does not queue frames, send callbacks or end
//! streams. `SHARDS` slabs each sit behind their own `parking_lot::Mutex`; a token's first 32 bits
//! carry its shard (low `SHARD_BITS`) and slot (the rest), see [`crate::token`], so a lookup is one
//! shard lock, one slab index and a 128-bit compare, and no lock is ever held across `.await` or I/O.
//! A per-shard `HashMap<Token, slot>` was the alternative; folding the address into the token costs
//! 32 of the UUID's 122 random bits (90 remain) and saves a map entry (~40 B) and a hash per lookup.
//!
//! # Memory budget per idle stream (x86-64)
//! Measured: 1.2 KiB per idle stream, the gateway's PSS slope from 1k to 18k streams
//! (`sse-load density`, BENCHMARKS.md); a counting allocator put ~1.05 KiB of live heap per stream.
//! | item | bytes | why |
//! | --- | --- | --- |
//! | slab slot | 16 | `Entry` enum around one `Arc` pointer |
//! | `Arc<Stream>` | 224 | 16 of counts + 208 of `Stream` (token, request `Bytes`, queue, waker, membership map) in mimalloc's 224 B bin |
//! | request copy | ~100–900 | target and headers as the browser sent them, kept for the disconnect callback (compact form, never larger than the head, so `MAX_HEADER_BYTES` bounds it) |
//! | queue ring | 128 | `VecDeque` of four 32-byte `Bytes`, allocated by the first heartbeat, kept while idle |
//! | writer task | ~320 | tokio task cell around the 144 B `StreamWriter` future |
//! | socket registration | ~256 | tokio's cache-line-aligned `ScheduledIo` for the socket |
//! | channel membership | 0, or ~40 per channel | (name, slot) in the stream's map + one slot in the channel's slab |
//! Not counted: the kernel's socket (~3–6 KiB of slab per end, buffers empty when idle). hyper's two
//! 8 KiB buffers and its ~1.8 KiB connection task are freed when the socket is handed to the writer
//! ([`crate::connection`]); kept, they made 12.5 KiB per stream.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Waker;

use bytes::Bytes;
use parking_lot::Mutex;
use slab::Slab;

use crate::stream::Stream;
use crate::token::{Token, ADDRESS_BITS, NODE_BITS};

/// 64 shards keep two contending threads (a send and the heartbeat sweep, say) on different locks
/// almost always, at 64 × ~40 B of fixed cost.
pub const SHARD_BITS: u32 = 6;
pub const SHARDS: usize = 1 << SHARD_BITS;
/// Slots visited per lock acquisition by the heartbeat sweep: ~256 × 40 ns ≈ 10 µs of lock hold.
const SWEEP_RUN: usize = 256;
/// Slots per shard the token can address: 2^26 × 64 shards = 4 billion streams, far past any fd limit;
/// in a cluster, where the node number takes 8 of the 32 bits, 2^18 × 64 = 16 million per node.
const fn max_slots(address_bits: u32) -> usize {
    1 << (address_bits - SHARD_BITS)
}

pub struct Registry {
    shards: Box<[Mutex<Slab<Arc<Stream>>>]>,
    /// Round-robin shard choice for inserts: spreads streams evenly without hashing anything.
    next_shard: AtomicUsize,
    len: AtomicUsize,
    /// Keys of the permutation that hides slot numbers in tokens (see [`AddressCipher`]).
    cipher: AddressCipher,
    /// In a cluster, this node's number in the address's top bits (PROTOCOL §10, [`Token::node`]).
    node: Option<u8>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    pub fn new() -> Registry {
        Registry::with_node(None)
    }

    /// A registry whose tokens name `node` as their issuer, when it is one node of a cluster.
    pub fn with_node(node: Option<u8>) -> Registry {
        let address_bits = match node {
            Some(_) => ADDRESS_BITS - NODE_BITS,
            None => ADDRESS_BITS,
        };
        Registry {
            shards: (0..SHARDS).map(|_| Mutex::new(Slab::new())).collect(),
            next_shard: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            cipher: AddressCipher::random(address_bits / 2),
            node,
        }
    }

    /// Creates a stream under a fresh token and registers it. `None` only when the chosen shard has
    /// no addressable slot left.
    pub fn insert(&self, request: Bytes) -> Option<Arc<Stream>> {
        let random = Token::random();
        let shard_index = self.next_shard.fetch_add(1, Ordering::Relaxed) % SHARDS;
        let mut shard = self.shards[shard_index].lock();
        let entry = shard.vacant_entry();
        if entry.key() >= max_slots(self.cipher.bits()) {
            return None;
        }
        let mut address = self
            .cipher
            .encrypt((entry.key() as u32) << SHARD_BITS | shard_index as u32);
        if let Some(node) = self.node {
            address |= u32::from(node) << (ADDRESS_BITS - NODE_BITS);
        }
        let stream = Arc::new(Stream::new(random.with_address(address), request));
        entry.insert(stream.clone());
        drop(shard);
        self.len.fetch_add(1, Ordering::Relaxed);
        Some(stream)
    }

    pub fn get(&self, token: Token) -> Option<Arc<Stream>> {
        let (shard, slot) = self.split(token);
        let shard = self.shards[shard].lock();
        shard.get(slot).filter(|s| s.token == token).cloned()
    }

    /// Removes the stream registered under `token`; false if it was not there (already removed).
    pub fn remove(&self, token: Token) -> bool {
        let (shard, slot) = self.split(token);
        let mut shard = self.shards[shard].lock();
        if shard.get(slot).is_some_and(|s| s.token == token) {
            let stream = shard.remove(slot);
            drop(shard);
            drop(stream);
            self.len.fetch_sub(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gives a heartbeat to every idle stream of shard `shard`, walking its slab in order, in runs
    /// of `SWEEP_RUN` slots per lock acquisition so a send to the shard waits at most one run.
    /// Wakers are woken after each run's lock is released. Returns how many heartbeats were queued.
    pub fn heartbeat_shard(&self, shard: usize, wakers: &mut Vec<Waker>) -> usize {
        let shard = &self.shards[shard];
        let mut queued = 0;
        let mut start = 0;
        loop {
            {
                let slab = shard.lock();
                if start >= slab.capacity() {
                    break;
                }
                let end = (start + SWEEP_RUN).min(slab.capacity());
                for slot in start..end {
                    if let Some(parked) = slab.get(slot).and_then(|s| s.heartbeat()) {
                        wakers.extend(parked);
                        queued += 1;
                    }
                }
                start = end;
            }
            wakers.drain(..).for_each(Waker::wake);
        }
        queued
    }

    fn split(&self, token: Token) -> (usize, usize) {
        let mask = u32::MAX >> (ADDRESS_BITS - self.cipher.bits());
        let address = self.cipher.decrypt(token.address() & mask) as usize;
        (address & (SHARDS - 1), address >> SHARD_BITS)
    }

    /// Every registered stream, for shutdown. Each shard is copied under its lock, one at a time.
    pub fn snapshot(&self) -> Vec<Arc<Stream>> {
        let mut all = Vec::with_capacity(self.len());
        for shard in self.shards.iter() {
            all.extend(shard.lock().iter().map(|(_, s)| s.clone()));
        }
        all
    }
}

/// A keyed permutation of 32-bit addresses (24-bit in a cluster: a 4-round Feistel network over
/// 16- or 12-bit halves), so tokens issued one after another share no visible prefix and do not
/// reveal slot numbers or stream counts. It is obfuscation, not the tokens' security: that rests on
/// the 90 random bits and the full compare.
struct AddressCipher {
    keys: [u32; 4],
    half_bits: u32,
}

impl AddressCipher {
    fn random(half_bits: u32) -> AddressCipher {
        let mut bytes = [0u8; 16];
        getrandom::getrandom(&mut bytes).expect("the OS CSPRNG is available");
        let word = |i: usize| u32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
        AddressCipher {
            keys: [word(0), word(1), word(2), word(3)],
            half_bits,
        }
    }

    /// Width of the addresses it permutes.
    fn bits(&self) -> u32 {
        self.half_bits * 2
    }

    fn half_mask(&self) -> u32 {
        (1 << self.half_bits) - 1
    }

    fn round(&self, half: u32, key: u32) -> u32 {
        let x = (half ^ key).wrapping_mul(0x9E37_79B1);
        (x ^ (x >> 15)) & self.half_mask()
    }

    fn encrypt(&self, address: u32) -> u32 {
        let (mut left, mut right) = (address >> self.half_bits, address & self.half_mask());
        for &key in &self.keys {
            (left, right) = (right, left ^ self.round(right, key));
        }
        left << self.half_bits | right
    }

    fn decrypt(&self, address: u32) -> u32 {
        let (mut left, mut right) = (address >> self.half_bits, address & self.half_mask());
        for &key in self.keys.iter().rev() {
            (left, right) = (right ^ self.round(left, key), left);
        }
        left << self.half_bits | right
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A tiny deterministic PRNG so the random-operation test needs no dependency.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn agrees_with_a_hashmap_on_random_operations() {
        let registry = Registry::new();
        let mut reference: HashMap<Token, Arc<Stream>> = HashMap::new();
        let mut removed: Vec<Token> = Vec::new();
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for step in 0..20_000 {
            match rng.next() % 4 {
                0 | 1 => {
                    let s = registry.insert(Bytes::new()).unwrap();
                    assert!(reference.insert(s.token, s).is_none(), "tokens are unique");
                }
                2 if !reference.is_empty() => {
                    let key = *reference
                        .keys()
                        .nth(rng.next() as usize % reference.len())
                        .unwrap();
                    assert!(registry.remove(key));
                    assert!(!registry.remove(key), "a second remove finds nothing");
                    reference.remove(&key);
                    removed.push(key);
                }
                _ => {
                    if let Some(&gone) = removed.last() {
                        assert!(registry.get(gone).is_none(), "a stale token never resolves");
                    }
                }
            }
            if step % 1000 == 0 {
                for (token, stream) in &reference {
                    assert!(Arc::ptr_eq(&registry.get(*token).unwrap(), stream));
                }
            }
            assert_eq!(registry.len(), reference.len());
        }
        assert_eq!(registry.snapshot().len(), reference.len());
    }

    #[test]
    fn a_reused_slot_does_not_answer_to_the_old_token() {
        let registry = Registry::new();
        let first = registry.insert(Bytes::new()).unwrap().token;
        assert!(registry.remove(first));
        // Fill every shard once so the old (shard, slot) is taken again.
        let again: Vec<Token> = (0..SHARDS)
            .map(|_| registry.insert(Bytes::new()).unwrap().token)
            .collect();
        assert!(again.iter().any(|t| t.address() == first.address()));
        assert!(registry.get(first).is_none());
    }

    #[test]
    fn the_address_cipher_is_a_permutation() {
        for half_bits in [16, 12] {
            let cipher = AddressCipher::random(half_bits);
            let mask = u32::MAX >> (32 - cipher.bits());
            let mut rng = XorShift(42);
            for _ in 0..100_000 {
                let a = rng.next() as u32 & mask;
                assert!(cipher.encrypt(a) <= mask);
                assert_eq!(cipher.decrypt(cipher.encrypt(a)), a);
            }
            let first: Vec<u32> = (0..64).map(|a| cipher.encrypt(a) >> half_bits).collect();
            let distinct: std::collections::HashSet<_> = first.iter().collect();
            assert!(
                distinct.len() > 48,
                "consecutive addresses scatter: {first:?}"
            );
        }
    }

    #[test]
    fn a_cluster_node_names_itself_in_every_token() {
        for node in [0, 1, 200, 255] {
            let registry = Registry::with_node(Some(node));
            let streams: Vec<_> = (0..300)
                .map(|_| registry.insert(Bytes::new()).unwrap())
                .collect();
            for stream in &streams {
                assert_eq!(stream.token.node(), node);
                assert!(Arc::ptr_eq(&registry.get(stream.token).unwrap(), stream));
            }
            let other = Registry::with_node(Some(node.wrapping_add(1)));
            assert!(other.get(streams[0].token).is_none());
        }
    }

    /// The sweep against a naive reference: after random inserts, removes, sends and drains, one
    /// sweep of every shard queues a heartbeat on exactly the open streams whose queue was empty.
    #[test]
    fn heartbeat_sweep_agrees_with_a_naive_loop_on_random_operations() {
        use crate::stream::Next;
        use std::task::Waker;
        let registry = Registry::new();
        let mut open: Vec<Arc<Stream>> = Vec::new();
        let mut rng = XorShift(0xDEAD_BEEF_CAFE_F00D);
        let frame = Bytes::from_static(b"data: x\n\n");
        let mut drained = Vec::new();
        for round in 0..200 {
            for _ in 0..50 {
                match rng.next() % 5 {
                    0 | 1 => open.push(registry.insert(Bytes::new()).unwrap()),
                    2 if !open.is_empty() => {
                        let s = open.swap_remove(rng.next() as usize % open.len());
                        assert!(registry.remove(s.token));
                    }
                    3 if !open.is_empty() => {
                        let s = &open[rng.next() as usize % open.len()];
                        s.deliver(Some(&frame), false, 1 << 20, 0);
                    }
                    _ if !open.is_empty() => {
                        let s = &open[rng.next() as usize % open.len()];
                        while s.take_batch(&mut drained, 16, Waker::noop()) == Next::Frames {}
                        drained.clear();
                    }
                    _ => {}
                }
            }
            // Naive reference: an open stream gets a heartbeat iff its queue is empty.
            let expected: Vec<bool> = open.iter().map(|s| s.queued_bytes() == 0).collect();
            let mut wakers = Vec::new();
            let queued: usize = (0..SHARDS)
                .map(|shard| registry.heartbeat_shard(shard, &mut wakers))
                .sum();
            assert_eq!(
                queued,
                expected.iter().filter(|&&e| e).count(),
                "round {round}"
            );
            for (s, had_room) in open.iter().zip(expected) {
                let mut taken = Vec::new();
                while s.take_batch(&mut taken, 16, Waker::noop()) == Next::Frames {}
                let heartbeats = taken
                    .iter()
                    .filter(|f| **f == crate::frame::HEARTBEAT)
                    .count();
                assert_eq!(heartbeats, usize::from(had_room), "round {round}");
            }
        }
    }

    #[test]
    fn one_sweep_of_every_shard_reaches_each_stream_once() {
        let registry = Registry::new();
        let streams: Vec<_> = (0..1000)
            .map(|_| registry.insert(Bytes::new()).unwrap())
            .collect();
        let mut wakers = Vec::new();
        let total: usize = (0..SHARDS)
            .map(|shard| registry.heartbeat_shard(shard, &mut wakers))
            .sum();
        assert_eq!(total, streams.len(), "each stream is in exactly one shard");
        let again: usize = (0..SHARDS)
            .map(|shard| registry.heartbeat_shard(shard, &mut wakers))
            .sum();
        assert_eq!(
            again, 0,
            "a stream with a heartbeat still queued is skipped"
        );
    }
}
