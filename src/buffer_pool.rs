//! Large buffers reused across objects, within a fixed byte budget.
//!
//! A restore decodes one WAL segment after another, each into a buffer of its full length.
//! Allocating that buffer afresh for every segment faults in fresh pages every time, which cost
//! a measurable share of a busy restore's CPU, so buffers go back to a pool when dropped. The
//! budget caps the bytes of all buffers, in use and kept together, so memory stays bounded
//! whatever the concurrency: a caller that finds the budget spent takes a streaming path that
//! needs no such buffer.
//!
//! Each buffer is its own anonymous mapping, marked for transparent huge pages. zstd decodes a
//! segment into its buffer and copies every match from earlier in it, so the buffer is read at
//! random all over its last megabyte or so: with 2 MiB pages those reads stop missing the TLB,
//! which is dearer still in a virtual machine (a two-level page walk).

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;

pub struct BufferPool {
    state: Mutex<PoolState>,
    budget: usize,
}

struct PoolState {
    kept: Vec<Mapping>,
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
    /// `None` when it would take the pool over its budget or memory cannot be mapped.
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
        let reusable = state.kept.iter().position(|kept| kept.length >= length);
        let mapping = match reusable {
            Some(index) => state.kept.swap_remove(index),
            None => {
                // Every kept buffer is too small: drop them until a new one fits.
                while state.in_use
                    + state.kept.iter().map(|kept| kept.length).sum::<usize>()
                    + length
                    > self.budget
                {
                    state.kept.pop();
                }
                Mapping::new(length)?
            }
        };
        state.in_use += mapping.length;
        Some(PooledBuffer {
            mapping: Some(mapping),
            length,
            pool: self,
        })
    }

    fn give_back(&self, mapping: Mapping) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        state.in_use -= mapping.length;
        state.kept.push(mapping);
    }
}

/// A buffer from a `BufferPool`; it goes back to the pool when dropped.
pub struct PooledBuffer {
    /// Always `Some` until the buffer is dropped.
    mapping: Option<Mapping>,
    length: usize,
    pool: &'static BufferPool,
}

impl Deref for PooledBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.mapping.as_ref().expect("held until dropped").bytes()[..self.length]
    }
}

impl DerefMut for PooledBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self
            .mapping
            .as_mut()
            .expect("held until dropped")
            .bytes_mut()[..self.length]
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(mapping) = self.mapping.take() {
            self.pool.give_back(mapping);
        }
    }
}

/// Zeroed, private, anonymous memory of its own, unmapped when dropped.
struct Mapping {
    address: NonNull<u8>,
    length: usize,
}

// SAFETY: a mapping is plain memory owned by this value alone; nothing in it is tied to a thread.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(length: usize) -> Option<Self> {
        if length == 0 {
            return Some(Mapping {
                address: NonNull::dangling(),
                length: 0,
            });
        }
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return None;
        }
        // Only advice: without huge pages (disabled, or none free) the buffer works the same.
        // SAFETY: the range is the mapping just made.
        unsafe { libc::madvise(address, length, libc::MADV_HUGEPAGE) };
        Some(Mapping {
            address: NonNull::new(address.cast())?,
            length,
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `length` bytes at `address` are mapped readable and writable for our lifetime.
        unsafe { std::slice::from_raw_parts(self.address.as_ptr(), self.length) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.address.as_ptr(), self.length) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.length > 0 {
            // SAFETY: the mapping was made by `new` with this length and is unmapped once.
            unsafe { libc::munmap(self.address.as_ptr().cast(), self.length) };
        }
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
        assert!(
            first.iter().all(|byte| *byte == 0),
            "a new buffer is zeroed"
        );
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
