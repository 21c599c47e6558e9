// wsgate.js: dependency-free client for the wsgate protocol, version 1.
//
// Runs in browsers and in Node 22+ (global WebSocket). On Node 20 pass one
// in, e.g. `new WsgateClient({ WebSocket: (await import('ws')).WebSocket, ... })`,
// or run with `node --experimental-websocket` (without either it uses SSE).
//
// What it does for the application:
// - connects to one of several `ws(s)://host/ws` URLs with `?token=` (browsers
//   cannot set headers on a WebSocket), the token given as a string or fetched
//   by an async `getToken()` (called again after close 4001, when the token is
//   expired, and before `exp` to send a `refresh` frame);
// - on any drop (close 1001/1006/1008/1011/1013..., a network error, or no
//   frame within `heartbeat_ms` + `heartbeatTimeoutMs`, probed with an
//   application-level `ping` since browsers cannot see WebSocket Pongs) it
//   reconnects with capped exponential backoff and full jitter, trying the next
//   URL, and re-joins every room with `since` + `epoch`;
// - never delivers a seq twice to the application, and reports every gap
//   (`recovered: false`, a seq jump, an epoch change) as a `gap` event;
// - in browsers, reconnects at once when the page comes back online or visible;
// - when the WebSocket cannot open (a proxy that blocks the upgrade), falls
//   back to Server-Sent Events + POST (`GET /sse`, `POST /sse/{conn}`, v1.1)
//   with the same guarantees; `transport: 'ws' | 'sse'` forces one.
//
// The pure parts (`backoffDelay`, `Backoff`, `RoomTracker`) are exported for
// tests and for applications that want the same logic elsewhere.

/** Protocol version this client speaks. */
export const PROTOCOL_VERSION = 1;

const WS_CONNECTING = 0;
const WS_OPEN = 1;

/** Default options; every timing is in milliseconds. */
export const DEFAULTS = Object.freeze({
  backoffBaseMs: 500,
  backoffCapMs: 30000,
  stableMs: 10000,
  connectTimeoutMs: 10000,
  heartbeatMs: 30000,
  heartbeatTimeoutMs: 10000,
  requestTimeoutMs: 10000,
  refreshMarginMs: 60000,
});

// Idempotent publish (protocol v1.1): the gateway remembers a key for 5
// minutes; an unacknowledged publish is sent again only while younger than
// this (30 s margin), at most this many wait for a reconnect, and a `timeout`
// answer is sent again this many times.
export const PUBLISH_RETRY = Object.freeze({ windowMs: 270000, maxQueued: 1000, timeoutRetries: 3 });

const KEY_CHARS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';

/** 16 random characters of the key alphabet (crypto.getRandomValues where there is one). */
function keyPrefix() {
  const bytes = new Uint8Array(16);
  if (globalThis.crypto?.getRandomValues) globalThis.crypto.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  // 248 = 4 * 62: no modulo bias for the bytes kept; the rare others fall back.
  return Array.from(bytes, (b) => KEY_CHARS[b < 248 ? b % 62 : Math.floor(Math.random() * 62)]).join('');
}

/**
 * An error from the gateway (an `error` frame) or from the client itself.
 * `code` is one of the protocol's error codes (`bad_request`, `forbidden`,
 * `rate_limited`, `too_many_rooms`, `unavailable`, `invalid_token`, `timeout`)
 * or a client-side code (`not_connected`, `disconnected`, `timeout`, `closed`,
 * `publish_expired`, `token_unavailable`, `token_expired`).
 */
export class WsgateError extends Error {
  constructor(code, message, details = {}) {
    super(message || code);
    this.name = 'WsgateError';
    this.code = code;
    for (const [k, v] of Object.entries(details)) {
      if (v !== undefined && k !== 'message' && k !== 'code') this[k] = v;
    }
  }
}

/**
 * Full-jitter backoff: a uniformly random delay in [0, min(cap, base * 2^attempt)).
 * `attempt` counts from 0 (the first retry).
 */
export function backoffDelay(attempt, { baseMs = DEFAULTS.backoffBaseMs, capMs = DEFAULTS.backoffCapMs } = {}, random = Math.random) {
  const a = Math.max(0, Math.min(Math.floor(attempt), 52));
  const ceiling = Math.min(capMs, baseMs * 2 ** a);
  const r = Math.min(Math.max(random(), 0), 1);
  return Math.floor(r * ceiling);
}

/**
 * Reconnect schedule: `next()` gives the delay before the next attempt and
 * counts it; `connected(now)` / `disconnected(now)` reset the count when the
 * connection stayed up for at least `stableMs` (so a flapping link keeps
 * backing off, a stable one starts again from `baseMs`).
 */
export class Backoff {
  constructor({ baseMs = DEFAULTS.backoffBaseMs, capMs = DEFAULTS.backoffCapMs, stableMs = DEFAULTS.stableMs, random = Math.random } = {}) {
    if (!(baseMs > 0) || !(capMs >= baseMs)) throw new RangeError('backoff needs 0 < baseMs <= capMs');
    this.baseMs = baseMs;
    this.capMs = capMs;
    this.stableMs = stableMs;
    this.random = random;
    this.attempt = 0;
    this._upSince = null;
  }

  /** The delay before the next attempt; increments the attempt count. */
  next() {
    const d = backoffDelay(this.attempt, this, this.random);
    this.attempt += 1;
    return d;
  }

  /** The highest delay the next call to `next()` can return. */
  ceiling() {
    return Math.min(this.capMs, this.baseMs * 2 ** Math.min(this.attempt, 52));
  }

  /** A connection was established (welcome received) at `now`. */
  connected(now) {
    this._upSince = now;
  }

  /** The connection ended at `now`; resets the schedule if it had been stable. */
  disconnected(now) {
    if (this._upSince !== null && now - this._upSince >= this.stableMs) this.attempt = 0;
    this._upSince = null;
  }

  reset() {
    this.attempt = 0;
  }
}

/**
 * Per-room seq/epoch bookkeeping, free of I/O. The client feeds it the frames
 * it receives; it answers whether to deliver a message and which gaps to report.
 *
 * Room state: `{ room, epoch, lastSeq, joined }`. `lastSeq` is the last seq
 * delivered to the application (or the room's seq when it was joined).
 */
export class RoomTracker {
  constructor() {
    this.rooms = new Map();
  }

  /** Start tracking `room` (idempotent). `since`/`epoch` seed a resume point, e.g. from storage. */
  want(room, { since, epoch, presence } = {}) {
    let st = this.rooms.get(room);
    if (!st) {
      st = { room, epoch: null, lastSeq: null, joined: false, replayUntil: null, askedSince: null, presence: false };
      this.rooms.set(room, st);
    }
    if (presence !== undefined) st.presence = Boolean(presence);
    if (since !== undefined && since !== null) {
      st.lastSeq = since;
      st.epoch = epoch ?? null;
    }
    return st;
  }

  /** Stop tracking `room`. */
  unwant(room) {
    this.rooms.delete(room);
  }

  has(room) {
    return this.rooms.has(room);
  }

