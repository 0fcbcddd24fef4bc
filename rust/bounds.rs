//! Bounds on the numbers the core is given (seconds from Python floats,
//! byte caps from Python ints), so that no input can panic or overflow:
//! durations are built with `Duration::try_from_secs_f64` and clamped,
//! deadlines with `Instant::checked_add`, and a byte cap is clamped to
//! [`MAX_BYTES`]. The Python side (`isocache.config`) warns about values it
//! clamps; here they are only made safe.

use std::time::{Duration, Instant};

/// The longest any wait for a lock or lease may last: a week (the Python
/// side caps `ISOCACHE_WAIT_TIMEOUT` at the same).
pub const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// The largest size cap: 2**62 bytes (4 EiB), far above any disk, with room
/// for sums of sizes below `u64::MAX`.
pub const MAX_BYTES: u64 = 1 << 62;

/// `secs` as a duration within `0..=max`: negative and NaN give zero,
/// anything above `max` (infinity included) gives `max`.
pub fn seconds(secs: f64, max: Duration) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    match Duration::try_from_secs_f64(secs) {
        Ok(d) => d.min(max),
        Err(_) => max,
    }
}

/// A wait of `secs` seconds, at most [`MAX_WAIT`].
pub fn wait(secs: f64) -> Duration {
    seconds(secs, MAX_WAIT)
}

/// `now + wait`, or `now +` [`MAX_WAIT`] when that would overflow the clock.
pub fn deadline(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait.min(MAX_WAIT))
        .or_else(|| now.checked_add(Duration::from_secs(3600)))
        .unwrap_or(now)
}

/// A byte cap of at most [`MAX_BYTES`].
pub fn byte_cap(max_bytes: u64) -> u64 {
    max_bytes.min(MAX_BYTES)
}

/// `n` as a signed delta, saturating at `i64::MAX`.
pub fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_clamped_never_panic() {
        let max = Duration::from_secs(60);
        assert_eq!(seconds(1.5, max), Duration::from_millis(1500));
        assert_eq!(seconds(0.0, max), Duration::ZERO);
        assert_eq!(seconds(-1.0, max), Duration::ZERO);
        assert_eq!(seconds(f64::NAN, max), Duration::ZERO);
        assert_eq!(seconds(f64::NEG_INFINITY, max), Duration::ZERO);
        assert_eq!(seconds(f64::INFINITY, max), max);
        assert_eq!(seconds(1e308, max), max);
        assert_eq!(seconds(1e30, max), max);
        assert_eq!(seconds(f64::MAX, Duration::MAX), Duration::MAX);
        assert_eq!(wait(1e300), MAX_WAIT);
        assert_eq!(wait(f64::MIN_POSITIVE), Duration::ZERO);
    }

    #[test]
    fn deadlines_never_overflow() {
        let now = Instant::now();
        assert_eq!(
            deadline(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert_eq!(deadline(now, Duration::MAX), now + MAX_WAIT);
    }

    #[test]
    fn byte_caps_and_deltas_saturate() {
        assert_eq!(byte_cap(u64::MAX), MAX_BYTES);
        assert_eq!(byte_cap(4096), 4096);
        assert_eq!(signed(u64::MAX), i64::MAX);
        assert_eq!(signed(7), 7);
    }
}
