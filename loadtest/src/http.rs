//! The minimum of HTTP/1.1 a cheap client needs: a response head, a chunked-body decoder and an SSE
//! parser, all incremental (bytes may split anywhere) and allocation-free on the steady path.

/// A parsed response head.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub status: u16,
    /// Bytes of the head, including the blank line; the body starts there.
    pub len: usize,
    pub chunked: bool,
    pub content_length: Option<usize>,
    /// `Connection: close` was sent: the socket can't be reused.
    pub close: bool,
    /// `Content-Type: text/event-stream`.
    pub event_stream: bool,
}

/// `Ok(None)` while the head is incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("bad response head: {e}")),
    };
    let mut head = Head {
        status: resp.code.unwrap_or(0),
        len,
        chunked: false,
        content_length: None,
        close: false,
        event_stream: false,
    };
    for h in resp.headers.iter() {
        let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = v.contains("chunked");
        } else if h.name.eq_ignore_ascii_case("content-length") {
            head.content_length = v.trim().parse().ok();
        } else if h.name.eq_ignore_ascii_case("connection") {
            head.close = v.contains("close");
        } else if h.name.eq_ignore_ascii_case("content-type") {
            head.event_stream = v.starts_with("text/event-stream");
        }
    }
    Ok(Some(head))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex size line; `ext` once a `;` extension started.
    Size {
        size: usize,
        digits: u8,
        ext: bool,
    },
    /// Expecting the `\n` that ends a size line.
    SizeLf {
        size: usize,
    },
    Data {
        left: usize,
    },
    /// The CRLF after a chunk's data: how many of its two bytes are still due.
    DataEnd {
        left: u8,
    },
    /// After the zero-size chunk: trailers until an empty line. `line` counts bytes on this line.
    Trailer {
        line: usize,
    },
    Done,
}

/// Decodes `Transfer-Encoding: chunked`, handing payload slices to a callback.
pub struct ChunkDecoder {
    state: ChunkState,
}

impl Default for ChunkDecoder {
    fn default() -> Self {
        ChunkDecoder {
            state: ChunkState::Size {
                size: 0,
                digits: 0,
                ext: false,
            },
        }
    }
}

impl ChunkDecoder {
    /// The last chunk and its trailers were read: the body ended cleanly.
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Returns how many input bytes were used (less than `input.len()` only once done).
    pub fn feed(&mut self, input: &[u8], mut out: impl FnMut(&[u8])) -> Result<usize, String> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                ChunkState::Size { size, digits, ext } => {
                    let b = input[i];
                    i += 1;
                    if b == b'\r' {
                        if digits == 0 {
                            return Err("chunk size line without digits".into());
                        }
                        self.state = ChunkState::SizeLf { size };
                    } else if ext {
                    } else if b == b';' {
                        self.state = ChunkState::Size {
                            size,
                            digits,
                            ext: true,
                        };
                    } else {
                        let d = (b as char)
                            .to_digit(16)
                            .ok_or_else(|| format!("bad chunk size byte {b:#x}"))?;
                        if digits >= 15 {
                            return Err("chunk size too long".into());
                        }
                        self.state = ChunkState::Size {
                            size: size * 16 + d as usize,
                            digits: digits + 1,
                            ext: false,
                        };
                    }
                }
                ChunkState::SizeLf { size } => {
                    if input[i] != b'\n' {
                        return Err("chunk size line not ended by CRLF".into());
                    }
                    i += 1;
                    self.state = if size == 0 {
                        ChunkState::Trailer { line: 0 }
                    } else {
                        ChunkState::Data { left: size }
                    };
                }
                ChunkState::Data { left } => {
                    let n = left.min(input.len() - i);
                    out(&input[i..i + n]);
                    i += n;
                    self.state = if n == left {
                        ChunkState::DataEnd { left: 2 }
                    } else {
                        ChunkState::Data { left: left - n }
                    };
                }
                ChunkState::DataEnd { left } => {
                    let want = if left == 2 { b'\r' } else { b'\n' };
                    if input[i] != want {
                        return Err("chunk data not followed by CRLF".into());
                    }
                    i += 1;
                    self.state = if left == 2 {
                        ChunkState::DataEnd { left: 1 }
                    } else {
                        ChunkState::Size {
                            size: 0,
                            digits: 0,
                            ext: false,
                        }
                    };
                }
                ChunkState::Trailer { line } => {
                    let b = input[i];
                    i += 1;
                    self.state = match b {
                        b'\r' => ChunkState::Trailer { line },
                        b'\n' if line == 0 => ChunkState::Done,
                        b'\n' => ChunkState::Trailer { line: 0 },
                        _ => ChunkState::Trailer { line: line + 1 },
                    };
                }
                ChunkState::Done => return Ok(i),
            }
        }
        Ok(i)
    }
}

