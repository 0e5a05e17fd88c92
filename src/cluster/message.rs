//! Message: the bytes one node puts in a Redis pub/sub message for another, and their decoding.
//!
//! Owns the node-to-node wire format and nothing else: no Redis calls, no delivery. Requests are
//! validated on the node that received the HTTP request, so a message carries what the holder needs
//! to act, already checked: the token, the channel names, and the event as the frame bytes that the
//! origin encoded once (PROTOCOL §3), which the holder writes as they are. Integers are big-endian.
//!
//! ```text
//! send         b'S' origin(25) token(16) close(1) frame…        (empty frame: no event)
//! subscribe    b'J' origin(25) token(16) names               (names joined by '\n')
//! unsubscribe  b'L' origin(25) token(16) names
//! publish      b'P' origin(25) close(1) names_len(4) names frame…
//! reply        b'R' instance(8) id(8) code(1) value(8)
//! origin       instance(8) node(1) id(8) expires_ms(8)
//! ```
//! `instance` is the asking process's random id (a reply is for the process that asked, even if two
//! processes ever share a node number), `node` its node number (where replies go), `expires_ms` the
//! Unix time in ms when it stops waiting: a message that arrives later is dropped unapplied, so a
//! request answered 503 because Redis stalled is not carried out when Redis wakes up.

use bytes::{BufMut, Bytes, BytesMut};

use crate::token::Token;

/// What a holder answers a request with; `value` carries a count or a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Ok,
    NotFound,
    /// The stream's queue overflowed and it was ended (PROTOCOL §4's 500).
    Overflowed,
    /// `MAX_CHANNELS_PER_STREAM` on the holder; the value is the limit.
    TooManyChannels,
    /// A publish's local deliveries; the value is the count.
    Delivered,
}

impl Code {
    fn to_byte(self) -> u8 {
        match self {
            Code::Ok => 0,
            Code::NotFound => 1,
            Code::Overflowed => 2,
            Code::TooManyChannels => 3,
            Code::Delivered => 4,
        }
    }

    fn from_byte(byte: u8) -> Option<Code> {
        Some(match byte {
            0 => Code::Ok,
            1 => Code::NotFound,
            2 => Code::Overflowed,
            3 => Code::TooManyChannels,
            4 => Code::Delivered,
            _ => return None,
        })
    }
}

/// The operation a request asks of a token's holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    Send { close: bool },
    Subscribe,
    Unsubscribe,
}

/// Who sent a message, which of its waiting requests it belongs to, and until when it waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    pub instance: u64,
    pub node: u8,
    pub id: u64,
    pub expires_ms: u64,
}

#[derive(Debug, PartialEq)]
pub enum Message<'a> {
    Request {
        origin: Origin,
        token: Token,
        ask: Ask,
        /// The frame of a send (empty: none), or the channel names of a membership change.
        rest: &'a [u8],
    },
    Publish {
        origin: Origin,
        close: bool,
        names: &'a [u8],
        /// Offset of the frame in the message (empty frame: no event), so it is sliced, not copied.
        frame_at: usize,
    },
    Reply {
        instance: u64,
        id: u64,
        code: Code,
        value: u64,
    },
}

const SEND: u8 = b'S';
const SUBSCRIBE: u8 = b'J';
const UNSUBSCRIBE: u8 = b'L';
pub(crate) const PUBLISH: u8 = b'P';
const REPLY: u8 = b'R';
const ORIGIN_LEN: usize = 8 + 1 + 8 + 8;

fn put_origin(out: &mut BytesMut, origin: Origin) {
    out.put_u64(origin.instance);
    out.put_u8(origin.node);
    out.put_u64(origin.id);
    out.put_u64(origin.expires_ms);
}

/// A request for a token's holder: `rest` is the send's frame or the joined channel names.
pub fn request(origin: Origin, token: Token, ask: Ask, rest: &[&[u8]]) -> Bytes {
    let len = rest.iter().map(|part| part.len() + 1).sum::<usize>();
    let mut out = BytesMut::with_capacity(1 + ORIGIN_LEN + 16 + 1 + len);
    out.put_u8(match ask {
        Ask::Send { .. } => SEND,
        Ask::Subscribe => SUBSCRIBE,
        Ask::Unsubscribe => UNSUBSCRIBE,
    });
    put_origin(&mut out, origin);
    out.put_slice(&token.to_bytes());
    match ask {
        Ask::Send { close } => {
            out.put_u8(u8::from(close));
            rest.iter().for_each(|part| out.put_slice(part));
        }
        Ask::Subscribe | Ask::Unsubscribe => join_names(&mut out, rest),
    }
    out.freeze()
}

fn join_names(out: &mut BytesMut, names: &[&[u8]]) {
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            out.put_u8(b'\n');
        }
        out.put_slice(name);
    }
}

/// A publish to the members of any of `names` (channel names never contain `'\n'`).
pub fn publish(origin: Origin, close: bool, names: &[&str], frame: Option<&Bytes>) -> Bytes {
    let names_len = names
        .iter()
        .map(|n| n.len() + 1)
        .sum::<usize>()
        .saturating_sub(1);
    let frame = frame.map_or(&[][..], |f| &f[..]);
    let mut out = BytesMut::with_capacity(1 + ORIGIN_LEN + 5 + names_len + frame.len());
    out.put_u8(PUBLISH);
    put_origin(&mut out, origin);
    out.put_u8(u8::from(close));
    out.put_u32(names_len as u32);
    let names: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
    join_names(&mut out, &names);
    out.put_slice(frame);
    out.freeze()
}

