//! Results: human lines as they happen, one `SUMMARY {json}` line at the end, and the exit status.
//! A failure is always printed (`FAIL:` / `DEADLINE:`), never only counted.

use serde_json::{Map, Value};

pub const EXIT_OK: u8 = 0;
pub const EXIT_DEADLINE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_CHECK: u8 = 3;

#[derive(Default)]
pub struct Report {
    json: Map<String, Value>,
    failures: Vec<String>,
    deadlines: Vec<String>,
}

impl Report {
    pub fn line(&self, s: impl AsRef<str>) {
        println!("{}", s.as_ref());
    }

    pub fn set(&mut self, key: &str, v: impl Into<Value>) {
        self.json.insert(key.to_owned(), v.into());
    }

    /// A check failed: printed now, listed in the summary, exit status 3.
    pub fn fail(&mut self, msg: impl Into<String>) {
        let msg = msg.into();
        println!("FAIL: {msg}");
        self.failures.push(msg);
    }

    /// A phase missed its deadline: printed now, listed in the summary, exit status 1.
    pub fn missed(&mut self, msg: impl Into<String>) {
        let msg = msg.into();
        println!("DEADLINE: {msg}");
        self.deadlines.push(msg);
    }

    pub fn finish(mut self) -> u8 {
        let code = if !self.deadlines.is_empty() {
            EXIT_DEADLINE
        } else if !self.failures.is_empty() {
            EXIT_CHECK
        } else {
            EXIT_OK
        };
        self.set("failures", self.failures.clone());
        self.set("deadlines_missed", self.deadlines.clone());
        self.set("ok", code == EXIT_OK);
        println!(
            "{}",
            if code == EXIT_OK {
                "RESULT: ok".to_owned()
            } else {
                format!(
                    "RESULT: {} failed check(s), {} missed deadline(s)",
                    self.failures.len(),
                    self.deadlines.len()
                )
            }
        );
        println!("SUMMARY {}", Value::Object(self.json));
        code
    }
}

/// Rounds to `places` decimals for JSON.
pub fn round(x: f64, places: i32) -> f64 {
    let m = 10f64.powi(places);
    (x * m).round() / m
}

/// Least-squares slope of y over x; `None` with fewer than two distinct x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slopes() {
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]), Some(2.0));
        assert_eq!(slope(&[(1.0, 1.0)]), None);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }
}
