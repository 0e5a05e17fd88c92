//! History in Redis (PROTOCOL §11 in a cluster): every node's publishes take their position and
//! are kept in one Lua script, so a page resumes on any node, also after its own node died.
//!
//! Owns the two scripts and the keys they touch, all under the deployment's prefix: `history-clock`
//! (a hash: `epoch`, the deployment's position counter `seq`, and the last publish time `ms`, which
//! never goes back), `history:<name>` (a channel's kept frames, newest first, at most
//! `HISTORY_SIZE`) and `history-floor:<name>` (the newest seq that the size bound dropped). Both
//! channel keys expire `HISTORY_TTL_SECONDS` after the channel's last publish, so Redis forgets a
//! quiet channel by itself. Positions use Redis's clock (`TIME`) for publish and resume alike, so
//! the nodes' clocks never meet. It does not decide gaps: [`read`] returns the same
//! [`Kept`] snapshot as the single node's store, and [`crate::history::resolve`] decides.
//!
//! Why one script per publish: the position, the append to every listed channel and the PUBLISH
//! to every node happen in one step of Redis, so publish order and position order are the same on
//! every node's connection, and a resume reading the history sees an event either in the history
//! or, later, live — never neither.

use std::sync::LazyLock;

use bytes::Bytes;
use redis::{Script, Value};

use crate::history::{Kept, Now, Position};

/// KEYS: clock, then each channel's list, then each channel's floor. ARGV: epoch to use if the
/// deployment has none yet, HISTORY_SIZE, TTL in ms, the cluster message before its frame, the
/// event's frame without id, then the Redis channel of each listed channel. Returns each
/// PUBLISH's receiver count.
pub(super) static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(redis.call('HGET', KEYS[1], 'ms') or '0')
if ms < last then ms = last end
redis.call('HSET', KEYS[1], 'ms', string.format('%d', ms))
local frame = 'id: ' .. epoch .. '-' .. string.format('%d', seq) .. '-' .. string.format('%d', ms) .. '\n' .. ARGV[5]
local n = (#KEYS - 1) / 2
local size = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
for i = 1, n do
  local list = KEYS[1 + i]
  local floor = KEYS[1 + n + i]
  if redis.call('LPUSH', list, frame) > size then
    local dropped = redis.call('LINDEX', list, size)
    redis.call('SET', floor, string.match(dropped, '^id: [^-]+%-(%d+)'))
    redis.call('LTRIM', list, 0, size - 1)
  end
  redis.call('PEXPIRE', list, ttl)
  redis.call('PEXPIRE', floor, ttl)
end
local message = ARGV[4] .. frame
local receivers = {}
for i = 6, #ARGV do
  receivers[#receivers + 1] = redis.call('PUBLISH', ARGV[i], message)
end
return receivers
"#,
    )
});

/// KEYS as [`PUBLISH`]'s. ARGV: the seq to read after, and the epoch to use if the deployment has
/// none yet (so that a position handed out before the first publish stays valid). Returns epoch,
/// seq, Redis's time in ms, then for each channel: 1 if its history exists, its floor, and its
/// frames after the seq, newest first.
pub(super) static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[2]) == 1 then
  redis.call('HSET', KEYS[1], 'seq', 0)
end
local clock = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'ms')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(clock[3] or '0')
if now < last then now = last end
local after = tonumber(ARGV[1])
local out = {clock[1] or '', clock[2] or '0', string.format('%d', now)}
local n = (#KEYS - 1) / 2
for i = 1, n do
  local entries = redis.call('LRANGE', KEYS[1 + i], 0, -1)
  local kept = {}
  for _, entry in ipairs(entries) do
    if tonumber(string.match(entry, '^id: [^-]+%-(%d+)')) <= after then break end
    kept[#kept + 1] = entry
  end
  out[#out + 1] = #entries > 0 and 1 or 0
  out[#out + 1] = redis.call('GET', KEYS[1 + n + i]) or '0'
  out[#out + 1] = kept
end
return out
"#,
    )
});

/// [`READ`]'s answer as the history's snapshot; `None` if it is not in that shape.
pub(super) fn snapshot(answer: Vec<Value>) -> Option<(Now, Vec<Kept>)> {
    let mut values = answer.into_iter();
    let epoch = text(values.next()?)?;
    let seq = text(values.next()?)?.parse().ok()?;
    let ms = text(values.next()?)?.parse().ok()?;
    let now = Now {
        position: Position {
            // No epoch yet (nothing published since Redis started empty): no position matches.
            epoch: u32::from_str_radix(&epoch, 16).unwrap_or(0),
            seq,
            ms,
        },
        // Redis forgets whole channels only by their TTL, which the position's age covers.
        forgotten_through: 0,
    };
    let mut kept = Vec::new();
    while let Some(known) = values.next() {
        let known = matches!(known, Value::Int(1));
        let floor = text(values.next()?)?.parse().ok()?;
        let Value::Array(frames) = values.next()? else {
            return None;
        };
        let frames = frames
            .into_iter()
            .map(|frame| match frame {
                Value::BulkString(bytes) => Some(Bytes::from(bytes)),
                _ => None,
            })
            .collect::<Option<_>>()?;
        kept.push(Kept {
            known,
            floor,
            frames,
        });
    }
    Some((now, kept))
}

fn text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}
