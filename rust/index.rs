//! The isometric index: a lock-free map from digest to what this process knows
//! about that piece (being compiled, ready with its compiled callable, or failed).
//!
//! Readers never block: lookups go through `papaya`. The only lock is the one
//! a thread takes to *sleep* while another thread compiles the same digest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::digest::Digest;

/// Where a piece stands in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A thread has claimed the digest and is producing the callable.
    Compiling,
    /// The callable is available.
    Ready,
    /// Producing the callable failed; the reason is kept.
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Compiling => "compiling",
            State::Ready => "ready",
            State::Failed => "failed",
        }
    }
}

/// One digest's entry. Immutable once published, except for the hit counter,
/// which is shared by every version of the entry for the same digest.
#[derive(Debug)]
pub struct Entry<V> {
    pub state: State,
    pub value: Option<V>,
    pub compile_seconds: f64,
    pub reason: Option<String>,
    hits: Arc<AtomicU64>,
}

impl<V> Entry<V> {
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

/// Result of trying to claim a digest for compilation.
#[derive(Debug)]
pub enum Claim<V> {
    /// The caller now owns the compile and must `publish`, `fail` or `abandon`.
    Claimed,
    /// Someone else got there first; here is what they left.
    Existing(Arc<Entry<V>>),
}

pub struct Index<V> {
    map: papaya::HashMap<Digest, Arc<Entry<V>>>,
    sleep: Mutex<()>,
    changed: Condvar,
}

impl<V> Default for Index<V> {
    fn default() -> Self {
        Index {
            map: papaya::HashMap::new(),
            sleep: Mutex::new(()),
            changed: Condvar::new(),
        }
    }
}

impl<V: Send + Sync> Index<V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, digest: &Digest) -> Option<Arc<Entry<V>>> {
        self.map.pin().get(digest).cloned()
    }

    /// Atomically claims `digest` for compilation if nobody has it yet.
    pub fn claim(&self, digest: &Digest) -> Claim<V> {
        let entry = Arc::new(Entry {
            state: State::Compiling,
            value: None,
            compile_seconds: 0.0,
            reason: None,
            hits: Arc::new(AtomicU64::new(0)),
        });
        match self.map.pin().try_insert(*digest, entry) {
            Ok(_) => Claim::Claimed,
            Err(e) => Claim::Existing(e.current.clone()),
        }
    }

    fn replace(
        &self,
        digest: &Digest,
        state: State,
        value: Option<V>,
        secs: f64,
        reason: Option<String>,
    ) {
        let map = self.map.pin();
        let hits = map
            .get(digest)
            .map(|e| e.hits.clone())
            .unwrap_or_else(|| Arc::new(AtomicU64::new(0)));
        map.insert(
            *digest,
            Arc::new(Entry {
                state,
                value,
                compile_seconds: secs,
                reason,
                hits,
            }),
        );
        self.notify();
    }

    /// Makes `value` the ready callable for `digest` (claimed or not).
    pub fn publish(&self, digest: &Digest, value: V, compile_seconds: f64) {
        self.replace(digest, State::Ready, Some(value), compile_seconds, None);
    }

    /// Records that `digest` cannot be compiled, so later lookups do not retry.
    pub fn fail(&self, digest: &Digest, reason: String) {
        self.replace(digest, State::Failed, None, 0.0, Some(reason));
    }

    /// Gives up a claim without a result (for example on interrupt), so that
    /// a waiter or a later call can compile it.
    pub fn abandon(&self, digest: &Digest) {
        let map = self.map.pin();
        let _ = map.remove_if(digest, |_, e| e.state == State::Compiling);
        drop(map);
        self.notify();
    }

    pub fn remove(&self, digest: &Digest) -> bool {
        let removed = self.map.pin().remove(digest).is_some();
        self.notify();
        removed
    }

    /// Counts one reuse of `digest`; returns the new count (0 if absent).
    pub fn record_hit(&self, digest: &Digest) -> u64 {
        match self.map.pin().get(digest) {
            Some(e) => e.hits.fetch_add(1, Ordering::Relaxed) + 1,
            None => 0,
        }
    }

    /// Waits until `digest` is no longer being compiled (or the timeout ends)
    /// and returns its entry: `None` when it was abandoned or never existed.
    pub fn wait(&self, digest: &Digest, timeout: Duration) -> Option<Arc<Entry<V>>> {
        let deadline = crate::bounds::deadline(Instant::now(), timeout);
        let mut guard = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match self.get(digest) {
                Some(e) if e.state == State::Compiling => {}
                other => return other,
            }
            let now = Instant::now();
            if now >= deadline {
                return self.get(digest);
            }
            guard = self
                .changed
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn notify(&self) {
        // Taking the lock orders this wake-up after a waiter's check.
        let _guard = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
        self.changed.notify_all();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn clear(&self) {
        self.map.pin().clear();
        self.notify();
    }

    /// A snapshot of all entries.
    pub fn entries(&self) -> Vec<(Digest, Arc<Entry<V>>)> {
        self.map
            .pin()
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// A digest named by a short label, for readable tests.
    fn d(label: &str) -> Digest {
        Digest(*blake3::hash(label.as_bytes()).as_bytes())
    }

    #[test]
    fn claim_publish_get() {
        let idx: Index<String> = Index::new();
        assert!(idx.get(&d("a")).is_none());
        assert!(matches!(idx.claim(&d("a")), Claim::Claimed));
        match idx.claim(&d("a")) {
            Claim::Existing(e) => assert_eq!(e.state, State::Compiling),
            Claim::Claimed => panic!("claimed twice"),
        }
        idx.publish(&d("a"), "fn".to_string(), 1.5);
        let e = idx.get(&d("a")).unwrap();
        assert_eq!(e.state, State::Ready);
        assert_eq!(e.value.as_deref(), Some("fn"));
        assert_eq!(e.compile_seconds, 1.5);
    }

    #[test]
    fn hits_survive_state_changes() {
        let idx: Index<u32> = Index::new();
        assert_eq!(idx.record_hit(&d("x")), 0);
        assert!(matches!(idx.claim(&d("x")), Claim::Claimed));
        assert_eq!(idx.record_hit(&d("x")), 1);
        idx.publish(&d("x"), 7, 0.1);
        assert_eq!(idx.record_hit(&d("x")), 2);
        assert_eq!(idx.get(&d("x")).unwrap().hits(), 2);
    }

    #[test]
    fn fail_and_abandon() {
        let idx: Index<u32> = Index::new();
        assert!(matches!(idx.claim(&d("f")), Claim::Claimed));
        idx.fail(&d("f"), "boom".into());
        let e = idx.get(&d("f")).unwrap();
        assert_eq!(e.state, State::Failed);
        assert_eq!(e.reason.as_deref(), Some("boom"));
        // abandon only drops claims that are still compiling
        idx.abandon(&d("f"));
        assert!(idx.get(&d("f")).is_some());
        assert!(matches!(idx.claim(&d("g")), Claim::Claimed));
        idx.abandon(&d("g"));
        assert!(idx.get(&d("g")).is_none());
        assert!(matches!(idx.claim(&d("g")), Claim::Claimed));
    }

    #[test]
    fn exactly_one_thread_claims_each_digest() {
        let idx: Arc<Index<usize>> = Arc::new(Index::new());
        let threads = 8;
        let digests = 200;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let idx = idx.clone();
                thread::spawn(move || {
                    let mut won = 0;
                    for n in 0..digests {
                        let key = d(&format!("d{n}"));
                        if let Claim::Claimed = idx.claim(&key) {
                            won += 1;
                            idx.publish(&key, t, 0.0);
                        } else {
                            idx.record_hit(&key);
                        }
                    }
                    won
                })
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, digests);
        assert_eq!(idx.len(), digests);
        let hits: u64 = idx.entries().iter().map(|(_, e)| e.hits()).sum();
        assert_eq!(hits as usize, digests * (threads - 1));
    }

    #[test]
    fn waiters_wake_when_the_compile_finishes() {
        let idx: Arc<Index<u32>> = Arc::new(Index::new());
        assert!(matches!(idx.claim(&d("w")), Claim::Claimed));
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let idx = idx.clone();
                thread::spawn(move || idx.wait(&d("w"), Duration::from_secs(10)))
            })
            .collect();
        thread::sleep(Duration::from_millis(50));
        idx.publish(&d("w"), 42, 0.2);
        for w in waiters {
            let e = w.join().unwrap().unwrap();
            assert_eq!(e.state, State::Ready);
            assert_eq!(e.value, Some(42));
        }
    }

    #[test]
    fn wait_times_out_and_sees_abandon() {
        let idx: Arc<Index<u32>> = Arc::new(Index::new());
        assert!(matches!(idx.claim(&d("t")), Claim::Claimed));
        let start = Instant::now();
        let e = idx.wait(&d("t"), Duration::from_millis(30)).unwrap();
        assert_eq!(e.state, State::Compiling);
        assert!(start.elapsed() >= Duration::from_millis(30));
        let idx2 = idx.clone();
        let h = thread::spawn(move || idx2.wait(&d("t"), Duration::from_secs(10)));
        thread::sleep(Duration::from_millis(20));
        idx.abandon(&d("t"));
        assert!(h.join().unwrap().is_none());
    }
}
