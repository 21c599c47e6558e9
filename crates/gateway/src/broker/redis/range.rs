//! A page of a room's history for the server API
//! (`GET /api/rooms/{room}/history`): one script, `XRANGE ... COUNT limit`,
//! so that Redis never sends more than the page.

use redis::{Script, Value};
use std::sync::LazyLock;

use super::{keys, parse_log, unavailable, Inner, COMMAND_TIMEOUT};
use crate::broker::{BrokerError, HistoryPage};

/// Same reply shape as the resume script (epoch, latest, -1, then id/frame
/// pairs). A room without an epoch has no messages either: the reply is
/// empty, and the resume script then creates the epoch exactly as a join
/// would (one place decides how epochs are made).
const RANGE_LUA: &str = r"
local epoch = redis.call('GET', KEYS[2])
if not epoch then return {} end
local latest = tonumber(redis.call('GET', KEYS[1]) or '0')
local out = {epoch, latest, -1}
local entries = redis.call('XRANGE', KEYS[3], ARGV[1], '+', 'COUNT', ARGV[2])
for _, e in ipairs(entries) do
  out[#out + 1] = e[1]
  out[#out + 1] = e[2][2]
end
return out
";

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RANGE_LUA));

pub(super) async fn range(
    inner: &Inner,
    room: &str,
    since: u64,
    limit: usize,
) -> Result<HistoryPage, BrokerError> {
    let [seq, epoch, log] = keys(room);
    let mut conn = inner.conn()?;
    let mut call = SCRIPT.prepare_invoke();
    // The first stream id after `since`, computed here: Lua numbers are
    // doubles and cannot spell every u64.
    call.key(seq)
        .key(epoch)
        .key(log)
        .arg(format!("{}-0", since.saturating_add(1)))
        .arg(limit);
    let value: Value = tokio::time::timeout(COMMAND_TIMEOUT, call.invoke_async(&mut conn))
        .await
        .map_err(|_| unavailable("redis timed out"))?
        .map_err(unavailable)?;
    let log = match value {
        Value::Array(items) if items.is_empty() => inner.read_log(room, None).await?,
        value => {
            parse_log(value).ok_or_else(|| unavailable("unexpected reply from the range script"))?
        }
    };
    Ok(HistoryPage {
        epoch: log.epoch,
        latest: log.latest,
        frames: log
            .entries
            .into_iter()
            .filter(|(s, _)| *s <= log.latest)
            .take(limit)
            .map(|(_, f)| f)
            .collect(),
    })
}
