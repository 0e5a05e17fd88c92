//! Property tests of the frame encoder (`src/frame.rs`, PROTOCOL §3): random events are encoded
//! and read back by the independent WHATWG parser of `tests/common/sse.rs`, which must see the
//! same event (data with every line break as `\n`), and nothing before, after or inside it that
//! the encoder did not mean.
//!
//! Cases: proptest's default (256 per property), or `PROPTEST_CASES=N` for a longer bounded run,
//! e.g. `PROPTEST_CASES=100000 cargo test --release --test properties`.

#[path = "common/sse.rs"]
#[allow(
    dead_code,
    reason = "the harness's parser module also serves other test files"
)]
mod sse;

use proptest::prelude::*;
use sse::{Event, Item, Parser};
use sse_gateway::frame::{self, encode};

/// Data as a backend might send it: runs of text, every line break the SSE spec knows (alone and
/// in awkward neighbours like `\r` then `\n` from different pieces), field-like text, and any
/// Unicode scalar at all (controls, the BOM, non-BMP).
fn data() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => "[a-z0-9 ]{0,8}",
        2 => Just("\r".to_owned()),
        2 => Just("\n".to_owned()),
        2 => Just("\r\n".to_owned()),
        1 => Just("data: ".to_owned()),
        1 => Just(":".to_owned()),
        1 => Just("event: x".to_owned()),
        1 => Just("\u{feff}".to_owned()),
        2 => any::<char>().prop_map(String::from),
        1 => "\\PC{0,4}",
    ];
    prop::collection::vec(piece, 0..24).prop_map(|p| p.concat())
}

/// A field value the routes accept for `name`: any text without CR or LF.
fn name() -> impl Strategy<Value = Option<String>> {
    prop::option::of("[^\r\n]{0,12}")
}

/// A field value the routes accept for `id`: any text without CR, LF or NUL.
fn id() -> impl Strategy<Value = Option<String>> {
    prop::option::of("[^\r\n\u{0}]{0,12}")
}

fn retry() -> impl Strategy<Value = Option<u64>> {
    prop::option::of(prop_oneof![0..10_000u64, any::<u64>()])
}

/// What a browser must see for the event.
fn expected(name: Option<&str>, id: Option<&str>, retry: Option<u64>, data: &str) -> Event {
    Event {
        event: match name {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => "message".to_owned(),
        },
        data: data.replace("\r\n", "\n").replace('\r', "\n"),
        last_event_id: id.unwrap_or("").to_owned(),
        retry,
    }
}

/// A frame the parser reads after the one under test: it must come out exactly as sent, so the
/// frame under test left no field, type or partial line behind.
const SENTINEL: &[u8] = b"data: end\n\n";

fn sentinel(last_event_id: &str) -> Item {
    Item::Event(Event {
        event: "message".to_owned(),
        data: "end".to_owned(),
        last_event_id: last_event_id.to_owned(),
        retry: None,
    })
}

proptest! {
    #[test]
    fn every_event_round_trips_through_an_independent_parser(
        name in name(),
        id in id(),
        retry in retry(),
        data in data(),
        split in any::<prop::sample::Index>(),
    ) {
        let bytes = encode(&frame::Event {
            name: name.as_deref(),
            id: id.as_deref(),
            retry,
            data: &data,
        });

        // One blank line, at the end, and no CR anywhere: every break in data became one LF.
        prop_assert!(bytes.ends_with(b"\n\n"), "{:?}", bytes);
        let body = &bytes[..bytes.len() - 1];
        prop_assert!(!body.windows(2).any(|w| w == b"\n\n"), "blank line inside {:?}", bytes);
        prop_assert!(!bytes.contains(&b'\r'), "{:?}", bytes);
        // Every line is one of the four fields, in PROTOCOL order.
        let text = std::str::from_utf8(&bytes).expect("UTF-8 in, UTF-8 out");
        let order = |line: &str| ["event: ", "id: ", "retry: ", "data: "]
            .iter()
            .position(|f| line.starts_with(f));
        let ranks: Vec<Option<usize>> = text[..text.len() - 2].split('\n').map(order).collect();
        prop_assert!(ranks.iter().all(Option::is_some), "unknown line in {text:?}");
        prop_assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "field order in {text:?}");

        // Read in two pieces at an arbitrary byte (even inside a UTF-8 sequence or a field name),
        // followed by the sentinel frame.
        let mut stream = bytes.to_vec();
        stream.extend_from_slice(SENTINEL);
        let cut = split.index(bytes.len() + 1);
        let mut parser = Parser::new();
        let mut items = parser.feed(&stream[..cut]);
        items.extend(parser.feed(&stream[cut..]));
        items.extend(parser.finish());

        let want = expected(name.as_deref(), id.as_deref(), retry, &data);
        let last_id = want.last_event_id.clone();
        prop_assert_eq!(items, vec![Item::Event(want), sentinel(&last_id)]);
        prop_assert_eq!(parser.comments, 0);
    }

    #[test]
    fn frames_back_to_back_stay_apart(
        a in (name(), id(), retry(), data()),
        b in (name(), id(), retry(), data()),
    ) {
        let enc = |(n, i, r, d): &(Option<String>, Option<String>, Option<u64>, String)| {
            encode(&frame::Event { name: n.as_deref(), id: i.as_deref(), retry: *r, data: d })
        };
        let mut stream = enc(&a).to_vec();
        stream.extend_from_slice(&enc(&b));
        let got = sse::parse_all(&stream);

        let first = expected(a.0.as_deref(), a.1.as_deref(), a.2, &a.3);
        let mut second = expected(b.0.as_deref(), b.1.as_deref(), b.2, &b.3);
        // The last event ID persists across events when the second frame carries none.
        if b.1.is_none() {
            second.last_event_id = first.last_event_id.clone();
        }
        prop_assert_eq!(got, vec![Item::Event(first), Item::Event(second)]);
    }
}

/// The heartbeat is a comment the parser counts and never turns into an event.
#[test]
fn heartbeat_is_one_comment_and_no_event() {
    let mut parser = Parser::new();
    let items = parser.feed(&frame::HEARTBEAT);
    assert_eq!(items, vec![Item::Comment("heartbeat".to_owned())]);
    assert!(parser.finish().is_empty());
}
