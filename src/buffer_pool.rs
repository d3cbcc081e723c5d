//! Large buffers reused across objects, within a fixed byte budget.
//!
//! A restore decodes one WAL segment after another, each into a buffer of its full length.
//! Allocating that buffer afresh for every segment faults in fresh pages every time, which cost
//! a measurable share of a busy restore's CPU, so buffers go back to a pool when dropped. The
//! budget caps the bytes of all buffers, in use and kept together, so memory stays bounded
//! whatever the concurrency: a caller that finds the budget spent takes a streaming path that
//! needs no such buffer.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

pub struct BufferPool {
    state: Mutex<PoolState>,
    budget: usize,
}

struct PoolState {
    kept: Vec<Vec<u8>>,
    /// Bytes of the buffers handed out and not yet returned.
    in_use: usize,
}

impl BufferPool {
    pub const fn new(budget: usize) -> Self {
        BufferPool {
            state: Mutex::new(PoolState {
                kept: Vec::new(),
                in_use: 0,
            }),
            budget,
        }
    }

    /// A buffer of exactly `length` bytes (zeroed when new, stale contents when reused), or
    /// `None` when it would take the pool over its budget.
    pub fn take(&'static self, length: usize) -> Option<PooledBuffer> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        // Buffers in use plus buffers kept never exceed the budget, so when this fails no
        // kept buffer is large enough either.
        if state.in_use + length > self.budget {
            return None;
        }
        let reusable = state.kept.iter().position(|kept| kept.len() >= length);
        let buffer = match reusable {
            Some(index) => state.kept.swap_remove(index),
            None => {
                // Every kept buffer is too small: drop them until a new one fits.
                while state.in_use + state.kept.iter().map(Vec::len).sum::<usize>() + length
                    > self.budget
                {
                    state.kept.pop();
                }
                vec![0u8; length]
            }
        };
        state.in_use += buffer.len();
        Some(PooledBuffer {
            buffer,
            length,
            pool: self,
        })
    }

    fn give_back(&self, buffer: Vec<u8>) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        state.in_use -= buffer.len();
        state.kept.push(buffer);
    }
}

/// A buffer from a `BufferPool`; it goes back to the pool when dropped.
pub struct PooledBuffer {
    buffer: Vec<u8>,
    length: usize,
    pool: &'static BufferPool,
}

impl Deref for PooledBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buffer[..self.length]
    }
}

impl DerefMut for PooledBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buffer[..self.length]
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buffer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_the_budget_is_never_exceeded() {
        static POOL: BufferPool = BufferPool::new(100);
        let first = POOL.take(60).expect("within the budget");
        assert_eq!(first.len(), 60);
        assert!(POOL.take(41).is_none(), "60 + 41 bytes exceed the budget");
        let second = POOL.take(40).expect("60 + 40 bytes fit");
        let address = first.as_ptr();
        drop(first);
        let reused = POOL.take(50).expect("the returned buffer fits");
        assert_eq!(reused.as_ptr(), address, "the kept buffer is reused");
        assert_eq!(reused.len(), 50);
        drop(reused);
        drop(second);
        // Both kept buffers (60 + 40) are dropped to make room for one of 100.
        assert_eq!(POOL.take(100).map(|buffer| buffer.len()), Some(100));
    }
}