  get(room) {
    const st = this.rooms.get(room);
    return st ? { room, epoch: st.epoch, lastSeq: st.lastSeq, joined: st.joined } : undefined;
  }

  list() {
    return [...this.rooms.keys()];
  }

  /** The `join` frame for `room`: with `since` (+ `epoch`) once a seq is known. */
  joinFrame(room, id) {
    const st = this.want(room);
    const f = { type: 'join', room };
    if (st.presence) f.presence = true;
    if (st.lastSeq !== null) {
      f.since = st.lastSeq;
      if (st.epoch) f.epoch = st.epoch;
      st.askedSince = st.lastSeq;
    } else {
      st.askedSince = null;
    }
    if (id !== undefined) f.id = id;
    return f;
  }

  /** The connection dropped: every room must be joined again. */
  disconnected() {
    for (const st of this.rooms.values()) {
      st.joined = false;
      st.replayUntil = null;
    }
  }

  /**
   * A `joined` frame (an answer, or unsolicited after an epoch change).
   * Returns `{ tracked, resumed, gap }` where `gap` is `null` or
   * `{ room, reason, lastSeq, seq, epoch, previousEpoch }` with reason
   * `epoch_change` or `not_recovered`.
   */
  onJoined(f) {
    const st = this.rooms.get(f.room);
    if (!st) return { tracked: false, resumed: false, gap: null };
    const prevEpoch = st.epoch;
    const prevSeq = st.lastSeq;
    const asked = st.askedSince !== null;
    st.askedSince = null;
    let gap = null;
    let resumed = false;
    const mkGap = (reason) => ({
      room: f.room, reason, recovered: false, lastSeq: prevSeq, seq: f.seq, epoch: f.epoch, previousEpoch: prevEpoch,
    });
    if (prevEpoch !== null && f.epoch !== prevEpoch) {
      gap = mkGap('epoch_change');
      st.lastSeq = f.seq;
    } else if (f.recovered === false) {
      if (asked || prevSeq !== null) gap = mkGap('not_recovered');
      st.lastSeq = f.seq;
    } else if (f.recovered === true && prevSeq !== null) {
      resumed = true;
      // The replay of (lastSeq, f.seq] follows; live messages after it.
      st.replayUntil = f.seq;
    } else if (prevSeq === null) {
      st.lastSeq = f.seq;
    } else if (f.seq > prevSeq) {
      // Answer without `recovered` although we had a seq: messages in between are not coming.
      gap = mkGap('not_recovered');
      st.lastSeq = f.seq;
    }
    st.epoch = f.epoch;
    st.joined = true;
    return { tracked: true, resumed, gap };
  }

  /**
   * A `message` frame. Returns `{ deliver, duplicate, replayed, gap }`;
   * `gap` is `null` or `{ room, reason: 'seq_jump', from, to, epoch }`
   * (the missing seqs, inclusive).
   */
  onMessage(f) {
    const st = this.rooms.get(f.room);
    if (!st) return { deliver: false, duplicate: false, replayed: false, gap: null };
    if (typeof f.seq !== 'number') return { deliver: true, duplicate: false, replayed: false, gap: null };
    if (st.lastSeq === null) {
      st.lastSeq = f.seq;
      return { deliver: true, duplicate: false, replayed: false, gap: null };
    }
    if (f.seq <= st.lastSeq) return { deliver: false, duplicate: true, replayed: false, gap: null };
    let gap = null;
    if (f.seq > st.lastSeq + 1) {
      gap = { room: f.room, reason: 'seq_jump', recovered: false, from: st.lastSeq + 1, to: f.seq - 1, lastSeq: st.lastSeq, seq: f.seq, epoch: st.epoch };
    }
    st.lastSeq = f.seq;
    const replayed = st.replayUntil !== null && f.seq <= st.replayUntil;
    if (st.replayUntil !== null && f.seq >= st.replayUntil) st.replayUntil = null;
    return { deliver: true, duplicate: false, replayed, gap };
  }
}

/** The `exp` claim (seconds) of a JWT, or `null` when it cannot be read. */
export function jwtExp(token) {
  try {
    const part = String(token).split('.')[1];
    if (!part) return null;
    let b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    while (b64.length % 4) b64 += '=';
    const bin = atob(b64);
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return typeof claims.exp === 'number' ? claims.exp : null;
  } catch {
    return null;
  }
}

/** Normalize a gateway URL: `ws(s)://host/ws`, `http(s)://...`, `host:port`, or `/ws` (relative to the page). */
export function normalizeUrl(u, base = globalThis.location?.href) {
  let s = String(u).trim();
  if (!/^[a-z][a-z0-9+.-]*:\/\//i.test(s) && !s.startsWith('/')) s = `ws://${s}`;
  const url = base ? new URL(s, base) : new URL(s);
  if (url.protocol === 'http:') url.protocol = 'ws:';
  else if (url.protocol === 'https:') url.protocol = 'wss:';
  if (url.protocol !== 'ws:' && url.protocol !== 'wss:') throw new TypeError(`not a WebSocket URL: ${u}`);
  if (url.pathname === '' || url.pathname === '/') url.pathname = '/ws';
  return url.toString();
}

/** Appends (or replaces) the `token` query parameter. */
export function withToken(url, token) {
  const u = new URL(url);
  u.searchParams.set('token', token);
  return u.toString();
}

function dataToText(d) {
  if (typeof d === 'string') return d;
  if (d instanceof ArrayBuffer || ArrayBuffer.isView(d)) return new TextDecoder().decode(d);
  return String(d);
}

// ---------------------------------------------------------------- SSE fallback (protocol v1.1, section 7)

/**
 * Incremental `text/event-stream` parser (the WHATWG "server-sent events"
 * rules for the fields wsgate uses): feed it decoded text in chunks of any
 * size; it calls `onEvent(data)` for every event that has a `data` field
 * (several `data:` lines joined with `\n`) and `onComment(text)` for comment
 * lines (`:` ...). Lines end with `\n`, `\r\n` or `\r`, also across chunks.
 * A line or event longer than `maxBytes` characters throws a RangeError, so a
 * broken stream cannot grow the buffer without bound.
 */
export class SseParser {
  constructor({ onEvent, onComment = () => {}, maxBytes = 16 * 1024 * 1024 } = {}) {
    this.onEvent = onEvent;
    this.onComment = onComment;
    this.maxBytes = maxBytes;
    this._buf = '';
    this._data = null; // lines of the event being read, or null
    this._dataLen = 0;
    this._skipLf = false; // the last chunk ended with `\r`: a leading `\n` belongs to it
  }

  push(text) {
    let s = text;
    if (this._skipLf && s.startsWith('\n')) s = s.slice(1);
    this._skipLf = false;
    let start = 0;
    for (let i = 0; i < s.length; i++) {
      const c = s.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      this._line(this._buf + s.slice(start, i));
      this._buf = '';
      if (c === 13) {
        if (i + 1 === s.length) this._skipLf = true;
        else if (s.charCodeAt(i + 1) === 10) i += 1;
      }
      start = i + 1;
    }
    this._buf += s.slice(start);
    if (this._buf.length + this._dataLen > this.maxBytes) throw new RangeError(`event-stream event longer than ${this.maxBytes} characters`);
  }

  _line(line) {
    if (line === '') {
      const data = this._data;
      this._data = null;
      this._dataLen = 0;
      if (data !== null) this.onEvent(data.join('\n'));
      return;
    }
    if (line.startsWith(':')) {
      this.onComment(line.slice(1));
      return;
    }
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field !== 'data') return; // `event`, `id`, `retry`: not used by wsgate
    if (this._data === null) this._data = [];
    this._data.push(value);
    this._dataLen += value.length + 1;
    if (this._dataLen > this.maxBytes) throw new RangeError(`event-stream event longer than ${this.maxBytes} characters`);
  }
}

