//! A fixed-size log-linear histogram of microsecond values: bounded memory however long a run lasts
//! (the `hold` scenario may run for hours), about 1.6% relative error, exact below 128 µs.

/// Values below this are counted exactly, one bucket each.
const LINEAR: u64 = 128;
/// Sub-buckets per power of two above `LINEAR`: 64 gives a relative error under 1/64.
const SUB_BITS: u32 = 6;
/// Powers of two covered above `LINEAR` (2^7 .. 2^47 µs, about 4.5 years): 40 * 64 + 128 buckets,
/// 2688 counters of 8 bytes = 21 KiB per histogram.
const BUCKETS: usize = LINEAR as usize + 40 * (1 << SUB_BITS);

#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum: u128,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            count: 0,
            sum: 0,
            max: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= 7
    let shift = exp - SUB_BITS;
    let mantissa = (v >> shift) as usize & ((1 << SUB_BITS) - 1);
    let i = LINEAR as usize + (exp as usize - 7) * (1 << SUB_BITS) + mantissa;
    i.min(BUCKETS - 1)
}

/// The highest value that lands in bucket `i` (what a percentile reports).
fn upper(i: usize) -> u64 {
    if i < LINEAR as usize {
        return i as u64;
    }
    let j = i - LINEAR as usize;
    let exp = (j >> SUB_BITS) as u32 + 7;
    let mantissa = (j & ((1 << SUB_BITS) - 1)) as u64;
    let shift = exp - SUB_BITS;
    (((1u64 << SUB_BITS) | mantissa) << shift) + (1u64 << shift) - 1
}

impl Histogram {
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.count += 1;
        self.sum += v as u128;
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The value at quantile `q` (0..=1), never above the true maximum; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper(i).min(self.max);
            }
        }
        self.max
    }

    /// `{"n":..,"p50_us":..,"p99_us":..,"max_us":..,"mean_us":..}`
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "n": self.count,
            "p50_us": self.quantile(0.50),
            "p99_us": self.quantile(0.99),
            "max_us": self.max,
            "mean_us": (self.mean() * 10.0).round() / 10.0,
        })
    }

    /// `p50 1.23 ms  p99 4.56 ms  max 7.89 ms (n=...)`
    pub fn human(&self) -> String {
        format!(
            "p50 {}  p99 {}  max {}  (n={})",
            fmt_us(self.quantile(0.50)),
            fmt_us(self.quantile(0.99)),
            fmt_us(self.max),
            self.count
        )
    }
}

pub fn fmt_us(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1000.0)
    } else {
        format!("{:.3} s", us as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The naive twin: sort every value and pick the rank.
    fn exact(values: &mut [u64], q: f64) -> u64 {
        values.sort_unstable();
        let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
        values[rank - 1]
    }

    #[test]
    fn buckets_are_monotonic_and_cover_their_values() {
        for v in (0..200_000u64).chain([1 << 30, u64::MAX >> 17]) {
            let i = index(v);
            assert!(upper(i) >= v.min(upper(BUCKETS - 1)), "v={v}");
            if i > 0 {
                assert!(upper(i - 1) < v, "v={v}");
            }
        }
    }

    #[test]
    fn quantiles_match_sorting_within_two_percent() {
        let mut x: u64 = 88172645463325252;
        let mut values = Vec::new();
        let mut h = Histogram::default();
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = x % 3_000_000;
            values.push(v);
            h.record(v);
        }
        for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
            let e = exact(&mut values, q) as f64;
            let got = h.quantile(q) as f64;
            assert!(
                got >= e && got <= e * 1.02 + 1.0,
                "q={q} exact={e} got={got}"
            );
        }
    }
}
