//! Linux facts the load generator reads or sets: the fd limit, CPU pinning, the wall clock used in event
//! payloads, and the gateway's memory and CPU from `/proc`. Nothing here does I/O on sockets.

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

/// Descriptors kept free for stdio, the callback server, senders and the control port, so that a
/// stream count near the limit never starves them.
pub const FD_RESERVE: u64 = 300;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of each call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    #[allow(clippy::unnecessary_cast, reason = "rlim_t is not u64 on every target")]
    let soft = lim.rlim_cur as u64;
    Ok(soft)
}

/// Pins the calling thread (and the threads it starts later) to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: the cpu_set_t is zeroed and filled with libc's own helpers; pid 0 means this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Microseconds since the Unix epoch. Event payloads carry this, so any sender on the same host (k6
/// too) can stamp an event and this process can compute the delivery latency.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Sum of `Pss` (kB) in `/proc/PID/smaps_rollup`, in bytes.
pub fn pss_bytes(pid: u32) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    sum_kb_field(&text, "Pss:").ok_or_else(|| io::Error::other("no Pss line in smaps_rollup"))
}

/// `VmRSS` of a process (kB in `/proc/PID/status`), in bytes.
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    sum_kb_field(&text, "VmRSS:").ok_or_else(|| io::Error::other("no VmRSS line in status"))
}

/// `VmHWM` of a process (its peak RSS so far), in bytes.
pub fn hwm_bytes(pid: u32) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    sum_kb_field(&text, "VmHWM:").ok_or_else(|| io::Error::other("no VmHWM line in status"))
}

fn sum_kb_field(text: &str, key: &str) -> Option<u64> {
    let mut found = false;
    let mut total = 0u64;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(key) {
            found = true;
            total += rest.split_whitespace().next()?.parse::<u64>().ok()? * 1024;
        }
    }
    found.then_some(total)
}

/// Kernel-wide TCP state from `/proc/net/sockstat`: sockets in use and buffer memory in bytes (the
/// `mem` field counts pages). Both ends of every loopback connection are in it: this process's too.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpStat {
    pub inuse: u64,
    pub mem_bytes: u64,
}

pub fn tcp_stat() -> io::Result<TcpStat> {
    let text = std::fs::read_to_string("/proc/net/sockstat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .ok_or_else(|| io::Error::other("no TCP line in sockstat"))?;
    let mut stat = TcpStat::default();
    let words: Vec<&str> = line.split_whitespace().collect();
    for pair in words[1..].chunks(2) {
        if let [k, v] = pair {
            let v: u64 = v.parse().unwrap_or(0);
            match *k {
                "inuse" => stat.inuse = v,
                "mem" => stat.mem_bytes = v * page_size(),
                _ => {}
            }
        }
    }
    Ok(stat)
}

/// `TcpExt` `ListenOverflows` and `ListenDrops` from `/proc/net/netstat` (this network namespace,
/// every listener): connections a full accept queue refused, which the client then retries after
/// its SYN timeout (1 s and up).
pub fn listen_drops() -> io::Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/netstat")?;
    parse_listen_drops(&text).ok_or_else(|| io::Error::other("no TcpExt ListenOverflows"))
}

fn parse_listen_drops(text: &str) -> Option<(u64, u64)> {
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let get = |key: &str| -> Option<u64> {
        let i = names.iter().position(|n| *n == key)?;
        values.get(i)?.parse().ok()
    };
    Some((get("ListenOverflows")?, get("ListenDrops")?))
}

/// Slab caches that grow with each TCP connection: the socket itself, its inode, its epoll entry.
const SOCKET_SLABS: [&str; 4] = [
    "TCP",
    "sock_inode_cache",
    "eventpoll_epi",
    "tcp_bind_bucket",
];

/// Bytes of kernel slab held by `SOCKET_SLABS` (active objects times object size), machine-wide.
/// `/proc/net/sockstat`'s `mem` counts only queued buffer pages, near zero for idle streams; this is
/// what an idle connection really costs the kernel. Needs root (`/proc/slabinfo`).
pub fn socket_slab_bytes() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/slabinfo")?;
    let mut total = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 3 && SOCKET_SLABS.contains(&f[0]) {
            let active: u64 = f[1].parse().unwrap_or(0);
            let size: u64 = f[3].parse().unwrap_or(0);
            total += active * size;
        }
    }
    Ok(total)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

/// CPU seconds (user + system, all threads) a process has used, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let rest = &text[text
        .rfind(')')
        .ok_or_else(|| io::Error::other("bad stat"))?
        + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')' the first field is field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((utime + stime) as f64 / hz)
}

/// CPU seconds of a set of processes (the gateway, or every gateway of a cluster and its Redis) at
/// the start of a measured phase; `elapsed` gives the difference, summed.
pub struct CpuMeter {
    procs: Vec<(String, u32, f64)>,
}

impl CpuMeter {
    /// `procs`: (label, pid) of every process to count; an empty list gives no figure.
    pub fn start(procs: Vec<(String, u32)>) -> Self {
        let procs = procs
            .into_iter()
            .map(|(label, pid)| {
                let start = cpu_seconds(pid).unwrap_or(0.0);
                (label, pid, start)
            })
            .collect();
        CpuMeter { procs }
    }

    /// CPU seconds since `start`, summed, or `None` when no pid is known (or one can't be read).
    pub fn elapsed(&self) -> Option<f64> {
        if self.procs.is_empty() {
            return None;
        }
        let mut sum = 0.0;
        for (_, pid, start) in &self.procs {
            sum += cpu_seconds(*pid).ok()? - start;
        }
        Some(sum)
    }

    /// CPU seconds since `start` per process, by label (unreadable ones left out).
    pub fn each(&self) -> Vec<(String, f64)> {
        self.procs
            .iter()
            .filter_map(|(label, pid, start)| {
                cpu_seconds(*pid)
                    .ok()
                    .map(|now| (label.clone(), now - start))
            })
            .collect()
    }

    /// How many processes are counted.
    pub fn len(&self) -> usize {
        self.procs.len()
    }
}

/// In a child between fork and exec: its own process group (so a terminal's ^C reaches only
/// sse-load, which then stops its children in order), SIGKILL when sse-load dies (so no gateway or
/// Redis outlives a killed run), and pinned to `cpu` if given. Only async-signal-safe calls.
pub fn child_setup(cpu: Option<usize>) -> io::Result<()> {
    // SAFETY: setpgid and prctl are async-signal-safe and touch only this (child) process.
    unsafe {
        if libc::setpgid(0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if let Some(cpu) = cpu {
        pin_to_cpu(cpu)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_kb_fields() {
        let text = "Rss: 10 kB\nPss: 4 kB\nPss_Anon: 3 kB\n";
        assert_eq!(sum_kb_field(text, "Pss:"), Some(4096));
        assert_eq!(sum_kb_field(text, "Nope:"), None);
    }

    #[test]
    fn listen_drop_counters() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 7 9\nIpExt: A\nIpExt: 1\n";
        assert_eq!(parse_listen_drops(text), Some((7, 9)));
        assert_eq!(parse_listen_drops("IpExt: A\nIpExt: 1\n"), None);
    }

    #[test]
    fn reads_own_proc() {
        let pid = std::process::id();
        assert!(pss_bytes(pid).unwrap() > 0);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(tcp_stat().is_ok());
    }
}