/** The `/sse` URL (`http(s)://`) that goes with a `ws(s)://.../ws` URL. */
export function sseUrl(wsUrl) {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
  if (u.pathname.endsWith('/ws')) u.pathname = `${u.pathname.slice(0, -3)}/sse`;
  else if (!u.pathname.endsWith('/sse')) u.pathname = `${u.pathname.replace(/\/$/, '')}/sse`;
  return u.toString();
}

// Close codes for a POST /sse/{conn} that was not accepted (a WebSocket
// would have been closed with these); anything else is 1011.
const POST_FAILURE_CODE = { 401: 4001, 403: 1008, 404: 1006, 413: 1009 };
// One POST carries at most this much (several frames as a JSON array).
const POST_BATCH_CHARS = 64 * 1024;
// A POST answered 503 (the stream's inbox is full) is sent again this many
// times, after its Retry-After (1 to 5 s).
const POST_BUSY_RETRIES = 3;

/**
 * The Server-Sent Events + POST transport behind the subset of the WebSocket
 * API the client uses (`readyState`, `send`, `close`, `onopen`, `onmessage`,
 * `onclose`, `onerror`), so the client logic is the same over both.
 *
 * `GET url` (`http(s)://host/sse?token=...`) is read with `fetch` (browsers
 * and Node alike: Node has no EventSource); every `data:` event is passed on
 * as a message, comment lines (the heartbeat) call `onheartbeat`, and the
 * last event `{"type":"close","code":N,"reason":...}` becomes a close with
 * that code. `send` POSTs to `/sse/{conn}` (`conn` from `welcome`), one
 * request at a time so frames arrive in order; frames sent meanwhile go
 * together in the next one, as a JSON array. `getToken()` gives the token for
 * each POST (the client's current one, after a `refresh` the new one).
 */
export class SseSocket {
  constructor(url, { fetch: fetchFn = globalThis.fetch, getToken } = {}) {
    if (typeof fetchFn !== 'function') throw new TypeError('no fetch available for the SSE transport');
    this.url = url;
    this.readyState = WS_CONNECTING;
    this.conn = null;
    this._fetch = fetchFn;
    this._getToken = getToken ?? (() => new URL(url).searchParams.get('token'));
    this._abort = new AbortController();
    this._queue = [];
    this._posting = false;
    this._ended = false;
    this._read();
  }

  send(text) {
    if (this.readyState !== WS_OPEN || this.conn === null) throw new Error('SSE stream not open');
    this._queue.push(text);
    this._post();
  }

  close() {
    this._ended = true;
    this.readyState = 3;
    this._abort.abort();
  }

  // The stream ended or failed: a close event (once), as a WebSocket would
  // give; before it opened an error event, with the HTTP `status` if any.
  _closed(code, reason, wasClean = false, status = undefined) {
    if (this._ended) return;
    this._ended = true;
    const opened = this.readyState === WS_OPEN;
    this.readyState = 3;
    this._abort.abort();
    // Before the stream opened, like a refused WebSocket handshake: an error only.
    if (!opened) this.onerror?.({ message: reason, status });
    else this.onclose?.({ code, reason, wasClean });
  }

