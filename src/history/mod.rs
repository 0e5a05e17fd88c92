//! History: channel events kept for `Last-Event-ID` resume (PROTOCOL §11), and the one rule that
//! decides whether a stream's position can be resumed from.
//!
//! Owns the position (the `id:` a published event carries with history on), the frame that
//! carries it, and [`resolve`]: from what is kept for a stream's channels and the position it
//! came back with, either the events to replay (in publish order, each once) or a gap. Where the
//! events are kept is not decided here: [`memory`] keeps them in this process (single node), and
//! [`crate::cluster`] keeps them in Redis, which hands back the same [`Kept`] snapshot, so both
//! modes answer a resume by the same code. It does not touch streams: [`crate::gateway`] merges
//! the replay into the stream's queue ([`crate::stream::Stream::resume`]).
//!
//! A position is `<epoch>-<seq>-<ms>`: `seq` orders every publish of the deployment (one counter
//! for all channels, so one value orders a stream in several channels), `epoch` names the life
//! of that counter (a restarted single node, or a Redis that lost its data, starts a new one, so
//! an old position is a gap and never a wrong resume), and `ms` is the publish time, which says
//! whether a channel that kept nothing could have had events since (they would have expired).

pub mod memory;

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{self, Event};

/// The event a stream gets first when its position cannot be resumed from.
pub const GAP_EVENT: &str = "gateway.gap";

/// A point in the deployment's publish order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub epoch: u32,
    pub seq: u64,
    /// Publish time, milliseconds since the Unix epoch (the clock of whoever keeps the history).
    pub ms: u64,
}

impl Position {
    /// Parses `<epoch hex>-<seq>-<ms>`; anything else is `None` (a gap, never an error).
    pub fn parse(text: &str) -> Option<Position> {
        let mut parts = text.split('-');
        let epoch = parts.next()?;
        let seq = parts.next()?;
        let ms = parts.next()?;
        if parts.next().is_some() || epoch.len() != 8 {
            return None;
        }
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(seq) || !digits(ms) {
            return None;
        }
        Some(Position {
            epoch: u32::from_str_radix(epoch, 16).ok()?,
            seq: seq.parse().ok()?,
            ms: ms.parse().ok()?,
        })
    }

    pub fn format(&self) -> String {
        format!("{:08x}-{}-{}", self.epoch, self.seq, self.ms)
    }
}

/// The frame of a published event with history on: `id: <position>` first, then the event as
/// [`frame::encode`] writes it (the route refused an `id` of the backend's own).
pub fn frame(position: &Position, event: &Event<'_>) -> Bytes {
    let body = frame::encode(event);
    let id = position.format();
    let mut out = BytesMut::with_capacity(ID.len() + id.len() + 1 + body.len());
    out.put_slice(ID);
    out.put_slice(id.as_bytes());
    out.put_u8(b'\n');
    out.put_slice(&body);
    out.freeze()
}

const ID: &[u8] = b"id: ";

/// `id: <position>` alone: a block without data dispatches no event, but sets the stream's last
/// event id (WHATWG HTML, server-sent events: the id is taken before the empty data is dropped).
pub fn position_frame(position: &Position) -> Bytes {
    Bytes::from(format!("id: {}\n\n", position.format()))
}

/// The position a history frame starts with; `None` for any other frame.
pub fn position_of(frame: &[u8]) -> Option<Position> {
    let rest = frame.strip_prefix(ID)?;
    let end = memchr::memchr(b'\n', rest)?;
    Position::parse(std::str::from_utf8(&rest[..end]).ok()?)
}

/// What is kept for one channel when a stream resumes.
#[derive(Debug, Default)]
pub struct Kept {
    /// Whether anything is known of the channel (its history exists).
    pub known: bool,
    /// The newest seq dropped from the channel by `HISTORY_SIZE` (or the byte bound); 0: none.
    pub floor: u64,
    /// Kept frames with a seq above the resuming position, in any order.
    pub frames: Vec<Bytes>,
}

/// The keeper's state when the snapshot was taken.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// The newest position handed out (seq 0 if none yet).
    pub position: Position,
    /// Highest seq dropped by a bound that forgets whole channels (single node: the byte bound);
    /// a channel it emptied is no longer [`Kept::known`], so a position below it is a gap.
    pub forgotten_through: u64,
}

