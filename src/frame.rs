//! Frames: the SSE wire format (PROTOCOL §3), encoded once into an immutable [`Bytes`].
//!
//! Owns the byte layout of event and heartbeat frames. A frame is built in one allocation of exactly
//! its size, then shared by refcount with every stream it goes to; nothing here knows about streams,
//! queues or validation (the routes refuse `\r`/`\n` in `name`/`id` before a frame is built).

use bytes::{BufMut, Bytes, BytesMut};

/// The keep-alive comment; `Bytes::from_static` makes every clone free.
pub static HEARTBEAT: Bytes = Bytes::from_static(b": heartbeat\n\n");

/// One event, as validated by the routes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event<'a> {
    /// Written as `event:` only when non-empty.
    pub name: Option<&'a str>,
    pub id: Option<&'a str>,
    pub retry: Option<u64>,
    pub data: &'a str,
}

/// Encodes `event` as one frame: `event:`, `id:`, `retry:`, one `data:` line per line of data, then
/// a blank line. Data is split on `\r\n`, `\r` and `\n`, every line break the SSE spec knows.
pub fn encode(event: &Event<'_>) -> Bytes {
    let name = event.name.filter(|n| !n.is_empty());
    let mut retry_digits = itoa_buf();
    let retry = event.retry.map(|r| format_u64(r, &mut retry_digits));

    let lines = data_lines(event.data);
    let data_len: usize = lines.clone().map(|l| DATA.len() + l.len() + 1).sum();
    let len = name.map_or(0, |n| EVENT.len() + n.len() + 1)
        + event.id.map_or(0, |i| ID.len() + i.len() + 1)
        + retry.map_or(0, |r| RETRY.len() + r.len() + 1)
        + data_len
        + 1;

    let mut buf = BytesMut::with_capacity(len);
    if let Some(name) = name {
        put_field(&mut buf, EVENT, name);
    }
    if let Some(id) = event.id {
        put_field(&mut buf, ID, id);
    }
    if let Some(retry) = retry {
        put_field(&mut buf, RETRY, retry);
    }
    for line in lines {
        put_field(&mut buf, DATA, line);
    }
    buf.put_u8(b'\n');
    debug_assert_eq!(buf.len(), len);
    buf.freeze()
}

const EVENT: &[u8] = b"event: ";
const ID: &[u8] = b"id: ";
const RETRY: &[u8] = b"retry: ";
const DATA: &[u8] = b"data: ";

fn put_field(buf: &mut BytesMut, field: &[u8], value: &str) {
    buf.put_slice(field);
    buf.put_slice(value.as_bytes());
    buf.put_u8(b'\n');
}

/// The logical lines of `data`; `""` is one empty line, and a trailing break yields a final empty line.
fn data_lines(data: &str) -> impl Iterator<Item = &str> + Clone {
    DataLines {
        rest: Some(data.as_bytes()),
    }
    // SAFETY of the conversion below: we split only at ASCII `\r`/`\n`, which are never inside a
    // multi-byte UTF-8 sequence, so every piece is valid UTF-8.
    .map(|line| std::str::from_utf8(line).expect("split at ASCII boundaries"))
}

#[derive(Clone)]
struct DataLines<'a> {
    rest: Option<&'a [u8]>,
}

impl<'a> Iterator for DataLines<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = self.rest?;
        // SIMD search: a 4 KiB line costs two scans of well under a microsecond.
        match memchr::memchr2(b'\r', b'\n', rest) {
            None => {
                self.rest = None;
                Some(rest)
            }
            Some(i) => {
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                self.rest = Some(&rest[i + skip..]);
                Some(&rest[..i])
            }
        }
    }
}

fn itoa_buf() -> [u8; 20] {
    [0; 20]
}

fn format_u64(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).expect("ASCII digits")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: Option<&str>, id: Option<&str>, retry: Option<u64>, data: &str) -> String {
        let bytes = encode(&Event {
            name,
            id,
            retry,
            data,
        });
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn fields_in_protocol_order() {
        assert_eq!(
            frame(Some("price"), Some("7"), Some(5000), "x"),
            "event: price\nid: 7\nretry: 5000\ndata: x\n\n"
        );
        assert_eq!(frame(None, None, Some(0), "x"), "retry: 0\ndata: x\n\n");
        assert_eq!(
            frame(None, None, Some(u64::MAX), "x"),
            "retry: 18446744073709551615\ndata: x\n\n"
        );
    }

    #[test]
    fn empty_name_is_omitted_and_empty_data_is_one_line() {
        assert_eq!(frame(Some(""), None, None, ""), "data: \n\n");
    }

    #[test]
    fn data_splits_on_every_line_break() {
        assert_eq!(
            frame(None, None, None, "a\r\nb\rc\nd"),
            "data: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        assert_eq!(frame(None, None, None, "a\n"), "data: a\ndata: \n\n");
        assert_eq!(
            frame(None, None, None, "\r\r\n"),
            "data: \ndata: \ndata: \n\n"
        );
        assert_eq!(frame(None, None, None, "é\n€"), "data: é\ndata: €\n\n");
    }
}