/// What the SSE parser found.
#[derive(Debug, PartialEq, Eq)]
pub enum SseItem<'a> {
    /// A dispatched event's data (lines joined by `\n`).
    Event(&'a [u8]),
    /// A comment line's text after the `:`.
    Comment(&'a [u8]),
    /// The block being dispatched set the last event id (an `id:` line): the value a browser
    /// would send back as `Last-Event-ID`. With `data` true it comes right before that block's
    /// `Event`; false: an id-only block (no event is dispatched, the id still counts).
    Id { id: &'a [u8], data: bool },
}

/// Incremental SSE parser: lines end in `\n` (a preceding `\r` is dropped), `data:` lines accumulate,
/// an empty line dispatches. `id:` is reported at dispatch (as a browser updates `lastEventId`);
/// `event:` and `retry:` are read past: the counts, the ids and the payload are all a load test needs.
#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    id: Vec<u8>,
    has_id: bool,
}

/// A line longer than this is a broken stream, not an event to buffer (the gateway's own send limit is
/// 1 MiB by default; 4 MiB leaves room for its framing).
const MAX_LINE: usize = 4 << 20;

impl SseParser {
    pub fn feed(
        &mut self,
        mut input: &[u8],
        mut on: impl FnMut(SseItem<'_>),
    ) -> Result<(), String> {
        while !input.is_empty() {
            match input.iter().position(|&b| b == b'\n') {
                None => {
                    if self.line.len() + input.len() > MAX_LINE {
                        return Err("SSE line over 4 MiB".into());
                    }
                    self.line.extend_from_slice(input);
                    return Ok(());
                }
                Some(p) => {
                    if self.line.is_empty() {
                        self.line_done(&input[..p], &mut on);
                    } else {
                        self.line.extend_from_slice(&input[..p]);
                        let line = std::mem::take(&mut self.line);
                        self.line_done(&line, &mut on);
                        self.line = line;
                        self.line.clear();
                    }
                    input = &input[p + 1..];
                }
            }
        }
        Ok(())
    }

    fn line_done(&mut self, line: &[u8], on: &mut impl FnMut(SseItem<'_>)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if self.has_id {
                // The spec sets the last event id at dispatch even for an event without data.
                on(SseItem::Id {
                    id: &self.id,
                    data: self.has_data,
                });
                self.has_id = false;
            }
            if self.has_data {
                on(SseItem::Event(&self.data));
                self.data.clear();
                self.has_data = false;
            }
        } else if let Some(c) = line.strip_prefix(b":") {
            on(SseItem::Comment(c));
        } else if let Some(d) = line.strip_prefix(b"data") {
            let d = match d {
                [b':', b' ', rest @ ..] | [b':', rest @ ..] => rest,
                [] => d,
                _ => return, // a field named e.g. "datax": ignored
            };
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(d);
            self.has_data = true;
        } else if let Some(v) = line.strip_prefix(b"id") {
            let v = match v {
                [b':', b' ', rest @ ..] | [b':', rest @ ..] => rest,
                [] => v,
                _ => return, // e.g. "idx"
            };
            if !v.contains(&0) {
                self.id.clear();
                self.id.extend_from_slice(v);
                self.has_id = true;
            }
        }
    }
}

/// Reads `"<seq> <ts_us> ..."` from an event's data: the per-stream sequence number and the sender's
/// wall-clock stamp in µs since the epoch. `None` when the data doesn't start with two numbers.
pub fn parse_payload(data: &[u8]) -> Option<(u64, u64)> {
    let mut it = data
        .split(|b| b.is_ascii_whitespace())
        .filter(|s| !s.is_empty());
    let seq = std::str::from_utf8(it.next()?).ok()?.parse().ok()?;
    let ts = std::str::from_utf8(it.next()?).ok()?.parse().ok()?;
    Some((seq, ts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_split(body: &[u8], step: usize) -> (Vec<u8>, bool) {
        let mut d = ChunkDecoder::default();
        let mut out = Vec::new();
        for part in body.chunks(step) {
            d.feed(part, |b| out.extend_from_slice(b)).unwrap();
        }
        (out, d.done())
    }

    #[test]
    fn chunked_any_split() {
        let body = b"5\r\nhello\r\n1;ext=1\r\n \r\nb\r\nworld, dear\r\n0\r\nx-t: 1\r\n\r\n";
        for step in 1..body.len() {
            let (out, done) = decode_split(body, step);
            assert_eq!(out, b"hello world, dear", "step {step}");
            assert!(done);
        }
    }

    #[test]
    fn chunked_rejects_garbage() {
        let mut d = ChunkDecoder::default();
        assert!(d.feed(b"zz\r\n", |_| {}).is_err());
    }

    #[test]
    fn sse_events_and_comments() {
        let stream = b": heartbeat\n\nevent: e\nid: 1\ndata: 7 1000\ndata:two\r\n\ndata\n\n: x\n";
        for step in 1..stream.len() {
            assert_eq!(
                parse_in_steps(stream, step),
                ["C heartbeat", "I1", "E7 1000\ntwo", "E", "C x"],
                "step {step}"
            );
        }
    }

    /// `stream` fed `step` bytes at a time; each item as a letter and its bytes.
    fn parse_in_steps(stream: &[u8], step: usize) -> Vec<String> {
        let mut p = SseParser::default();
        let mut got = Vec::new();
        for part in stream.chunks(step) {
            p.feed(part, |item| {
                got.push(match item {
                    SseItem::Event(d) => format!("E{}", String::from_utf8_lossy(d)),
                    SseItem::Comment(c) => format!("C{}", String::from_utf8_lossy(c)),
                    SseItem::Id { id, data } => format!(
                        "I{}{}",
                        String::from_utf8_lossy(id),
                        if data { "" } else { "!" }
                    ),
                })
            })
            .unwrap();
        }
        got
    }

    #[test]
    fn sse_ids_at_dispatch() {
        let stream = b"id: a-1\ndata: x\n\nid: b\n\nidx: 9\nid\ndata: y\n\ndata: z\n\n";
        for step in 1..stream.len() {
            assert_eq!(
                parse_in_steps(stream, step),
                ["Ia-1", "Ex", "Ib!", "I", "Ey", "Ez"],
                "step {step}"
            );
        }
    }

    #[test]
    fn payloads() {
        assert_eq!(
            parse_payload(b"3 1700000000000000 pad"),
            Some((3, 1700000000000000))
        );
        assert_eq!(parse_payload(b"hello"), None);
    }

    #[test]
    fn heads() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\nrest";
        let h = parse_head(raw).unwrap().unwrap();
        assert_eq!((h.status, h.chunked, h.event_stream), (200, true, true));
        assert_eq!(&raw[h.len..], b"rest");
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n").unwrap().is_none());
    }
}