  async _read() {
    let res;
    try {
      res = await this._fetch(this.url, { headers: { Accept: 'text/event-stream' }, cache: 'no-store', signal: this._abort.signal });
    } catch (err) {
      this._closed(1006, `GET /sse failed: ${err?.message ?? err}`);
      return;
    }
    if (this._ended) return;
    const type = res.headers?.get?.('content-type') ?? '';
    if (res.status !== 200 || !type.startsWith('text/event-stream') || !res.body) {
      this._closed(1006, `GET /sse answered HTTP ${res.status}`, false, res.status);
      res.body?.cancel?.().catch(() => {});
      return;
    }
    this.readyState = WS_OPEN;
    this.onopen?.({});
    const decoder = new TextDecoder();
    const parser = new SseParser({
      onEvent: (data) => this._event(data),
      onComment: () => this.onheartbeat?.(),
    });
    const reader = res.body.getReader();
    try {
      while (!this._ended) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.push(decoder.decode(value, { stream: true }));
      }
      this._closed(1006, 'event stream ended without a close event');
    } catch (err) {
      this._closed(err instanceof RangeError ? 1009 : 1006, String(err?.message ?? err));
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  _event(data) {
    if (this._ended) return;
    let f = null;
    try {
      f = JSON.parse(data);
    } catch {
      /* not JSON: the client reports it */
    }
    if (f?.type === 'close') {
      this._closed(typeof f.code === 'number' ? f.code : 1006, typeof f.reason === 'string' ? f.reason : '', true);
      return;
    }
    if (f?.type === 'welcome' && this.conn === null && typeof f.conn === 'string') this.conn = f.conn;
    this.onmessage?.({ data });
  }

  async _post() {
    if (this._posting || this._ended || this._queue.length === 0) return;
    this._posting = true;
    let size = 0;
    let n = 0;
    while (n < this._queue.length && (n === 0 || size + this._queue[n].length < POST_BATCH_CHARS)) size += this._queue[n++].length + 1;
    const batch = this._queue.splice(0, n);
    const body = batch.length === 1 ? batch[0] : `[${batch.join(',')}]`;
    const u = new URL(this.url);
    u.pathname = `${u.pathname.replace(/\/$/, '')}/${encodeURIComponent(this.conn)}`;
    u.searchParams.set('token', this._getToken());
    let status;
    try {
      // 503: the stream's inbox is full; sent again after Retry-After, a few times.
      for (let busy = 0; ; busy++) {
        // text/plain keeps the POST a CORS "simple request" (no preflight);
        // the gateway reads the body as JSON whatever its type.
        const res = await this._fetch(u.toString(), { method: 'POST', headers: { 'Content-Type': 'text/plain;charset=UTF-8' }, body, signal: this._abort.signal });
        status = res.status;
        res.body?.cancel?.().catch(() => {});
        if (status !== 503 || busy === POST_BUSY_RETRIES || this._ended) break;
        const wait = Math.min(Math.max(Number(res.headers?.get?.('retry-after')) || 1, 1), 5);
        await new Promise((r) => setTimeout(r, wait * 1000));
      }
    } catch (err) {
      this._closed(1006, `POST /sse failed: ${err?.message ?? err}`);
      return;
    }
    this._posting = false;
    if (status !== 202 && status !== 200) {
      this._closed(POST_FAILURE_CODE[status] ?? 1011, `POST /sse answered HTTP ${status}`);
      return;
    }
    this._post();
  }
}

// setTimeout cannot wait longer than 2^31-1 ms.
const MAX_TIMER_MS = 2147483647;

/**
 * The client. See README.md for the full API; in short:
 *
 * ```js
 * const c = new WsgateClient({ urls: ['wss://a.example/ws', 'wss://b.example/ws'], getToken });
 * c.on('message', (m) => console.log(m.room, m.seq, m.from, m.data));
 * c.on('gap', (g) => reloadFromServer(g.room));
 * c.connect();
 * await c.join('lobby');
 * const seq = await c.publish('lobby', { text: 'hi' });
 * ```
 */
export class WsgateClient {
  constructor(options = {}) {
    const o = { ...DEFAULTS, ...options };
    const urls = o.urls ?? o.url;
    const list = (Array.isArray(urls) ? urls : [urls]).filter((u) => u !== undefined && u !== null && u !== '');
    if (list.length === 0) throw new TypeError('WsgateClient needs `url` or `urls`');
    this._urls = list.map((u) => normalizeUrl(u));
    if (typeof o.token !== 'string' && typeof o.getToken !== 'function') {
      throw new TypeError('WsgateClient needs `token` (string) or `getToken` (function)');
    }
    this._WebSocket = o.WebSocket ?? globalThis.WebSocket;
    this._fetch = o.fetch ?? globalThis.fetch?.bind(globalThis);
    const mode = o.transport ?? 'auto';
    if (!['auto', 'ws', 'sse'].includes(mode)) throw new TypeError(`transport must be 'auto', 'ws' or 'sse', not ${mode}`);
    const hasWs = typeof this._WebSocket === 'function';
    const hasFetch = typeof this._fetch === 'function';
    if (mode === 'sse' && !hasFetch) throw new TypeError('transport `sse` needs fetch: pass `fetch` in the options');
    if (mode !== 'sse' && !hasWs && !(mode === 'auto' && hasFetch)) {
      throw new TypeError('no WebSocket available: pass `WebSocket` in the options (Node 20: the `ws` package)');
    }
    // `auto` without a WebSocket (Node 20 without the flag) goes straight to SSE.
    this._mode = mode === 'auto' && !hasWs ? 'sse' : mode;
    this._transport = null; // 'ws' or 'sse' of the current attempt / connection
    this._opts = o;
    this._now = o.now ?? (() => Date.now());
    this._setTimeout = o.setTimeout ?? ((fn, ms) => setTimeout(fn, ms));
    this._clearTimeout = o.clearTimeout ?? ((t) => clearTimeout(t));
    this._getToken = typeof o.getToken === 'function' ? o.getToken : null;
    this._token = typeof o.token === 'string' ? o.token : null;
    this._tokenExp = this._token ? jwtExp(this._token) : null;
    this._forceToken = false;

    this.backoff = new Backoff({ baseMs: o.backoffBaseMs, capMs: o.backoffCapMs, stableMs: o.stableMs, random: o.random ?? Math.random });
    this.tracker = new RoomTracker();
    this.stats = { connects: 0, reconnects: 0, duplicatesDropped: 0, gaps: 0, messages: 0 };

    this._listeners = new Map();
    this._state = 'idle';
    this._urlIndex = Math.min(Math.max(o.startIndex ?? 0, 0), this._urls.length - 1);
    this._ws = null;
    this._gen = 0;
    this._welcome = null;
    this._heartbeatMs = o.heartbeatMs;
    this._lastFrameAt = 0;
    this._frames = 0;
    this._pingSentAt = null;
    this._probeAt = null;
    this._everConnected = false;
    this._closedByApp = false;
    this._idSeq = 0;
    this._pending = new Map(); // id -> { kind, room, resolve, reject, timer, publish? }
    this._keyPrefix = keyPrefix();
    this._keySeq = 0;
    this._unacked = []; // publishes a drop left without an ack, sent again after the next welcome
    this._publishRetries = new Set(); // publishes waiting on this connection to be sent again
    this._roomWaiters = new Map(); // room -> [{ resolve, reject }]
    this._joinRetry = new Map(); // room -> { timer, attempt }
    this._connectWaiters = [];
    this._timers = { reconnect: null, connect: null, watchdog: null, refresh: null, probe: null, unacked: null };
    this._retryAt = null;

    this._win = o.window ?? (typeof window !== 'undefined' ? window : null);
    this._doc = o.document ?? (typeof document !== 'undefined' ? document : null);
    this._hooks = [];
  }

  // ---------------------------------------------------------------- events

  /** Subscribe to an event; returns a function that unsubscribes. */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    this._listeners.get(type)?.delete(fn);
  }

  once(type, fn) {
    const off = this.on(type, (ev) => {
      off();
      fn(ev);
    });
    return off;
  }

  _emit(type, ev) {
    const set = this._listeners.get(type);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(ev);
      } catch (e) {
        // A listener's bug must not break the connection logic; surface it anyway.
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }

  // ---------------------------------------------------------------- accessors

  /** `idle`, `connecting`, `connected`, `reconnecting` or `closed`. */
  get state() {
    return this._state;
  }

  /** The `welcome` frame of the current connection (or `null`). */
  get welcome() {
    return this._state === 'connected' ? this._welcome : null;
  }

  /** The node id of the current connection (or `null`). */
  get node() {
    return this.welcome?.node ?? null;
  }

  /**
   * The transport of the current connection: `'ws'` (WebSocket) or `'sse'`
   * (Server-Sent Events + POST, the fallback), `null` while not connected.
   */
  get transport() {
    return this._state === 'connected' ? this._transport : null;
  }

  /** The URL in use (without the token). */
  get url() {
    return this._urls[this._urlIndex];
  }

  get urls() {
    return [...this._urls];
  }

  /** Rooms the client is (or will be, once connected) in. */
  get rooms() {
    return this.tracker.list();
  }

  /** `{ room, epoch, lastSeq, joined }` for a room, or `undefined`. */
  roomState(room) {
    return this.tracker.get(room);
  }

  // ---------------------------------------------------------------- public API

  /** Start connecting; resolves with the `welcome` frame (or `null` if closed first). */
  connect() {
    const p = new Promise((resolve) => {
      if (this._state === 'connected') resolve(this._welcome);
      else this._connectWaiters.push(resolve);
    });
    if (this._state === 'idle' || this._state === 'closed') {
      this._closedByApp = false;
      if (!this._hooks || this._hooks.length === 0) this._installBrowserHooks(this._win, this._doc);
      this._open();
    }
    return p;
  }

  /** Drop the current connection (if any) and connect again at once, e.g. for a "reconnect now" button. */
  reconnect() {
    if (this._closedByApp) return this.connect();
    if (this._state === 'reconnecting') {
      this._clearTimer('reconnect');
      this._open();
    } else if (this._ws) {
      this._drop({ code: 4000, reason: 'reconnect requested', local: true }, { immediate: true });
    }
    return this.connect();
  }

  /** Replace the token used for the next connection (and for `refresh`, see `refreshToken`). */
  setToken(token) {
    this._token = token;
    this._tokenExp = jwtExp(token);
  }

