//! Property tests (bounded fuzzing) of the `/internal/*` body parser, `sse_gateway::command`.
//!
//! Two properties, on generated input:
//! - any bytes at all, and any JSON object with any values under the known keys, are answered
//!   with a command or a 400 message, never a panic;
//! - the parser agrees with a naive twin written here straight from PROTOCOL.md §4 and §8 (the
//!   checks in the order the tables give them), on objects built to hit every branch;
//! - a batch item (§12) is judged as the body of its `op`'s route: the same command or the same
//!   400, and a value that is not an object gets a body's "not an object".
//!
//! Cases per property: proptest's default (256), or `PROPTEST_CASES` (CI sets it higher, bounded).

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use sse_gateway::command;

/// Any JSON value, nested a few levels, with strings that favour the characters the parser cares
/// about (line breaks, NUL, spaces, non-ASCII).
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        tricky_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((tricky_string(), inner), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

fn tricky_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z.]{0,8}",
        "[ -~]{0,12}",
        "[a\r\n\0 é]{0,6}",
        Just(String::new()),
        Just("x".repeat(256)),
        Just("x".repeat(257)),
    ]
}

/// Mostly a string of the kind the parser checks, sometimes any JSON at all.
fn mostly_string() -> impl Strategy<Value = Value> {
    prop_oneof![4 => tricky_string().prop_map(Value::String), 1 => any_json()]
}

/// An object whose keys, each present or not, hold mostly the type the routes expect (so every
/// check is reached) and sometimes anything.
fn request_object() -> impl Strategy<Value = Map<String, Value>> {
    let event_fields = (
        proptest::option::of(mostly_string()),
        proptest::option::of(mostly_string()),
        proptest::option::of(mostly_string()),
        proptest::option::of(
            prop_oneof![3 => any::<u64>().prop_map(|n| json!(n)), 1 => any_json()],
        ),
    );
    let event = prop_oneof![
        4 => event_fields.prop_map(|(data, name, id, retry)| {
            let mut event = Map::new();
            for (key, value) in [("data", data), ("name", name), ("id", id), ("retry", retry)] {
                if let Some(value) = value {
                    event.insert(key.to_owned(), value);
                }
            }
            Value::Object(event)
        }),
        1 => any_json(),
    ];
    let close = prop_oneof![3 => any::<bool>().prop_map(Value::Bool), 1 => any_json()];
    let list = prop_oneof![3 => channel_list(), 1 => any_json()];
    (
        proptest::option::of(mostly_string()),
        proptest::option::of(event),
        proptest::option::of(close),
        proptest::option::of(mostly_string()),
        proptest::option::of(list),
        proptest::option::of(any_json()),
    )
        .prop_map(|(token, event, close, channel, channels, other)| {
            let mut object = Map::new();
            for (key, value) in [
                ("token", token),
                ("event", event),
                ("close", close),
                ("channel", channel),
                ("channels", channels),
                ("other", other),
            ] {
                if let Some(value) = value {
                    object.insert(key.to_owned(), value);
                }
            }
            object
        })
}

fn channel_list() -> impl Strategy<Value = Value> {
    prop::collection::vec(tricky_string(), 0..4).prop_map(|names| json!(names))
}

// ---- the naive twin -----------------------------------------------------------------------------

fn is_name(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| (b'!'..=b'~').contains(&b))
    })
}

fn names_ok(v: &Value) -> bool {
    v.as_array().is_some_and(|a| a.iter().all(is_name))
}

fn twin_event(o: &Map<String, Value>) -> Result<(), &'static str> {
    let Some(event) = o.get("event") else {
        return Ok(());
    };
    let Some(e) = event.as_object() else {
        return Err("event must be an object");
    };
    if !e.get("data").is_some_and(Value::is_string) {
        return Err("event.data is required and must be a string");
    }
    if e.get("name").is_some_and(|n| !n.is_string()) {
        return Err("event.name must be a string");
    }
    if e.get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| n.contains('\r') || n.contains('\n'))
    {
        return Err("event.name must not contain CR or LF");
    }
    if e.get("id").is_some_and(|n| !n.is_string()) {
        return Err("event.id must be a string");
    }
    if e.get("id")
        .and_then(Value::as_str)
        .is_some_and(|i| i.contains('\r') || i.contains('\n') || i.contains('\0'))
    {
        return Err("event.id must not contain CR, LF or NUL");
    }
    if e.get("retry").is_some_and(|r| r.as_u64().is_none()) {
        return Err("event.retry must be a non-negative integer");
    }
    Ok(())
}

fn twin_close(o: &Map<String, Value>) -> Result<bool, &'static str> {
    match o.get("close") {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err("close must be a boolean"),
    }
}

fn twin_token(o: &Map<String, Value>) -> Result<(), &'static str> {
    match o.get("token") {
        Some(Value::String(t)) if !t.is_empty() => Ok(()),
        _ => Err("token is required and must be a string"),
    }
}

fn twin_send(o: &Map<String, Value>) -> Result<(), &'static str> {
    twin_token(o)?;
    twin_event(o)?;
    twin_close(o).map(drop)
}