/// What a stream that came back with a position gets first.
#[derive(Debug)]
pub enum Resume {
    /// Every event of its channels after the position `after`, oldest first, each once and with
    /// its seq; then live events after `through`.
    Complete {
        frames: Vec<(u64, Bytes)>,
        after: u64,
        through: u64,
    },
    /// The position cannot be resumed from: the `gateway.gap` frame, then live events after
    /// `through`.
    Gap { frame: Bytes, through: u64 },
}

/// The history's answer to a stream that came back with `last_event_id` (as received), given
/// what is kept for its channels: the rule of PROTOCOL §11, for both keepers.
pub fn resolve(last_event_id: &str, now: Now, ttl: Duration, channels: Vec<Kept>) -> Resume {
    let gap = || {
        let (frame, through) = gap(last_event_id, &now);
        Resume::Gap { frame, through }
    };
    let Some(from) = Position::parse(last_event_id) else {
        return gap();
    };
    if from.epoch != now.position.epoch || from.seq > now.position.seq {
        return gap();
    }
    let ttl = ttl.as_millis() as u64;
    // Kept past this time only by the sweep's lag: expired all the same.
    let horizon = now.position.ms.saturating_sub(ttl);
    let lost = channels.iter().any(|channel| {
        if channel.known {
            channel.floor > from.seq
        } else {
            // Nothing kept: events after `from` would be kept unless they expired, and only
            // events published more than a TTL ago can have; or the byte bound forgot them.
            from.ms <= horizon || from.seq < now.forgotten_through
        }
    });
    if lost {
        return gap();
    }
    let frames = kept_after(from.seq, channels);
    if frames.iter().any(|(at, _)| at.ms <= horizon) {
        return gap();
    }
    Resume::Complete {
        frames: frames.into_iter().map(|(at, f)| (at.seq, f)).collect(),
        after: from.seq,
        through: now.position.seq,
    }
}

/// The kept frames of `channels` after position `after`, oldest first, each once (an event
/// published to several of the channels is kept in each), with their positions: each frame's
/// `id:` line is read here, once.
pub fn kept_after(after: u64, channels: Vec<Kept>) -> Vec<(Position, Bytes)> {
    let mut frames: Vec<(Position, Bytes)> = channels
        .into_iter()
        .flat_map(|channel| channel.frames)
        .filter_map(|frame| Some((position_of(&frame)?, frame)))
        .filter(|(at, _)| at.seq > after)
        .collect();
    frames.sort_unstable_by_key(|(at, _)| at.seq);
    frames.dedup_by_key(|(at, _)| at.seq);
    frames
}

/// `event: gateway.gap` with the position as received and the current position as its `id`,
/// and the position live events start after.
pub fn gap(last_event_id: &str, now: &Now) -> (Bytes, u64) {
    let data = serde_json::json!({ "last_event_id": last_event_id }).to_string();
    let id = now.position.format();
    let frame = frame::encode(&Event {
        name: Some(GAP_EVENT),
        id: Some(&id),
        retry: None,
        data: &data,
    });
    (frame, now.position.seq)
}

/// The position a stream came back with: the `Last-Event-ID` header, else the percent-decoded
/// `last_event_id` query parameter (a page reopening an `EventSource` cannot set the header).
pub fn requested(header: Option<&[u8]>, target: &str) -> Option<String> {
    if let Some(value) = header {
        return Some(String::from_utf8_lossy(value).into_owned());
    }
    let query = target.split_once('?')?.1;
    let value = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("last_event_id="))?;
    Some(percent_decode(value))
}

