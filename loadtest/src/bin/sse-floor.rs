//! `sse-floor`: the raw floor for "one event to N streams": N `write` calls of B bytes, one to each of
//! N loopback sockets, with nothing else (no HTTP, no framing, no queues). What a fan-out server
//! could at best do on one core.
//!
//! The writer is a child process (`--serve`, pinned to `--server-cpu`) holding the accepted sockets;
//! this process (pinned to `--load-cpu`) holds the client ends, tells the writer to go, and reads with
//! epoll until every socket got its B bytes. Per round it prints the writer's span (first to last
//! `write`), its CPU time, and first write → last byte read here (the figure to compare with a
//! broadcast round's "first request → last delivery"). Two processes because 2N sockets would not fit
//! in one process's 20000 descriptors.
//!
//!   sse-floor [-n 18000] [--bytes 100] [--rounds 5] [--server-cpu 0] [--load-cpu 1]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::{Command, Stdio};

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("sse-floor: cannot pin to CPU {cpu}");
            std::process::exit(2);
        }
    }
}

fn raise_nofile() -> u64 {
    // SAFETY: valid rlimit pointers.
    unsafe {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        rl.rlim_cur = rl.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        rl.rlim_cur
    }
}

struct Opts {
    n: usize,
    bytes: usize,
    rounds: usize,
    server_cpu: Option<usize>,
    load_cpu: Option<usize>,
    serve: bool,
}

