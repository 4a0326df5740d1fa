//! A concurrency limit on engine requests that prefers the oldest tasks.
//!
//! `tokio::sync::Semaphore` is first-come first-served; here a freed permit goes
//! to the waiting request whose task started first, so old tasks finish (and
//! their lines reach the output) before new ones pile up half-done.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// At most `limit` permits out at once; waiters served by lowest priority key.
#[derive(Debug)]
pub struct PriorityLimiter {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Permits not handed out.
    available: usize,
    /// Waiters by (priority key, arrival) — lowest first.
    waiters: BinaryHeap<Reverse<(u64, u64)>>,
    /// Senders of the waiters, by arrival number (kept beside the heap because
    /// senders are not ordered).
    senders: std::collections::HashMap<u64, oneshot::Sender<()>>,
    arrivals: u64,
}

/// A permit; dropping it passes it to the next waiter.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<PriorityLimiter>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.release();
    }
}

/// Hands a permit that was granted to a waiter that went away back.
struct Waiting {
    limiter: Arc<PriorityLimiter>,
    rx: Option<oneshot::Receiver<()>>,
    arrival: u64,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            if rx.try_recv().is_ok() {
                // Granted but never used: pass it on.
                self.limiter.release();
            } else {
                self.limiter.lock().senders.remove(&self.arrival);
            }
        }
    }
}

impl PriorityLimiter {
    /// A limiter with `limit` permits.
    pub fn new(limit: usize) -> Arc<PriorityLimiter> {
        Arc::new(PriorityLimiter {
            state: Mutex::new(State {
                available: limit,
                waiters: BinaryHeap::new(),
                senders: std::collections::HashMap::new(),
                arrivals: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // No code under this lock can panic midway; recover from poisoning.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a permit; lower `priority` values are served first.
    pub async fn acquire(self: &Arc<Self>, priority: u64) -> Permit {
        let mut waiting = {
            let mut s = self.lock();
            if s.available > 0 && s.waiters.is_empty() {
                s.available -= 1;
                return Permit {
                    limiter: self.clone(),
                };
            }
            let (tx, rx) = oneshot::channel();
            s.arrivals += 1;
            let arrival = s.arrivals;
            s.waiters.push(Reverse((priority, arrival)));
            s.senders.insert(arrival, tx);
            Waiting {
                limiter: self.clone(),
                rx: Some(rx),
                arrival,
            }
        };
        let rx = waiting.rx.as_mut().expect("set above");
        // The sender lives in the map until it is used, so this cannot fail.
        let _ = rx.await;
        waiting.rx = None;
        Permit {
            limiter: self.clone(),
        }
    }

    /// Permits currently available (for tests and metrics).
    pub fn available(&self) -> usize {
        self.lock().available
    }

    fn release(&self) {
        let mut s = self.lock();
        while let Some(Reverse((_, arrival))) = s.waiters.pop() {
            if let Some(tx) = s.senders.remove(&arrival) {
                if tx.send(()).is_ok() {
                    return;
                }
            }
        }
        s.available += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn freed_permits_go_to_the_lowest_priority_key_first() {
        let l = PriorityLimiter::new(1);
        let first = l.acquire(5).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for p in [9u64, 3, 7, 1] {
            let (l, order) = (l.clone(), order.clone());
            handles.push(tokio::spawn(async move {
                let _permit = l.acquire(p).await;
                order.lock().unwrap().push(p);
            }));
            tokio::task::yield_now().await;
        }
        drop(first);
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![1, 3, 7, 9]);
        assert_eq!(l.available(), 1);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_leak_its_permit() {
        let l = PriorityLimiter::new(1);
        let held = l.acquire(0).await;
        let waiter = tokio::spawn({
            let l = l.clone();
            async move {
                let _p = l.acquire(1).await;
            }
        });
        tokio::task::yield_now().await;
        waiter.abort();
        let _ = waiter.await;
        drop(held);
        assert_eq!(l.available(), 1);
        let _again = l.acquire(2).await;
    }
}
