//! Commands: the bodies of `/internal/send`, `/internal/publish`, `/internal/subscribe` and
//! `/internal/unsubscribe` (PROTOCOL §4, §8), validated into typed values in the protocol's order,
//! and the shape of `/internal/batch` (§12), whose items are those same bodies plus an `op`.
//!
//! Owns what a valid request is and the message of every 400; nothing here looks up a token, a
//! channel or the configuration, so a request is judged the same whatever the gateway holds
//! (validation always comes before any lookup). The values borrow from the parsed JSON: no string
//! is copied between the body and the frame encoder.

use serde_json::{Map, Value};

use crate::channels;
use crate::frame::Event;

/// A parsed JSON body: always an object.
pub type Object = Map<String, Value>;

/// `POST /internal/send`.
#[derive(Debug, PartialEq)]
pub struct Send<'a> {
    pub token: &'a str,
    pub event: Option<Event<'a>>,
    pub close: bool,
}

/// `POST /internal/publish`.
#[derive(Debug, PartialEq)]
pub struct Publish<'a> {
    pub channels: Vec<&'a str>,
    pub event: Option<Event<'a>>,
    pub close: bool,
}

/// `POST /internal/subscribe` and `/internal/unsubscribe`.
#[derive(Debug, PartialEq)]
pub struct Membership<'a> {
    pub token: &'a str,
    pub channels: Vec<&'a str>,
}

/// The operations, as `/internal/<name>` routes them and as a batch item's `op` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Send,
    Publish,
    Subscribe,
    Unsubscribe,
}

impl Operation {
    /// From a route's last path segment or a batch item's `op`.
    pub fn from_name(name: &str) -> Option<Operation> {
        match name {
            "send" => Some(Operation::Send),
            "publish" => Some(Operation::Publish),
            "subscribe" => Some(Operation::Subscribe),
            "unsubscribe" => Some(Operation::Unsubscribe),
            _ => None,
        }
    }
}

/// Why a body is invalid: the text after `Invalid request: ` in the 400 answer.
pub type Invalid = &'static str;

pub const NOT_AN_OBJECT: Invalid = "body must be a JSON object";
const PUBLISH_TARGET: Invalid = "exactly one of channel (a channel name) or channels (a non-empty array of channel names) is required; a channel name is 1-256 visible ASCII characters";
const CHANNEL_LIST: Invalid =
    "channels must be an array of channel names (1-256 visible ASCII characters)";

const BATCH_SHAPE: Invalid =
    "body must be {\"requests\":[...]}: an object whose requests is an array of operations";
const UNKNOWN_OP: Invalid = "op must be one of send, publish, subscribe, unsubscribe";

/// `POST /internal/batch`: the items, not yet looked at; a body of another shape is invalid as a
/// whole (nothing is applied).
pub fn batch(object: &Object) -> Result<&[Value], Invalid> {
    match object.get("requests") {
        Some(Value::Array(items)) => Ok(items),
        _ => Err(BATCH_SHAPE),
    }
}

/// One batch item: its operation and its body, which the operation's own parser validates as
/// it would the route's body. An item that is not an object is invalid as a body that is not
/// one would be; a missing or unknown `op` is invalid too. Either only fails that item.
pub fn batch_item(item: &Value) -> Result<(Operation, &Object), Invalid> {
    let Value::Object(object) = item else {
        return Err(NOT_AN_OBJECT);
    };
    match object.get("op") {
        Some(Value::String(op)) => Operation::from_name(op)
            .map(|operation| (operation, object))
            .ok_or(UNKNOWN_OP),
        _ => Err(UNKNOWN_OP),
    }
}

/// The body as a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Object, Invalid> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(object)) => Ok(object),
        _ => Err(NOT_AN_OBJECT),
    }
}

pub fn send(object: &Object) -> Result<Send<'_>, Invalid> {
    let token = token(object)?;
    let event = event(object)?;
    let close = close(object)?;
    Ok(Send {
        token,
        event,
        close,
    })
}

pub fn publish(object: &Object) -> Result<Publish<'_>, Invalid> {
    let channels = match (object.get("channel"), object.get("channels")) {
        (Some(Value::String(name)), None) if channels::is_valid_name(name) => vec![name.as_str()],
        (None, Some(list)) => match channels::parse_names(list) {
            Some(names) if !names.is_empty() => names,
            _ => return Err(PUBLISH_TARGET),
        },
        _ => return Err(PUBLISH_TARGET),
    };
    let event = event(object)?;
    let close = close(object)?;
    if event.is_none() && !close {
        return Err("event or close: true is required");
    }
    Ok(Publish {
        channels,
        event,
        close,
    })
}

/// Every name is checked before the token is looked up, so one bad name changes nothing.
pub fn membership(object: &Object) -> Result<Membership<'_>, Invalid> {
    let token = token(object)?;
    let channels = object
        .get("channels")
        .and_then(channels::parse_names)
        .ok_or(CHANNEL_LIST)?;
    Ok(Membership { token, channels })
}

fn token(object: &Object) -> Result<&str, Invalid> {
    match object.get("token") {
        Some(Value::String(token)) if !token.is_empty() => Ok(token),
        _ => Err("token is required and must be a string"),
    }
}

/// Validates `event` as PROTOCOL §4 orders its checks; `None` when there is no `event` key.
fn event(object: &Object) -> Result<Option<Event<'_>>, Invalid> {
    let event = match object.get("event") {
        None => return Ok(None),
        Some(Value::Object(event)) => event,
        Some(_) => return Err("event must be an object"),
    };
    let Some(Value::String(data)) = event.get("data") else {
        return Err("event.data is required and must be a string");
    };
    let name = match event.get("name") {
        None => None,
        Some(Value::String(name)) => Some(name.as_str()),
        Some(_) => return Err("event.name must be a string"),
    };
    if name.is_some_and(|n| n.contains(['\r', '\n'])) {
        return Err("event.name must not contain CR or LF");
    }
    let id = match event.get("id") {
        None => None,
        Some(Value::String(id)) => Some(id.as_str()),
        Some(_) => return Err("event.id must be a string"),
    };
    if id.is_some_and(|i| i.contains(['\r', '\n', '\0'])) {
        return Err("event.id must not contain CR, LF or NUL");
    }
    let retry = match event.get("retry") {
        None => None,
        Some(retry) => Some(
            retry
                .as_u64()
                .ok_or("event.retry must be a non-negative integer")?,
        ),
    };
    Ok(Some(Event {
        name,
        id,
        retry,
        data,
    }))
}

fn close(object: &Object) -> Result<bool, Invalid> {
    match object.get("close") {
        None => Ok(false),
        Some(Value::Bool(close)) => Ok(*close),
        Some(_) => Err("close must be a boolean"),
    }
}