fn parse() -> Opts {
    let mut o = Opts {
        n: 18_000,
        bytes: 100,
        rounds: 5,
        server_cpu: None,
        load_cpu: None,
        serve: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let num = |i: usize| -> usize {
        args.get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                eprintln!("sse-floor: {} wants a number", args[i]);
                std::process::exit(2)
            })
    };
    while i < args.len() {
        match args[i].as_str() {
            "-n" => o.n = num(i),
            "--bytes" => o.bytes = num(i),
            "--rounds" => o.rounds = num(i),
            "--server-cpu" => o.server_cpu = Some(num(i)),
            "--load-cpu" => o.load_cpu = Some(num(i)),
            "--serve" => {
                o.serve = true;
                i += 1;
                continue;
            }
            _ => {
                eprintln!("usage: sse-floor [-n 18000] [--bytes 100] [--rounds 5] [--server-cpu N] [--load-cpu N]");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    o
}

/// The writer: accept n sockets, then per `go` line write `bytes` to each and report.
fn serve(o: &Opts) {
    if let Some(c) = o.server_cpu {
        pin(c);
    }
    raise_nofile();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    println!("{}", l.local_addr().unwrap().port());
    std::io::stdout().flush().unwrap();
    let socks: Vec<TcpStream> = (0..o.n).map(|_| l.accept().expect("accept").0).collect();
    let fds: Vec<i32> = socks.iter().map(|s| s.as_raw_fd()).collect();
    let msg = vec![b'x'; o.bytes];
    println!("ready");
    std::io::stdout().flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        if line.unwrap_or_default() != "go" {
            break;
        }
        let (c0, t0) = (cpu_ns(), mono_ns());
        for &fd in &fds {
            // SAFETY: fd is an open socket owned by `socks`; msg outlives the call.
            let w = unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
            assert_eq!(
                w as usize,
                msg.len(),
                "one write per socket, never short on an empty buffer"
            );
        }
        let (t1, c1) = (mono_ns(), cpu_ns());
        println!("{t0} {t1} {}", c1 - c0);
        std::io::stdout().flush().unwrap();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let o = parse();
    if o.serve {
        return serve(&o);
    }
    if let Some(c) = o.load_cpu {
        pin(c);
    }
    let nofile = raise_nofile();
    if o.n + 100 > nofile as usize {
        eprintln!(
            "sse-floor: -n {} does not fit the open-file limit {nofile}",
            o.n
        );
        std::process::exit(2);
    }
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--serve",
        "-n",
        &o.n.to_string(),
        "--bytes",
        &o.bytes.to_string(),
    ]);
    if let Some(c) = o.server_cpu {
        cmd.args(["--server-cpu", &c.to_string()]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn writer");
    let mut to_child = child.stdin.take().unwrap();
    let mut from_child = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    from_child.read_line(&mut line).unwrap();
    let port: u16 = line.trim().parse().expect("writer prints its port");

    // Client ends, spread over source addresses 127.0.0.2.. so ports never run out.
    let mut socks = Vec::with_capacity(o.n);
    for i in 0..o.n {
        // SAFETY: plain socket calls on a fresh fd that `TcpStream` then owns.
        let s = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket");
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                4,
            );
            let src = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_be_bytes([127, 0, 0, 2 + (i % 253) as u8]).to_be(),
                },
                sin_zero: [0; 8],
            };
            let dst = libc::sockaddr_in {
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
                },
                ..src
            };
            let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
            assert_eq!(
                libc::bind(fd, (&src as *const libc::sockaddr_in).cast(), len),
                0,
                "bind"
            );
            assert_eq!(
                libc::connect(fd, (&dst as *const libc::sockaddr_in).cast(), len),
                0,
                "connect to {dst:?}",
                dst = port
            );
            TcpStream::from_raw_fd(fd)
        };
        s.set_nonblocking(true).unwrap();
        socks.push(s);
    }
    line.clear();
    from_child.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    // SAFETY: epoll on fds owned by `socks`, which outlive it.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    for (i, s) in socks.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: as above.
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) };
    }
    println!(
        "sse-floor: {} sockets, {} B per write, writer cpu {:?}, reader cpu {:?}",
        o.n, o.bytes, o.server_cpu, o.load_cpu
    );
    let (mut spans, mut cpus, mut delivers) = (Vec::new(), Vec::new(), Vec::new());
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = vec![0u8; 64 * 1024];
    for round in 1..=o.rounds {
        let mut got = vec![0usize; o.n];
        let mut done = 0;
        writeln!(to_child, "go").unwrap();
        to_child.flush().unwrap();
        let mut last = 0;
        while done < o.n {
            // SAFETY: events has room for its length.
            let k =
                unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 10_000) };
            assert!(
                k > 0,
                "no data for 10 s: {done} of {} sockets complete",
                o.n
            );
            for ev in &events[..k as usize] {
                let i = ev.u64 as usize;
                while let Ok(r) = (&socks[i]).read(&mut buf) {
                    if r == 0 {
                        panic!("writer closed a socket");
                    }
                    got[i] += r;
                }
                if got[i] >= o.bytes && got[i] - o.bytes < o.bytes {
                    got[i] = usize::MAX / 2;
                    done += 1;
                    last = mono_ns();
                }
            }
        }
        line.clear();
        from_child.read_line(&mut line).unwrap();
        let f: Vec<u64> = line
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        let (t0, t1, cpu) = (f[0], f[1], f[2]);
        let span = (t1 - t0) as f64 / 1e6;
        let deliver = (last - t0) as f64 / 1e6;
        println!(
            "round {round}: {} writes in {span:.2} ms ({:.2} µs each), writer CPU {:.2} ms ({:.2} µs per write); first write -> last byte read {deliver:.2} ms",
            o.n,
            span * 1e3 / o.n as f64,
            cpu as f64 / 1e6,
            cpu as f64 / 1e3 / o.n as f64
        );
        spans.push(span);
        cpus.push(cpu as f64 / 1e6);
        delivers.push(deliver);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    drop(to_child);
    let _ = child.wait();
    let (s, c, d) = (median(&mut spans), median(&mut cpus), median(&mut delivers));
    println!("RESULT: floor for {} x {} B: writes {s:.2} ms, writer CPU {c:.2} ms ({:.2} µs/write), first write -> last byte read {d:.2} ms (medians of {} rounds)", o.n, o.bytes, c * 1e3 / o.n as f64, o.rounds);
    println!(
        "SUMMARY {}",
        serde_json::json!({"scenario": "floor", "streams": o.n, "bytes": o.bytes, "rounds": o.rounds,
            "write_span_ms_p50": s, "writer_cpu_ms_p50": c, "deliver_ms_p50": d})
    );
}
