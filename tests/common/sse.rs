//! An event-stream parser written from the WHATWG HTML standard ("Server-sent events",
//! "Interpreting an event stream"), independent of the gateway's own code.
//!
//! Lines end in CRLF, CR or LF; a leading UTF-8 BOM is dropped; `event`, `data`, `id` and `retry`
//! are the known fields; a line starting with `:` is a comment (counted, and handed out so tests
//! can observe heartbeats); a blank line dispatches. One test-only extension: an [`Event`] also
//! carries the `retry` value seen in its own frame, so a test can check the frame held it.

/// One dispatched event, as a browser's `MessageEvent` would see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event type: the `event` field, or `message` when there was none.
    pub event: String,
    /// The data lines joined with `\n`.
    pub data: String,
    /// The stream's last event ID at dispatch (it persists across events).
    pub last_event_id: String,
    /// A valid `retry` field seen since the previous dispatch (test extension).
    pub retry: Option<u64>,
}

/// What the parser hands out, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Event(Event),
    /// A comment line's text after the colon, with one leading space removed.
    Comment(String),
}

#[derive(Debug, Default)]
pub struct Parser {
    /// Bytes of a line not yet terminated.
    pending: Vec<u8>,
    bom_checked: bool,
    data: String,
    event_type: String,
    last_event_id_buffer: String,
    last_event_id: String,
    retry_in_frame: Option<u64>,
    /// The reconnection time set by the last valid `retry` field.
    pub reconnection_time: Option<u64>,
    /// Comment lines seen so far.
    pub comments: usize,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes of the stream (any split) and returns what they completed.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Item> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        if !self.bom_checked {
            if self.pending.len() < BOM.len() && BOM.starts_with(&self.pending) {
                return out;
            }
            if self.pending.starts_with(BOM) {
                self.pending.drain(..BOM.len());
            }
            self.bom_checked = true;
        }
        let mut start = 0;
        loop {
            let rest = &self.pending[start..];
            let Some(pos) = rest.iter().position(|&b| b == b'\r' || b == b'\n') else {
                break;
            };
            let next = if rest[pos] == b'\r' {
                match rest.get(pos + 1) {
                    // A CR at the end of what we have: an LF may follow in the next read.
                    None => break,
                    Some(b'\n') => pos + 2,
                    Some(_) => pos + 1,
                }
            } else {
                pos + 1
            };
            let line = String::from_utf8_lossy(&rest[..pos]).into_owned();
            start += next;
            self.line(&line, &mut out);
        }
        self.pending.drain(..start);
        out
    }

    /// The stream ended: a trailing lone CR still ends a line; an undispatched event is dropped,
    /// as the standard says.
    pub fn finish(&mut self) -> Vec<Item> {
        let mut out = Vec::new();
        if self.pending.ends_with(b"\r") {
            let line =
                String::from_utf8_lossy(&self.pending[..self.pending.len() - 1]).into_owned();
            self.pending.clear();
            self.line(&line, &mut out);
        }
        out
    }

    /// The stream's last event ID as a browser would send it back on reconnect: set at each
    /// dispatch, also by a block that carries an id and no data (which fires no event).
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    fn line(&mut self, line: &str, out: &mut Vec<Item>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            self.comments += 1;
            out.push(Item::Comment(
                comment.strip_prefix(' ').unwrap_or(comment).to_owned(),
            ));
            return;
        }
        let (field, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line, ""),
        };
        match field {
            "event" => self.event_type = value.to_owned(),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => self.last_event_id_buffer = value.to_owned(),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                // All digits but too large for u64: ignored like any invalid value.
                if let Ok(ms) = value.parse::<u64>() {
                    self.reconnection_time = Some(ms);
                    self.retry_in_frame = Some(ms);
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<Item>) {
        self.last_event_id = self.last_event_id_buffer.clone();
        let retry = self.retry_in_frame.take();
        if self.data.is_empty() {
            self.event_type.clear();
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        if data.ends_with('\n') {
            data.pop();
        }
        let event = if self.event_type.is_empty() {
            "message".to_owned()
        } else {
            std::mem::take(&mut self.event_type)
        };
        self.event_type.clear();
        out.push(Item::Event(Event {
            event,
            data,
            last_event_id: self.last_event_id.clone(),
            retry,
        }));
    }
}

/// Parses a whole stream at once (for tests of the parser and of recorded payloads).
pub fn parse_all(bytes: &[u8]) -> Vec<Item> {
    let mut p = Parser::new();
    let mut items = p.feed(bytes);
    items.extend(p.finish());
    items
}

/// Only the events of [`parse_all`].
pub fn events(bytes: &[u8]) -> Vec<Event> {
    parse_all(bytes)
        .into_iter()
        .filter_map(|i| match i {
            Item::Event(e) => Some(e),
            Item::Comment(_) => None,
        })
        .collect()
}