  /**
   * Join `room` (kept across reconnects). Resolves with
   * `{ room, seq, epoch, recovered, resumed }` once joined; rejects with a
   * WsgateError (`forbidden`, `too_many_rooms`, `bad_request`, `closed`).
   * `since`/`epoch` ask for the messages after `since` (e.g. a seq stored by the app).
   * `presence: true` (v1.1) asks for `presence_join` / `presence_leave` events of the
   * room, and after every join (re-joins after a reconnect too: events are not
   * replayed) the client asks for the room's presence and emits it as `presence`.
   */
  join(room, { since, epoch, presence } = {}) {
    if (this._closedByApp && this._state === 'closed') return Promise.reject(new WsgateError('closed', 'client is closed', { room }));
    const p = new Promise((resolve, reject) => {
      if (!this._roomWaiters.has(room)) this._roomWaiters.set(room, []);
      this._roomWaiters.get(room).push({ resolve, reject });
    });
    this.tracker.want(room, { since, epoch, presence });
    if (this._state === 'connected') this._sendJoin(room);
    return p;
  }

  /**
   * Who is in `room` (v1.1; needs the `rooms` grant, not membership). Resolves
   * with `{ room, count, users, truncated }` (`users` sorted, at most 1,000);
   * rejects with a WsgateError (`forbidden`, `bad_request`, `unavailable`,
   * `not_connected`, `timeout`).
   */
  presence(room, { timeoutMs } = {}) {
    if (this._state !== 'connected') {
      return Promise.reject(new WsgateError('not_connected', `not connected (state ${this._state})`, { room }));
    }
    return this._request({ type: 'presence', room }, 'presence', room, timeoutMs).then((f) => ({
      room: f.room,
      count: f.count,
      users: f.users,
      truncated: f.truncated === true,
    }));
  }

  /** Leave `room`; resolves once the server confirms (at once when not connected). */
  leave(room) {
    this.tracker.unwant(room);
    this._cancelJoinRetry(room);
    this._rejectRoomWaiters(room, new WsgateError('left', `left room '${room}'`, { room }));
    if (this._state !== 'connected') return Promise.resolve();
    // Sent even while our join is unanswered: the server handles frames in order.
    return this._request({ type: 'leave', room }, 'leave', room).then(
      () => undefined,
      (err) => {
        // Gone with the connection is as good as left: rooms are only re-joined if wanted.
        if (err.code === 'not_connected' || err.code === 'disconnected') return undefined;
        throw err;
      },
    );
  }

  /**
   * Publish `data` (any JSON value) to `room`. Resolves with the message's seq
   * (from the `ack`); rejects with a WsgateError carrying `code`
   * (`forbidden`, `rate_limited`, `unavailable`, `bad_request`,
   * `not_connected`, `timeout`, `publish_expired` / `disconnected` / `closed`
   * — delivery unknown —).
   *
   * Every publish carries an idempotency `key`. When the connection drops
   * before the `ack`, the publish is sent again with the same key after the
   * next `welcome` (behind the re-joins) and the promise resolves with that
   * `ack` (the first seq if the first send was taken); a `timeout` answer is
   * sent again the same way up to 3 times. See README "Publishing".
   */
  publish(room, data, { timeoutMs } = {}) {
    if (this._state !== 'connected') {
      return Promise.reject(new WsgateError('not_connected', `not connected (state ${this._state})`, { room }));
    }
    return new Promise((resolve, reject) => {
      this._keySeq += 1;
      const p = { room, data, key: `${this._keyPrefix}.${this._keySeq}`, since: this._now(), timeouts: 0, sends: 0, timeoutMs, resolve, reject };
      if (!this._sendPublish(p)) reject(new WsgateError('not_connected', 'not connected', { room, request: 'publish' }));
    });
  }

  /** Application-level ping; resolves with the round-trip time in ms. */
  ping({ timeoutMs } = {}) {
    if (this._state !== 'connected') return Promise.reject(new WsgateError('not_connected', 'not connected'));
    const t0 = this._now();
    return this._request({ type: 'ping' }, 'ping', undefined, timeoutMs).then(() => this._now() - t0);
  }

  /** Fetch a new token with `getToken()` and send it as a `refresh` frame; resolves with the new `exp`. */
  async refreshToken() {
    if (!this._getToken) throw new WsgateError('token_unavailable', 'no getToken callback');
    const gen = this._gen;
    const token = await this._getToken();
    if (gen !== this._gen || this._state !== 'connected') throw new WsgateError('disconnected', 'connection changed during refresh');
    const f = await this._request({ type: 'refresh', token }, 'refresh');
    this._token = token;
    this._tokenExp = typeof f.exp === 'number' ? f.exp : jwtExp(token);
    this._emit('refreshed', { exp: this._tokenExp });
    this._scheduleRefresh();
    return this._tokenExp;
  }

  /** Close for good (code 1000 by default); no reconnect follows. */
  close(code = 1000, reason = '') {
    this._closedByApp = true;
    this._clearTimer('reconnect');
    const ws = this._ws;
    if (ws) {
      this._drop({ code, reason, wasClean: true, local: true }, { closeCode: code, closeReason: reason });
    } else {
      this._finishClosed();
    }
    this._removeBrowserHooks();
  }

  // ---------------------------------------------------------------- connection

  _setState(state, extra = {}) {
    const previous = this._state;
    this._state = state;
    this._emit('state', { state, previous, url: this.url, node: this.node, attempt: this.backoff.attempt, ...extra });
  }

  _clearTimer(name) {
    if (this._timers[name] !== null) {
      this._clearTimeout(this._timers[name]);
      this._timers[name] = null;
    }
  }

  _tokenUsable() {
    if (!this._token) return false;
    if (this._tokenExp === null) return true;
    return this._tokenExp * 1000 > this._now() + 1000;
  }