pub fn reply(instance: u64, id: u64, code: Code, value: u64) -> Bytes {
    let mut out = BytesMut::with_capacity(1 + 8 + 8 + 1 + 8);
    out.put_u8(REPLY);
    out.put_u64(instance);
    out.put_u64(id);
    out.put_u8(code.to_byte());
    out.put_u64(value);
    out.freeze()
}

/// Splits joined channel names back into names.
pub fn names(joined: &[u8]) -> impl Iterator<Item = &str> {
    joined
        .split(|&b| b == b'\n')
        .filter_map(|name| std::str::from_utf8(name).ok())
        .filter(|name| !name.is_empty())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let part = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(part)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    fn origin(&mut self) -> Option<Origin> {
        Some(Origin {
            instance: self.u64()?,
            node: self.u8()?,
            id: self.u64()?,
            expires_ms: self.u64()?,
        })
    }

    fn rest(&self) -> &'a [u8] {
        &self.bytes[self.at..]
    }
}

/// `None` for bytes that are not a message of this version (logged and dropped by the caller).
pub fn decode(bytes: &[u8]) -> Option<Message<'_>> {
    let mut reader = Reader { bytes, at: 0 };
    let kind = reader.u8()?;
    Some(match kind {
        SEND | SUBSCRIBE | UNSUBSCRIBE => {
            let origin = reader.origin()?;
            let token = Token::from_bytes(reader.take(16)?.try_into().ok()?);
            let ask = match kind {
                SEND => Ask::Send {
                    close: reader.u8()? != 0,
                },
                SUBSCRIBE => Ask::Subscribe,
                _ => Ask::Unsubscribe,
            };
            Message::Request {
                origin,
                token,
                ask,
                rest: reader.rest(),
            }
        }
        PUBLISH => {
            let origin = reader.origin()?;
            let close = reader.u8()? != 0;
            let names_len = reader.u32()? as usize;
            let names = reader.take(names_len)?;
            Message::Publish {
                origin,
                close,
                names,
                frame_at: reader.at,
            }
        }
        REPLY => Message::Reply {
            instance: reader.u64()?,
            id: reader.u64()?,
            code: Code::from_byte(reader.u8()?)?,
            value: reader.u64()?,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: Origin = Origin {
        instance: 0x0102_0304_0506_0708,
        node: 9,
        id: u64::MAX - 1,
        expires_ms: 1_800_000_000_000,
    };

    #[test]
    fn requests_round_trip() {
        let token = Token::random().with_address(0xAB12_3456);
        let frame = Bytes::from_static(b"event: x\ndata: y\n\n");
        let sent = request(ORIGIN, token, Ask::Send { close: true }, &[&frame]);
        assert_eq!(
            decode(&sent),
            Some(Message::Request {
                origin: ORIGIN,
                token,
                ask: Ask::Send { close: true },
                rest: &frame[..],
            })
        );
        let joined = request(ORIGIN, token, Ask::Subscribe, &[b"a", b"b.c"]);
        let Some(Message::Request { ask, rest, .. }) = decode(&joined) else {
            panic!("not a request");
        };
        assert_eq!(ask, Ask::Subscribe);
        assert_eq!(names(rest).collect::<Vec<_>>(), ["a", "b.c"]);
    }

    #[test]
    fn publishes_and_replies_round_trip() {
        let frame = Bytes::from_static(b"data: 1\n\n");
        let bytes = publish(ORIGIN, false, &["x", "y"], Some(&frame));
        let Some(Message::Publish {
            origin,
            close,
            names: joined,
            frame_at,
        }) = decode(&bytes)
        else {
            panic!("not a publish");
        };
        assert_eq!((origin, close), (ORIGIN, false));
        assert_eq!(names(joined).collect::<Vec<_>>(), ["x", "y"]);
        assert_eq!(&bytes[frame_at..], &frame[..]);
        let bytes = publish(ORIGIN, true, &["only"], None);
        let Some(Message::Publish { frame_at, .. }) = decode(&bytes) else {
            panic!("not a publish");
        };
        assert_eq!(frame_at, bytes.len());
        assert_eq!(
            decode(&reply(7, 8, Code::TooManyChannels, 1024)),
            Some(Message::Reply {
                instance: 7,
                id: 8,
                code: Code::TooManyChannels,
                value: 1024
            })
        );
    }

    #[test]
    fn truncated_or_unknown_bytes_are_not_messages() {
        let token = Token::random().with_address(1);
        let whole = request(ORIGIN, token, Ask::Send { close: false }, &[]);
        for len in 0..whole.len() {
            assert_eq!(decode(&whole[..len]), None, "{len}");
        }
        assert_eq!(decode(b"Zxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"), None);
        let mut bad = reply(1, 2, Code::Ok, 0).to_vec();
        bad[17] = 99;
        assert_eq!(decode(&bad), None);
    }
}