/// `%XX` escapes and `+` (as a form encodes a space) decoded; an invalid escape is kept as is.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: u32 = 0x1234_abcd;

    fn at(seq: u64, ms: u64) -> Position {
        Position {
            epoch: EPOCH,
            seq,
            ms,
        }
    }

    fn kept(seqs: &[(u64, u64)], floor: u64) -> Kept {
        Kept {
            known: true,
            floor,
            frames: seqs
                .iter()
                .map(|&(seq, ms)| frame(&at(seq, ms), &Event::default()))
                .collect(),
        }
    }

    fn now(seq: u64, ms: u64) -> Now {
        Now {
            position: at(seq, ms),
            forgotten_through: 0,
        }
    }

    fn seqs(resume: Resume) -> Vec<u64> {
        match resume {
            Resume::Complete { frames, .. } => frames.iter().map(|(seq, _)| *seq).collect(),
            Resume::Gap { .. } => panic!("a gap"),
        }
    }

    const TTL: Duration = Duration::from_secs(300);

    #[test]
    fn positions_round_trip_and_nothing_else_parses() {
        let p = at(42, 1_700_000_000_123);
        assert_eq!(Position::parse(&p.format()), Some(p));
        for bad in [
            "",
            "42",
            "1234abcd-42",
            "1234abcd-42-1-2",
            "1234abc-1-1",
            "1234abcd--1",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn several_channels_merge_in_publish_order_each_once() {
        let a = kept(&[(5, 10), (3, 10), (8, 10)], 0);
        let b = kept(&[(4, 10), (8, 10), (9, 10)], 0);
        let from = at(3, 10).format();
        assert_eq!(
            seqs(resolve(&from, now(9, 11), TTL, vec![a, b])),
            vec![4, 5, 8, 9]
        );
    }

    #[test]
    fn a_dropped_event_after_the_position_is_a_gap_and_one_before_is_not() {
        let from = at(3, 10).format();
        let gap = resolve(&from, now(9, 11), TTL, vec![kept(&[(9, 10)], 4)]);
        assert!(matches!(gap, Resume::Gap { through: 9, .. }));
        let ok = resolve(&from, now(9, 11), TTL, vec![kept(&[(9, 10)], 3)]);
        assert_eq!(seqs(ok), vec![9]);
    }

    #[test]
    fn unknown_epochs_future_positions_and_garbage_are_gaps() {
        let foreign = Position {
            epoch: 1,
            ..at(3, 10)
        };
        for from in [foreign.format(), at(10, 10).format(), "hello".into()] {
            let resume = resolve(&from, now(9, 11), TTL, vec![kept(&[], 0)]);
            assert!(matches!(resume, Resume::Gap { .. }), "{from}");
        }
    }

    #[test]
    fn expired_events_and_forgotten_channels_are_gaps() {
        let ttl_ms = TTL.as_millis() as u64;
        let from = at(3, 1000).format();
        let expired = kept(&[(4, 1000)], 0);
        let resume = resolve(&from, now(4, 1000 + ttl_ms), TTL, vec![expired]);
        assert!(matches!(resume, Resume::Gap { .. }));
        // A channel that kept nothing: fine for a recent position, a gap for one older than the
        // TTL or below what the byte bound forgot.
        let unknown = || Kept::default();
        assert_eq!(
            seqs(resolve(&from, now(4, 2000), TTL, vec![unknown()])),
            Vec::<u64>::new()
        );
        let old = resolve(&from, now(4, 1000 + ttl_ms), TTL, vec![unknown()]);
        assert!(matches!(old, Resume::Gap { .. }));
        let forgotten = Now {
            forgotten_through: 4,
            ..now(4, 2000)
        };
        let resume = resolve(&from, forgotten, TTL, vec![unknown()]);
        assert!(matches!(resume, Resume::Gap { .. }));
    }

    #[test]
    fn the_gap_names_the_position_as_received_and_the_current_one() {
        let Resume::Gap { frame, through } = resolve("a\"b", now(7, 1), TTL, vec![]) else {
            panic!("a gap");
        };
        assert_eq!(through, 7);
        let text = std::str::from_utf8(&frame).unwrap();
        assert!(
            text.starts_with("event: gateway.gap\nid: 1234abcd-7-1\n"),
            "{text}"
        );
        assert!(text.contains(r#"data: {"last_event_id":"a\"b"}"#), "{text}");
    }

    #[test]
    fn the_header_wins_and_the_query_is_percent_decoded() {
        assert_eq!(
            requested(Some(b"h"), "/s?last_event_id=q").as_deref(),
            Some("h")
        );
        assert_eq!(
            requested(None, "/s?x=1&last_event_id=ab%2Dc%20d+e%zz").as_deref(),
            Some("ab-c d e%zz")
        );
        assert_eq!(requested(None, "/s?x=1"), None);
    }
}