  _withTimeout(promise, ms, what) {
    let timer;
    const t = new Promise((_, reject) => {
      timer = this._setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms);
    });
    return Promise.race([promise, t]).finally(() => this._clearTimeout(timer));
  }

  async _open() {
    this._clearTimer('reconnect');
    this._retryAt = null;
    const gen = ++this._gen;
    this._setState('connecting');
    let token = this._token;
    if (this._getToken && (this._forceToken || !this._tokenUsable())) {
      try {
        token = await this._withTimeout(Promise.resolve().then(() => this._getToken()), this._opts.connectTimeoutMs, 'getToken');
        if (gen !== this._gen || this._closedByApp) return;
        this.setToken(token);
        this._forceToken = false;
      } catch (err) {
        if (gen !== this._gen || this._closedByApp) return;
        this._emit('error', new WsgateError('token_unavailable', `getToken failed: ${err?.message ?? err}`, { cause: err }));
        if (!this._tokenUsable()) {
          this._scheduleReconnect({ code: 0, reason: 'token unavailable' });
          return;
        }
        token = this._token;
      }
    }
    if (!token) {
      this._scheduleReconnect({ code: 0, reason: 'no token' });
      return;
    }
    // `auto` tries the WebSocket first on every attempt (a network that
    // blocked it may have changed), and SSE at once when it cannot open.
    this._attempt(this._mode === 'sse' ? 'sse' : 'ws', token, gen);
  }

  // One connection attempt over `transport` with `token`.
  _attempt(transport, token, gen) {
    this._transport = transport;
    let ws;
    try {
      ws = transport === 'sse'
        ? new SseSocket(withToken(sseUrl(this.url), token), { fetch: this._fetch, getToken: () => this._token ?? token })
        : new this._WebSocket(withToken(this.url, token));
    } catch (err) {
      this._emit('error', new WsgateError('connect_failed', String(err?.message ?? err), { cause: err }));
      this._scheduleReconnect({ code: 1006, reason: 'connect failed' });
      return;
    }
    this._ws = ws;
    this._lastFrameAt = this._now();
    let opened = false;
    // A WebSocket that cannot open (refused or swallowed upgrade, as behind a
    // proxy that blocks WebSockets) in `auto` mode: SSE, without a backoff.
    const failed = (info) => {
      if (gen !== this._gen) return;
      if (!opened && transport === 'ws' && this._mode === 'auto') this._fallBack(ws, token, info.reason);
      else this._drop(info);
    };
    ws.onopen = () => {
      opened = true;
    };
    ws.onmessage = (ev) => {
      if (gen === this._gen) this._onFrame(dataToText(ev.data));
    };
    // SSE comment lines (the server's heartbeat) prove the stream alive.
    ws.onheartbeat = () => {
      if (gen !== this._gen) return;
      this._lastFrameAt = this._now();
      this._pingSentAt = null;
    };
    ws.onclose = (ev) => failed({ code: ev?.code ?? 1006, reason: ev?.reason ?? '', wasClean: !!ev?.wasClean });
    // An error event is a failed attempt (a refused or broken handshake, a
    // network error): browsers follow it with a close event, but Node 20's
    // experimental WebSocket never does after a refused handshake, so do not
    // wait for one (nor for the connect timeout).
    // Unlike a WebSocket, a refused stream shows its status: a 401 with a
    // getToken callback fetches a new token first, as after close 4001.
    ws.onerror = (ev) => failed({ code: ev?.status === 401 && this._getToken ? 4001 : 1006, reason: ev?.message ? String(ev.message) : 'connection failed' });
    this._clearTimer('connect');
    this._timers.connect = this._setTimeout(() => {
      this._timers.connect = null;
      failed({ code: 4000, reason: 'connect timeout', local: true });
    }, this._opts.connectTimeoutMs);
  }

  _fallBack(ws, token, reason) {
    this._detach(ws);
    this._ws = null;
    const gen = ++this._gen;
    this._emit('fallback', { from: 'ws', to: 'sse', reason, url: this.url });
    this._attempt('sse', this._token ?? token, gen);
  }

  // Stop listening to a socket and close it.
  _detach(ws, closeCode = 4000, closeReason = '') {
    ws.onmessage = null;
    ws.onclose = null;
    ws.onerror = null;
    ws.onopen = null;
    ws.onheartbeat = null;
    if (ws.readyState === WS_OPEN || ws.readyState === WS_CONNECTING) {
      try {
        ws.close(closeCode, closeReason);
      } catch {
        // Browsers only accept 1000 and 3000-4999 from scripts.
        try {
          ws.close();
        } catch {
          /* already closing */
        }
      }
    }
  }

  _onFrame(text) {
    this._lastFrameAt = this._now();
    this._frames += 1;
    this._pingSentAt = null;
    let f;
    try {
      f = JSON.parse(text);
    } catch {
      this._emit('error', new WsgateError('bad_frame', 'frame from server is not JSON'));
      return;
    }
    if (!f || typeof f !== 'object') return;
    switch (f.type) {
      case 'welcome':
        return this._onWelcome(f);
      case 'joined':
        return this._onJoined(f);
      case 'message':
        return this._onMessage(f);
      case 'left':
        this._resolvePending(f);
        this._emit('left', f);
        return;
      case 'ack':
        this._resolvePending(f);
        this._emit('ack', f);
        return;
      case 'pong':
        this._resolvePending(f);
        this._emit('pong', f);
        return;
      case 'refreshed':
        this._resolvePending(f);
        return;
      case 'presence':
        this._resolvePending(f);
        return;
      case 'presence_join':
      case 'presence_leave':
        this._emit(f.type, { room: f.room, user: f.user });
        return;
      case 'error':
        return this._onError(f);
      default:
        this._emit('frame', f);
    }
  }

  _onWelcome(f) {
    this._clearTimer('connect');
    this._welcome = f;
    if (typeof f.heartbeat_ms === 'number' && f.heartbeat_ms > 0) this._heartbeatMs = f.heartbeat_ms;
    const reconnected = this._everConnected;
    this._everConnected = true;
    this.stats.connects += 1;
    if (reconnected) this.stats.reconnects += 1;
    this.backoff.connected(this._now());
    this._setState('connected', { node: f.node, reconnected, transport: this._transport });
    this._emit('welcome', { ...f, url: this.url, reconnected, transport: this._transport });
    this._armWatchdog();
    this._scheduleRefresh();
    for (const room of this.tracker.list()) this._sendJoin(room, reconnected);
    this._resendUnacked();
    const waiters = this._connectWaiters;
    this._connectWaiters = [];
    for (const w of waiters) w(f);
  }

  _onJoined(f) {
    const pending = f.id !== undefined ? this._pending.get(String(f.id)) : undefined;
    const rejoin = pending?.rejoin ?? false;
    if (pending) this._resolvePending(f);
    if (!this.tracker.has(f.room)) return;
    this._cancelJoinRetry(f.room);
    const { resumed, gap } = this.tracker.onJoined(f);
    const ev = { room: f.room, seq: f.seq, epoch: f.epoch, recovered: f.recovered, resumed, rejoin, unsolicited: f.id === undefined && !pending };
    this._emit('joined', ev);
    if (pending && this.tracker.rooms.get(f.room)?.presence) {
      // Events are not replayed: ask who is here after every (re-)join.
      this.presence(f.room).then(
        (p) => this._emit('presence', p),
        (err) => this._emit('error', err),
      );
    }
    if (gap) {
      this.stats.gaps += 1;
      this._emit('gap', gap);
    }
    const waiters = this._roomWaiters.get(f.room);
    if (waiters) {
      this._roomWaiters.delete(f.room);
      for (const w of waiters) w.resolve(ev);
    }
  }

  _onMessage(f) {
    const r = this.tracker.onMessage(f);
    if (r.duplicate) {
      this.stats.duplicatesDropped += 1;
      return;
    }
    if (r.gap) {
      this.stats.gaps += 1;
      this._emit('gap', r.gap);
    }
    if (!r.deliver) return;
    this.stats.messages += 1;
    f.replayed = r.replayed;
    this._emit('message', f);
  }

  _onError(f) {
    const err = new WsgateError(f.code ?? 'unknown', f.message ?? f.code, { id: f.id });
    const pending = f.id !== undefined ? this._pending.get(String(f.id)) : undefined;
    if (pending) {
      err.room = pending.room;
      err.request = pending.kind;
      this._pending.delete(String(f.id));
      this._clearTimeout(pending.timer);
      if (pending.kind === 'join') this._onJoinError(pending.room, err);
      else if (pending.kind === 'publish' && this._retryPublish(pending.publish, err.code)) return;
      else pending.reject(err);
    }
    this._emit('error', err);
  }

  _onJoinError(room, err) {
    if (!this.tracker.has(room)) return;
    if (err.code === 'unavailable' || err.code === 'rate_limited') {
      // The broker could not take the join: try again later, keep the promise pending.
      const r = this._joinRetry.get(room) ?? { timer: null, attempt: 0 };
      if (r.timer !== null) this._clearTimeout(r.timer);
      const delay = Math.max(backoffDelay(r.attempt, { baseMs: this.backoff.baseMs, capMs: this.backoff.capMs }, this.backoff.random), this.backoff.baseMs / 2);
      r.attempt += 1;
      r.timer = this._setTimeout(() => {
        r.timer = null;
        if (this._state === 'connected' && this.tracker.has(room)) this._sendJoin(room, true);
      }, delay);
      this._joinRetry.set(room, r);
      return;
    }
    this.tracker.unwant(room);
    this._cancelJoinRetry(room);
    this._rejectRoomWaiters(room, err);
  }

  _cancelJoinRetry(room) {
    const r = this._joinRetry.get(room);
    if (r) {
      if (r.timer !== null) this._clearTimeout(r.timer);
      this._joinRetry.delete(room);
    }
  }

  _rejectRoomWaiters(room, err) {
    const waiters = this._roomWaiters.get(room);
    if (!waiters) return;
    this._roomWaiters.delete(room);
    for (const w of waiters) w.reject(err);
  }

  _sendJoin(room, rejoin = false) {
    const id = this._nextId();
    const frame = this.tracker.joinFrame(room, id);
    this._pending.set(id, { kind: 'join', room, rejoin, resolve: () => {}, reject: () => {}, timer: null });
    this._send(frame);
  }

  // Send (or send again) a publish with its key; false when the socket is not open.
  _sendPublish(p) {
    const id = this._nextId();
    const entry = { kind: 'publish', room: p.room, publish: p, resolve: (f) => p.resolve(f.seq), reject: p.reject, timer: null };
    const ms = p.timeoutMs ?? this._opts.requestTimeoutMs;
    entry.timer = this._setTimeout(() => {
      if (this._pending.get(id) === entry) {
        this._pending.delete(id);
        p.reject(new WsgateError('timeout', `no answer to publish within ${ms} ms`, { room: p.room, request: 'publish' }));
      }
    }, ms);
    this._pending.set(id, entry);
    p.sends += 1;
    if (this._send({ type: 'publish', room: p.room, data: p.data, key: p.key, id })) return true;
    p.sends -= 1;
    this._pending.delete(id);
    this._clearTimeout(entry.timer);
    return false;
  }

  _publishExpired(p) {
    return this._now() - p.since >= PUBLISH_RETRY.windowMs;
  }

  // Whether an error answer to a publish is not final: `timeout` (fate
  // unknown) is sent again at once; `unavailable` / `rate_limited` to a
  // publish sent before (an earlier send may have been taken) is sent again
  // after a growing delay. The same key makes both safe.
  _retryPublish(p, code) {
    if (this._publishExpired(p)) return false;
    if (code === 'timeout' && p.timeouts < PUBLISH_RETRY.timeoutRetries) {
      p.timeouts += 1;
      if (!this._sendPublish(p)) this._keepUnacked([p]);
      return true;
    }
    if ((code === 'unavailable' || code === 'rate_limited') && p.sends > 1) {
      const delay = Math.min(this.backoff.baseMs * 2 ** Math.min(p.sends, 8), this.backoff.capMs);
      const gen = this._gen;
      this._publishRetries.add(p);
      p.retryTimer = this._setTimeout(() => {
        this._publishRetries.delete(p);
        p.retryTimer = null;
        if (gen === this._gen && this._sendPublish(p)) return;
        this._keepUnacked([p]);
      }, delay);
      return true;
    }
    return false;
  }

  // Keep publishes a drop left unanswered (in send order) for the next connection.
  _keepUnacked(list) {
    for (const p of list) {
      if (this._publishExpired(p)) p.reject(this._expiredError(p));
      else if (this._unacked.length >= PUBLISH_RETRY.maxQueued) p.reject(new WsgateError('disconnected', 'connection closed before the answer (retry queue full); the message may or may not have been published', { room: p.room, request: 'publish' }));
      else this._unacked.push(p);
    }
    this._armUnackedExpiry();
  }

  _expiredError(p) {
    return new WsgateError('publish_expired', 'no ack before the idempotency key expired (the connection did not come back in time); the message may or may not have been published', { room: p.room, request: 'publish' });
  }

  // Fail queued publishes whose key the gateway may have forgotten; wake for the next one.
  _armUnackedExpiry() {
    this._clearTimer('unacked');
    const kept = [];
    for (const p of this._unacked) {
      if (this._publishExpired(p)) p.reject(this._expiredError(p));
      else kept.push(p);
    }
    this._unacked = kept;
    if (kept.length === 0) return;
    const next = Math.min(...kept.map((p) => p.since + PUBLISH_RETRY.windowMs));
    this._timers.unacked = this._setTimeout(() => {
      this._timers.unacked = null;
      this._armUnackedExpiry();
    }, Math.max(0, next - this._now()));
  }

  _resendUnacked() {
    this._armUnackedExpiry();
    this._clearTimer('unacked');
    const list = this._unacked;
    this._unacked = [];
    const failed = list.filter((p) => !this._sendPublish(p));
    if (failed.length > 0) this._keepUnacked(failed);
  }

  _nextId() {
    this._idSeq += 1;
    return `c${this._idSeq}`;
  }

  _send(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== WS_OPEN) return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  _request(frame, kind, room, timeoutMs) {
    return new Promise((resolve, reject) => {
      const id = this._nextId();
      const entry = { kind, room, resolve, reject, timer: null };
      entry.timer = this._setTimeout(() => {
        if (this._pending.get(id) === entry) {
          this._pending.delete(id);
          reject(new WsgateError('timeout', `no answer to ${kind} within ${timeoutMs ?? this._opts.requestTimeoutMs} ms`, { room, request: kind }));
        }
      }, timeoutMs ?? this._opts.requestTimeoutMs);
      this._pending.set(id, entry);
      if (!this._send({ ...frame, id })) {
        this._pending.delete(id);
        this._clearTimeout(entry.timer);
        reject(new WsgateError('not_connected', 'not connected', { room, request: kind }));
      }
    });
  }

  _resolvePending(f) {
    if (f.id === undefined) return;
    const id = String(f.id);
    const p = this._pending.get(id);
    if (!p) return;
    this._pending.delete(id);
    this._clearTimeout(p.timer);
    p.resolve(f);
  }

  // Watchdog: any frame proves the connection alive. After `heartbeat_ms` of
  // silence send an app-level ping; after `heartbeatTimeoutMs` more, drop.
  _armWatchdog() {
    this._clearTimer('watchdog');
    const gen = this._gen;
    const tick = () => {
      this._timers.watchdog = null;
      if (gen !== this._gen || this._state !== 'connected') return;
      const now = this._now();
      const idle = now - this._lastFrameAt;
      const hb = this._heartbeatMs;
      if (idle >= hb + this._opts.heartbeatTimeoutMs) {
        this._drop({ code: 4000, reason: 'heartbeat timeout', local: true });
        return;
      }
      if (idle >= hb && this._pingSentAt === null) {
        this._pingSentAt = now;
        this._send({ type: 'ping', id: this._nextId() });
      }
      const due = idle >= hb ? hb + this._opts.heartbeatTimeoutMs - idle : hb - idle;
      this._timers.watchdog = this._setTimeout(tick, Math.max(1, due));
    };
    this._timers.watchdog = this._setTimeout(tick, this._heartbeatMs);
  }

  // Quick liveness check (page back online / visible): ping, drop if nothing arrives soon.
  _probe() {
    if (this._state !== 'connected' || this._timers.probe !== null) return;
    const gen = this._gen;
    const framesBefore = this._frames;
    this._send({ type: 'ping', id: this._nextId() });
    this._timers.probe = this._setTimeout(() => {
      this._timers.probe = null;
      if (gen === this._gen && this._state === 'connected' && this._frames === framesBefore) {
        this._drop({ code: 4000, reason: 'probe timeout', local: true });
      }
    }, this._opts.heartbeatTimeoutMs);
  }

  _scheduleRefresh() {
    this._clearTimer('refresh');
    if (!this._getToken || this._tokenExp === null || this._state !== 'connected') return;
    const remaining = this._tokenExp * 1000 - this._now();
    if (remaining <= 0) return;
    const margin = Math.min(this._opts.refreshMarginMs, remaining / 2);
    const delay = Math.min(Math.max(0, remaining - margin), MAX_TIMER_MS);
    const gen = this._gen;
    this._timers.refresh = this._setTimeout(() => {
      this._timers.refresh = null;
      if (gen !== this._gen) return;
      this.refreshToken().catch((err) => {
        if (gen !== this._gen || this._state !== 'connected') return;
        this._emit('error', err instanceof WsgateError ? err : new WsgateError('token_unavailable', String(err?.message ?? err), { cause: err }));
        // Try again halfway to expiry; if that fails too, close 4001 brings a fresh token.
        const left = this._tokenExp * 1000 - this._now();
        if (left > 2000) {
          this._timers.refresh = this._setTimeout(() => {
            this._timers.refresh = null;
            if (gen === this._gen) this._scheduleRefresh();
          }, Math.min(left / 2, MAX_TIMER_MS));
        }
      });
    }, delay);
  }

  _drop(info, { closeCode = 4000, closeReason = '', immediate = false } = {}) {
    const ws = this._ws;
    this._ws = null;
    this._gen += 1;
    for (const name of ['connect', 'watchdog', 'refresh', 'probe']) this._clearTimer(name);
    for (const r of this._joinRetry.values()) if (r.timer !== null) this._clearTimeout(r.timer);
    this._joinRetry.clear();
    if (ws) this._detach(ws, closeCode, closeReason);
    const wasConnected = this._state === 'connected';
    this._welcome = wasConnected ? this._welcome : null;
    this.tracker.disconnected();
    const pending = [...this._pending.values()];
    this._pending.clear();
    const unacked = [];
    for (const p of pending) {
      this._clearTimeout(p.timer);
      if (p.kind === 'publish') unacked.push(p.publish);
      else if (p.kind !== 'join') p.reject(new WsgateError('disconnected', `connection closed (${info.code}) before the answer`, { room: p.room, request: p.kind }));
    }
    for (const p of this._publishRetries) {
      this._clearTimeout(p.retryTimer);
      p.retryTimer = null;
      unacked.push(p);
    }
    this._publishRetries.clear();
    // Sent again, with their keys, after the next welcome (or rejected `closed` below).
    this._keepUnacked(unacked);
    this.backoff.disconnected(this._now());
    this._emit('close', { code: info.code, reason: info.reason ?? '', wasClean: !!info.wasClean, local: !!info.local, url: this.url, node: this._welcome?.node ?? null, transport: this._transport, connected: wasConnected });
    this._welcome = null;
    if (this._closedByApp) {
      this._finishClosed();
      return;
    }
    if (info.code === 4001) {
      if (this._getToken) this._forceToken = true;
      else {
        this._emit('error', new WsgateError('token_expired', 'token expired (close 4001) and no getToken callback to renew it'));
        this._closedByApp = true;
        this._finishClosed();
        return;
      }
    }
    this._scheduleReconnect(info, immediate);
  }

  _scheduleReconnect(info, immediate = false) {
    if (this._closedByApp) return;
    if (this._urls.length > 1) this._urlIndex = (this._urlIndex + 1) % this._urls.length;
    const attempt = this.backoff.attempt;
    const delayMs = immediate ? 0 : this.backoff.next();
    this._retryAt = this._now() + delayMs;
    this._timers.reconnect = this._setTimeout(() => {
      this._timers.reconnect = null;
      this._open();
    }, delayMs);
    this._setState('reconnecting', { attempt, delayMs, retryAt: this._retryAt, code: info.code, reason: info.reason ?? '', nextUrl: this.url });
  }

  _finishClosed() {
    this._clearTimer('reconnect');
    for (const name of ['connect', 'watchdog', 'refresh', 'probe', 'unacked']) this._clearTimer(name);
    const unacked = this._unacked;
    this._unacked = [];
    for (const p of unacked) p.reject(new WsgateError('closed', 'client closed before the ack; the message may or may not have been published', { room: p.room, request: 'publish' }));
    for (const room of [...this._roomWaiters.keys()]) this._rejectRoomWaiters(room, new WsgateError('closed', 'client closed', { room }));
    const waiters = this._connectWaiters;
    this._connectWaiters = [];
    for (const w of waiters) w(null);
    if (this._state !== 'closed') this._setState('closed');
  }

  // ---------------------------------------------------------------- browser awareness

  _installBrowserHooks(win, doc) {
    if (this._opts.browserEvents === false) return;
    this._hooks = [];
    const add = (target, type, fn) => {
      if (target && typeof target.addEventListener === 'function') {
        target.addEventListener(type, fn);
        this._hooks.push(() => target.removeEventListener(type, fn));
      }
    };
    const wake = (why) => {
      if (this._closedByApp) return;
      if (this._state === 'reconnecting') {
        // Back online / visible: try now instead of waiting out the backoff.
        this._emit('wake', { reason: why });
        this._clearTimer('reconnect');
        this._open();
      } else if (this._state === 'connected') {
        this._probe();
      }
    };
    add(win, 'online', () => wake('online'));
    add(win, 'offline', () => this._probe());
    add(doc, 'visibilitychange', () => {
      if (doc.visibilityState === 'visible') wake('visible');
    });
  }

  _removeBrowserHooks() {
    for (const off of this._hooks ?? []) off();
    this._hooks = [];
  }
}

export default WsgateClient;