fn twin_publish(o: &Map<String, Value>) -> Result<(), &'static str> {
    let target = match (o.get("channel"), o.get("channels")) {
        (Some(c), None) => is_name(c),
        (None, Some(list)) => names_ok(list) && !list.as_array().unwrap().is_empty(),
        _ => false,
    };
    if !target {
        return Err("exactly one of channel");
    }
    twin_event(o)?;
    let close = twin_close(o)?;
    if o.get("event").is_none() && !close {
        return Err("event or close: true is required");
    }
    Ok(())
}

fn twin_membership(o: &Map<String, Value>) -> Result<(), &'static str> {
    twin_token(o)?;
    if !o.get("channels").is_some_and(names_ok) {
        return Err("channels must be an array of channel names");
    }
    Ok(())
}

/// The parser's answer and the twin's agree: both accept, or both refuse with the same message
/// (the twin knows the start of the two long channel messages).
fn agree<T>(parsed: Result<T, &'static str>, twin: Result<(), &'static str>) -> Result<(), String> {
    match (parsed, twin) {
        (Ok(_), Ok(())) => Ok(()),
        (Err(got), Err(want)) if got.starts_with(want) => Ok(()),
        (got, want) => Err(format!(
            "parser: {:?}, twin: {want:?}",
            got.err().unwrap_or("accepted")
        )),
    }
}

proptest! {
    #[test]
    fn any_bytes_get_an_answer(body in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(object) = command::parse_object(&body) {
            let _ = command::send(&object);
            let _ = command::publish(&object);
            let _ = command::membership(&object);
        }
    }

    #[test]
    fn any_json_text_gets_an_answer(value in any_json()) {
        let body = serde_json::to_vec(&value).unwrap();
        match command::parse_object(&body) {
            Ok(object) => prop_assert!(value.is_object(), "{object:?}"),
            Err(message) => {
                prop_assert!(!value.is_object());
                prop_assert_eq!(message, command::NOT_AN_OBJECT);
            }
        }
    }

    #[test]
    fn the_parser_agrees_with_its_naive_twin(object in request_object()) {
        agree(command::send(&object), twin_send(&object)).map_err(TestCaseError::fail)?;
        agree(command::publish(&object), twin_publish(&object)).map_err(TestCaseError::fail)?;
        agree(command::membership(&object), twin_membership(&object))
            .map_err(TestCaseError::fail)?;
    }

    #[test]
    fn a_batch_item_is_judged_as_its_routes_body(
        object in request_object(),
        op in prop_oneof![
            Just(None),
            Just(Some(json!("send"))),
            Just(Some(json!("publish"))),
            Just(Some(json!("subscribe"))),
            Just(Some(json!("unsubscribe"))),
            Just(Some(json!("Send"))),
            Just(Some(json!("batch"))),
            any_json().prop_map(Some),
        ],
        not_an_object in any_json().prop_filter("not an object", |v| !v.is_object()),
    ) {
        let mut item = object.clone();
        if let Some(op) = &op {
            item.insert("op".to_owned(), op.clone());
        }
        let item = Value::Object(item);
        let twin = match op.as_ref().and_then(Value::as_str) {
            Some("send") => Some(twin_send(&object)),
            Some("publish") => Some(twin_publish(&object)),
            Some("subscribe" | "unsubscribe") => Some(twin_membership(&object)),
            _ => None,
        };
        match (command::batch_item(&item), twin) {
            (Ok((operation, body)), Some(twin)) => {
                let parsed = match operation {
                    command::Operation::Send => command::send(body).map(drop),
                    command::Operation::Publish => command::publish(body).map(drop),
                    command::Operation::Subscribe | command::Operation::Unsubscribe => {
                        command::membership(body).map(drop)
                    }
                };
                agree(parsed, twin).map_err(TestCaseError::fail)?;
            }
            (Err(message), None) => prop_assert!(message.starts_with("op must be one of")),
            (got, twin) => prop_assert!(false, "item {item}: {got:?} against twin {twin:?}"),
        }
        prop_assert_eq!(
            command::batch_item(&not_an_object).err(),
            Some(command::NOT_AN_OBJECT)
        );
    }

    /// What a valid send carries reaches the command unchanged.
    #[test]
    fn a_valid_send_keeps_its_fields(
        token in "[0-9a-f-]{1,36}",
        data in "[a-z\r\n é]{0,20}",
        name in proptest::option::of("[a-z. ]{0,10}"),
        id in proptest::option::of("[0-9a-z]{0,10}"),
        retry in proptest::option::of(any::<u64>()),
        close in any::<bool>(),
    ) {
        let mut event = json!({"data": data});
        if let Some(name) = &name { event["name"] = json!(name); }
        if let Some(id) = &id { event["id"] = json!(id); }
        if let Some(retry) = retry { event["retry"] = json!(retry); }
        let body = serde_json::to_vec(&json!({"token": token, "event": event, "close": close})).unwrap();
        let object = command::parse_object(&body).unwrap();
        let send = command::send(&object).unwrap();
        prop_assert_eq!(send.token, token.as_str());
        prop_assert_eq!(send.close, close);
        let parsed = send.event.unwrap();
        prop_assert_eq!(parsed.data, data.as_str());
        prop_assert_eq!(parsed.name, name.as_deref());
        prop_assert_eq!(parsed.id, id.as_deref());
        prop_assert_eq!(parsed.retry, retry);
    }
}
