import { test } from 'node:test';
import assert from 'node:assert/strict';
import { WsgateClient, WsgateError } from '../wsgate.js';
import { FakeClock, makeFakeWebSocket, flush, fakeJwt } from './fakes.mjs';

function setup(extra = {}) {
  const clock = new FakeClock();
  const { FakeWebSocket, sockets } = makeFakeWebSocket();
  const draws = extra.draws ?? [];
  let di = 0;
  const client = new WsgateClient({
    urls: ['ws://127.0.0.1:1/ws', 'ws://127.0.0.1:2/ws'],
    token: 'tok',
    WebSocket: FakeWebSocket,
    now: clock.now,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    random: () => (di < draws.length ? draws[di++] : 0.5),
    backoffBaseMs: 1000,
    backoffCapMs: 8000,
    stableMs: 20000,
    // These tests are about the WebSocket; test/sse.test.mjs covers `auto` and `sse`.
    transport: 'ws',
    ...extra.options,
  });
  const events = [];
  for (const type of ['state', 'welcome', 'joined', 'message', 'gap', 'error', 'close', 'ack', 'left']) {
    client.on(type, (ev) => events.push([type, ev]));
  }
  const of = (type) => events.filter(([t]) => t === type).map(([, e]) => e);
  return { clock, sockets, client, events, of, last: () => sockets[sockets.length - 1] };
}

async function connected(s, welcome) {
  const p = s.client.connect();
  await flush();
  s.last().accept(welcome);
  return p;
}

test('connects with ?token=, emits state and welcome, resolves connect()', async () => {
  const s = setup();
  const w = await connected(s, { node: 'n1' });
  assert.equal(w.node, 'n1');
  assert.equal(s.sockets.length, 1);
  assert.equal(s.last().url, 'ws://127.0.0.1:1/ws?token=tok');
  assert.equal(s.client.state, 'connected');
  assert.equal(s.client.node, 'n1');
  assert.deepEqual(s.of('state').map((e) => e.state), ['connecting', 'connected']);
});

test('join / publish / leave with request ids; publish resolves with the ack seq', async () => {
  const s = setup();
  await connected(s);
  const ws = s.last();
  const jp = s.client.join('lobby');
  const jf = ws.lastSent('join');
  assert.deepEqual(Object.keys(jf).sort(), ['id', 'room', 'type']);
  ws.frame({ type: 'joined', room: 'lobby', seq: 4, epoch: 'E', id: jf.id });
  assert.deepEqual(await jp, { room: 'lobby', seq: 4, epoch: 'E', recovered: undefined, resumed: false, rejoin: false, unsolicited: false });

  const pp = s.client.publish('lobby', { text: 'hi' });
  const pf = ws.lastSent('publish');
  assert.deepEqual(pf.data, { text: 'hi' });
  ws.frame({ type: 'message', room: 'lobby', seq: 5, from: 'alice', data: { text: 'hi' }, ts: 1 });
  ws.frame({ type: 'ack', id: pf.id, room: 'lobby', seq: 5 });
  assert.equal(await pp, 5);
  assert.deepEqual(s.of('message').map((m) => m.seq), [5]);

  const lp = s.client.leave('lobby');
  ws.frame({ type: 'left', room: 'lobby', id: ws.lastSent('leave').id });
  await lp;
  assert.deepEqual(s.client.rooms, []);
});

test('publish errors are typed WsgateErrors carrying the code', async () => {
  const s = setup();
  await connected(s);
  const ws = s.last();
  const pp = s.client.publish('admin', 1);
  ws.frame({ type: 'error', code: 'forbidden', message: 'no', id: ws.lastSent('publish').id });
  await assert.rejects(pp, (e) => e instanceof WsgateError && e.code === 'forbidden' && e.room === 'admin');
  const rl = s.client.publish('lobby', 1);
  ws.frame({ type: 'error', code: 'rate_limited', message: 'slow down', id: ws.lastSent('publish').id });
  await assert.rejects(rl, { code: 'rate_limited' });
  assert.deepEqual(s.of('error').map((e) => e.code), ['forbidden', 'rate_limited']);
});

test('publish while not connected rejects at once; an in-flight publish rejects `closed` when the app closes', async () => {
  const s = setup();
  await assert.rejects(s.client.publish('lobby', 1), { code: 'not_connected' });
  await connected(s);
  const pp = s.client.publish('lobby', 1);
  s.client.close();
  await assert.rejects(pp, { code: 'closed' });
});

test('every publish carries a distinct key of the protocol alphabet', async () => {
  const s = setup();
  await connected(s);
  const ws = s.last();
  s.client.publish('lobby', 1);
  const k1 = ws.lastSent('publish').key;
  s.client.publish('lobby', 2);
  const k2 = ws.lastSent('publish').key;
  for (const k of [k1, k2]) assert.match(k, /^[A-Za-z0-9_.:-]{1,64}$/);
  assert.notEqual(k1, k2);
  const other = setup();
  await connected(other);
  other.client.publish('lobby', 1);
  assert.notEqual(other.last().lastSent('publish').key, k1, 'two clients never share keys');
});

test('a publish whose ack a drop swallowed is sent again with its key after the re-joins, and resolves with that ack', async () => {
  const s = setup();
  await connected(s);
  let ws = s.last();
  const jp = s.client.join('lobby');
  ws.frame({ type: 'joined', room: 'lobby', seq: 4, epoch: 'E', id: ws.lastSent('join').id });
  await jp;
  const pp = s.client.publish('lobby', { text: 'hi' });
  const first = ws.lastSent('publish');
  let settled = false;
  pp.then(() => (settled = true), () => (settled = true));
  ws.serverClose(1006);
  await flush();
  assert.equal(settled, false, 'kept for the next connection');
  s.clock.advance(8000);
  await flush();
  ws = s.last();
  assert.notEqual(ws, undefined);
  ws.accept();
  const types = ws.sent.map((f) => f.type);
  assert.deepEqual(types, ['join', 'publish'], 'the re-join goes first');
  const again = ws.lastSent('publish');
  assert.equal(again.key, first.key);
  assert.deepEqual(again.data, { text: 'hi' });
  assert.notEqual(again.id, first.id);
  // `unavailable` to a second send is not final: sent again later, same key.
  ws.frame({ type: 'error', code: 'unavailable', message: 'broker unavailable', id: again.id });
  assert.equal(settled, false);
  s.clock.advance(8000);
  const third = ws.lastSent('publish');
  assert.notEqual(third.id, again.id);
  assert.equal(third.key, first.key);
  ws.frame({ type: 'ack', id: third.id, room: 'lobby', seq: 5 });
  assert.equal(await pp, 5);
});

test('a `timeout` answer is sent again with the same key, at most 3 times; `unavailable` is not retried', async () => {
  const s = setup();
  await connected(s);
  const ws = s.last();
  const pp = s.client.publish('lobby', 1);
  const key = ws.lastSent('publish').key;
  for (let i = 0; i < 3; i++) {
    ws.frame({ type: 'error', code: 'timeout', message: 'broker did not confirm in time', id: ws.lastSent('publish').id });
    assert.equal(ws.lastSent('publish').key, key);
  }
  assert.equal(ws.sent.filter((f) => f.type === 'publish').length, 4);
  ws.frame({ type: 'error', code: 'timeout', message: 'broker did not confirm in time', id: ws.lastSent('publish').id });
  await assert.rejects(pp, { code: 'timeout' });
  assert.equal(ws.sent.filter((f) => f.type === 'publish').length, 4);

  const up = s.client.publish('lobby', 2);
  ws.frame({ type: 'error', code: 'unavailable', message: 'broker unavailable', id: ws.lastSent('publish').id });
  await assert.rejects(up, { code: 'unavailable' });
  assert.equal(ws.sent.filter((f) => f.type === 'publish').length, 5);
});

test('a publish still unacknowledged when its key may have expired rejects `publish_expired`', async () => {
  const s = setup();
  await connected(s);
  const pp = s.client.publish('lobby', 1);
  const outcome = pp.then(() => null, (e) => e);
  s.last().serverClose(1006);
  // No node answers for 5 minutes (bounded: the fake clock fires due timers only).
  for (let i = 0; i < 40; i++) {
    s.clock.advance(8000);
    await flush();
  }
  assert.equal((await outcome)?.code, 'publish_expired');
});

test('publish times out without an answer', async () => {
  const s = setup();
  await connected(s);
  const pp = s.client.publish('lobby', 1, { timeoutMs: 500 });
  s.clock.advance(500);
  await assert.rejects(pp, { code: 'timeout' });
});

test('a forbidden join rejects and the room is not re-joined later', async () => {
  const s = setup();
  await connected(s);
  const ws = s.last();
  const jp = s.client.join('admin');
  ws.frame({ type: 'error', code: 'forbidden', message: 'no', id: ws.lastSent('join').id });
  await assert.rejects(jp, { code: 'forbidden' });
  assert.deepEqual(s.client.rooms, []);
});

test('drop -> backoff with jitter -> next URL -> rejoin with since+epoch -> replay without duplicates', async () => {
  const s = setup({ draws: [0.25] });
  await connected(s, { node: 'n1' });
  let ws = s.last();
  s.client.join('lobby');
  ws.frame({ type: 'joined', room: 'lobby', seq: 10, epoch: 'E', id: ws.lastSent('join').id });
  ws.frame({ type: 'message', room: 'lobby', seq: 11, from: 'a', data: 11, ts: 1 });
  ws.frame({ type: 'message', room: 'lobby', seq: 12, from: 'a', data: 12, ts: 1 });

  ws.serverClose(1001, 'shutting down');
  const rec = s.of('state').at(-1);
  assert.equal(rec.state, 'reconnecting');
  assert.equal(rec.delayMs, 250, 'full jitter: 0.25 * base');
  assert.equal(rec.code, 1001);
  assert.equal(s.of('close').at(-1).code, 1001);
  s.clock.advance(249);
  assert.equal(s.sockets.length, 1, 'waits out the delay');
  s.clock.advance(1);
  await flush();
  assert.equal(s.sockets.length, 2);
  ws = s.last();
  assert.ok(ws.url.startsWith('ws://127.0.0.1:2/ws?'), 'tries the next URL');
  ws.accept({ node: 'n2' });
  const jf = ws.lastSent('join');
  assert.equal(jf.since, 12);
  assert.equal(jf.epoch, 'E');
  ws.frame({ type: 'joined', room: 'lobby', seq: 14, epoch: 'E', recovered: true, id: jf.id });
  for (const seq of [12, 13, 14, 13, 15]) ws.frame({ type: 'message', room: 'lobby', seq, from: 'a', data: seq, ts: 1 });
  assert.deepEqual(s.of('message').map((m) => m.seq), [11, 12, 13, 14, 15]);
  assert.deepEqual(s.of('message').map((m) => m.replayed), [false, false, true, true, false]);
  assert.equal(s.of('gap').length, 0);
  const j = s.of('joined').at(-1);
  assert.equal(j.resumed, true);
  assert.equal(j.rejoin, true);
  assert.equal(s.client.stats.duplicatesDropped, 2);
  assert.equal(s.client.stats.reconnects, 1);
});

test('recovered:false after a reconnect surfaces a gap event', async () => {
  const s = setup();
  await connected(s);
  let ws = s.last();
  s.client.join('lobby');
  ws.frame({ type: 'joined', room: 'lobby', seq: 3, epoch: 'E', id: ws.lastSent('join').id });
  ws.serverClose(1006);
  s.clock.advance(10_000);
  await flush();
  ws = s.last();
  ws.accept();
  ws.frame({ type: 'joined', room: 'lobby', seq: 5000, epoch: 'E', recovered: false, id: ws.lastSent('join').id });
  const g = s.of('gap');
  assert.equal(g.length, 1);
  assert.equal(g[0].reason, 'not_recovered');
  assert.equal(g[0].lastSeq, 3);
  assert.equal(g[0].recovered, false);
});

test('backoff grows while every node is down, is capped, and resets after a stable connection', async () => {
  const s = setup({ draws: Array(20).fill(0.999) });
  s.client.connect();
  await flush();
  const delays = [];
  for (let i = 0; i < 6; i++) {
    s.last().fail();
    const st = s.of('state').at(-1);
    assert.equal(st.state, 'reconnecting');
    delays.push(st.delayMs);
    s.clock.advance(st.delayMs);
    await flush();
  }
  assert.deepEqual(delays, [999, 1998, 3996, 7992, 7992, 7992]);
  // the URLs alternate
  assert.deepEqual(s.sockets.map((w) => new URL(w.url).port), ['1', '2', '1', '2', '1', '2', '1']);
  s.last().accept();
  s.clock.advance(20_000); // stable (the watchdog pings meanwhile; answer them)
  s.last().serverClose(1006);
  assert.equal(s.of('state').at(-1).delayMs, 999, 'back to the base delay');
});

test('a connection that drops quickly keeps backing off', async () => {
  const s = setup({ draws: Array(20).fill(0.999) });
  s.client.connect();
  await flush();
  s.last().fail();
  s.clock.advance(999);
  await flush();
  s.last().accept();
  s.clock.advance(100);
  s.last().serverClose(1006);
  assert.equal(s.of('state').at(-1).delayMs, 1998);
});

test('no frame within heartbeat_ms: app-level ping; none within the timeout either: reconnect', async () => {
  const s = setup({ options: { heartbeatTimeoutMs: 5000 } });
  await connected(s, { heartbeat_ms: 10000 });
  const ws = s.last();
  s.clock.advance(9999);
  assert.equal(ws.lastSent('ping'), undefined);
  s.clock.advance(1);
  assert.ok(ws.lastSent('ping'), 'pings after heartbeat_ms of silence');
  ws.frame({ type: 'pong', id: ws.lastSent('ping').id });
  s.clock.advance(14_999);
  assert.equal(s.client.state, 'connected', 'the pong counted as life');
  const pings = ws.sent.filter((f) => f.type === 'ping').length;
  assert.equal(pings, 2);
  s.clock.advance(1);
  assert.equal(s.client.state, 'reconnecting', 'dropped at heartbeat_ms + timeout after the last frame');
  assert.equal(s.of('close').at(-1).reason, 'heartbeat timeout');
  assert.equal(ws.closedWith.code, 4000);
});

test('any frame resets the heartbeat watchdog', async () => {
  const s = setup({ options: { heartbeatTimeoutMs: 5000 } });
  await connected(s, { heartbeat_ms: 10000 });
  const ws = s.last();
  for (let i = 0; i < 5; i++) {
    s.clock.advance(9000);
    ws.frame({ type: 'message', room: 'x', seq: i + 1, from: 'a', data: 1, ts: 1 });
  }
  assert.equal(ws.lastSent('ping'), undefined);
  assert.equal(s.client.state, 'connected');
});

test('no welcome within connectTimeoutMs: give up on that URL and retry', async () => {
  const s = setup({ options: { connectTimeoutMs: 3000 } });
  s.client.connect();
  await flush();
  s.clock.advance(3000);
  assert.equal(s.client.state, 'reconnecting');
  assert.equal(s.of('close').at(-1).reason, 'connect timeout');
});

test('an error event without a close (Node 20, refused handshake) is a failed attempt at once', async () => {
  const s = setup({ options: { connectTimeoutMs: 10000 }, draws: [0] });
  s.client.connect();
  await flush();
  s.last().refuse();
  assert.equal(s.client.state, 'reconnecting');
  const close = s.of('close').at(-1);
  assert.equal(close.code, 1006);
  assert.equal(close.connected, false);
  // Fail-over to the next URL after the backoff (0 with this draw), not the connect timeout.
  s.clock.advance(0);
  await flush();
  assert.equal(s.sockets.length, 2);
  assert.equal(s.last().url, 'ws://127.0.0.1:2/ws?token=tok');
  s.last().accept({ node: 'n2' });
  assert.equal(s.client.node, 'n2');
  // A browser's error + close pair counts once.
  assert.equal(s.of('close').length, 1);
});

test('an error and then a close (browsers) is one failed attempt', async () => {
  const s = setup();
  s.client.connect();
  await flush();
  s.last().fail();
  assert.equal(s.of('close').length, 1);
  assert.equal(s.client.state, 'reconnecting');
});

test('close 4001 calls getToken before reconnecting, then resumes', async () => {
  const clockStart = 1_700_000_000_000;
  let n = 0;
  const getToken = async () => fakeJwt({ sub: 'alice', exp: clockStart / 1000 + 3600, n: ++n });
  const s = setup({ options: { token: undefined, getToken } });
  await connected(s);
  assert.equal(n, 1);
  let ws = s.last();
  s.client.join('r');
  ws.frame({ type: 'joined', room: 'r', seq: 1, epoch: 'E', id: ws.lastSent('join').id });
  ws.serverClose(4001, 'token expired');
  s.clock.advance(10_000);
  await flush();
  assert.equal(n, 2, 'fetched a new token');
  ws = s.last();
  assert.equal(JSON.parse(Buffer.from(ws.token.split('.')[1], 'base64url')).n, 2);
  ws.accept();
  assert.equal(ws.lastSent('join').since, 1);
});

test('4001 with a fixed token and no getToken stops with token_expired', async () => {
  const s = setup();
  await connected(s);
  s.last().serverClose(4001);
  assert.equal(s.client.state, 'closed');
  assert.equal(s.of('error').at(-1).code, 'token_expired');
});

test('an expired token is renewed before connecting', async () => {
  let n = 0;
  const clock0 = 1_700_000_000_000;
  const tokens = [fakeJwt({ exp: clock0 / 1000 - 10 }), fakeJwt({ exp: clock0 / 1000 + 3600 })];
  const s = setup({ options: { token: tokens[0], getToken: async () => tokens[++n] } });
  s.client.connect();
  await flush();
  assert.equal(n, 1);
  assert.equal(s.last().token, tokens[1]);
});

test('sends refresh before exp and schedules the next one from refreshed.exp', async () => {
  const t0 = 1_700_000_000;
  let n = 0;
  const getToken = async () => fakeJwt({ exp: t0 + 600 * ++n });
  const s = setup({ options: { token: undefined, getToken, refreshMarginMs: 60_000, heartbeatTimeoutMs: 10_000 } });
  await connected(s, { heartbeat_ms: 1_000_000 });
  const ws = s.last();
  s.clock.advance(539_999);
  await flush();
  assert.equal(ws.lastSent('refresh'), undefined);
  s.clock.advance(1);
  await flush();
  const rf = ws.lastSent('refresh');
  assert.ok(rf, 'refresh sent 60 s before exp');
  assert.equal(rf.token, fakeJwt({ exp: t0 + 1200 }));
  ws.frame({ type: 'refreshed', exp: t0 + 1200, id: rf.id });
  await flush();
  assert.equal(s.client.state, 'connected');
  s.clock.advance(599_999);
  await flush();
  assert.equal(ws.sent.filter((f) => f.type === 'refresh').length, 1);
  s.clock.advance(1);
  await flush();
  assert.equal(ws.sent.filter((f) => f.type === 'refresh').length, 2);
});

test('an invalid_token answer to refresh is reported and the connection stays', async () => {
  const t0 = 1_700_000_000;
  const s = setup({ options: { token: undefined, getToken: async () => fakeJwt({ exp: t0 + 120 }), refreshMarginMs: 60_000 } });
  await connected(s, { heartbeat_ms: 1_000_000 });
  const ws = s.last();
  s.clock.advance(60_000);
  await flush();
  const rf = ws.lastSent('refresh');
  ws.frame({ type: 'error', code: 'invalid_token', message: 'bad', id: rf.id });
  await flush();
  assert.equal(s.client.state, 'connected');
  assert.ok(s.of('error').some((e) => e.code === 'invalid_token'));
});

test('close() sends 1000 and never reconnects; pending joins reject with closed', async () => {
  const s = setup();
  await connected(s);
  const ws = s.last();
  const jp = s.client.join('lobby');
  s.client.close();
  await assert.rejects(jp, { code: 'closed' });
  assert.deepEqual(ws.closedWith, { code: 1000, reason: '' });
  assert.equal(s.client.state, 'closed');
  s.clock.advance(600_000);
  await flush();
  assert.equal(s.sockets.length, 1);
  assert.deepEqual(s.clock.pending(), [], 'no timer left behind');
});

test('close() while waiting to reconnect cancels the retry', async () => {
  const s = setup();
  await connected(s);
  s.last().serverClose(1006);
  assert.equal(s.client.state, 'reconnecting');
  s.client.close();
  s.clock.advance(600_000);
  await flush();
  assert.equal(s.sockets.length, 1);
  assert.equal(s.client.state, 'closed');
});

test('rooms joined before connecting are joined on welcome; join() resolves then', async () => {
  const s = setup();
  const jp = s.client.join('a');
  s.client.join('b').catch(() => {});
  await connected(s);
  const ws = s.last();
  const joins = ws.sent.filter((f) => f.type === 'join').map((f) => f.room);
  assert.deepEqual(joins, ['a', 'b']);
  ws.frame({ type: 'joined', room: 'a', seq: 0, epoch: 'E', id: ws.sent[0].id });
  assert.equal((await jp).room, 'a');
  s.client.close();
});

test('an unsolicited joined with a new epoch is a gap; the new epoch\'s seqs are delivered', async () => {
  const s = setup();
  await connected(s);
  const ws = s.last();
  s.client.join('r');
  ws.frame({ type: 'joined', room: 'r', seq: 30, epoch: 'old', id: ws.lastSent('join').id });
  ws.frame({ type: 'joined', room: 'r', seq: 0, epoch: 'new', recovered: false });
  ws.frame({ type: 'message', room: 'r', seq: 1, from: 'a', data: 1, ts: 1 });
  assert.equal(s.of('gap')[0].reason, 'epoch_change');
  assert.equal(s.of('joined').at(-1).unsolicited, true);
  assert.deepEqual(s.of('message').map((m) => m.seq), [1]);
});

test('unavailable join is retried, the promise resolves when it finally works', async () => {
  const s = setup({ draws: [0.5, 0.5] });
  await connected(s);
  const ws = s.last();
  const jp = s.client.join('r');
  ws.frame({ type: 'error', code: 'unavailable', message: 'broker down', id: ws.lastSent('join').id });
  assert.equal(ws.sent.filter((f) => f.type === 'join').length, 1);
  s.clock.advance(1000);
  const second = ws.sent.filter((f) => f.type === 'join');
  assert.equal(second.length, 2);
  ws.frame({ type: 'joined', room: 'r', seq: 2, epoch: 'E', id: second[1].id });
  assert.equal((await jp).seq, 2);
});

test('back online / visible: reconnect at once instead of waiting out the backoff', async () => {
  const win = new EventTarget();
  const doc = new EventTarget();
  doc.visibilityState = 'hidden';
  const s = setup({ draws: [0.99], options: { window: win, document: doc } });
  await connected(s);
  s.last().serverClose(1006);
  assert.equal(s.sockets.length, 1);
  win.dispatchEvent(new Event('online'));
  await flush();
  assert.equal(s.sockets.length, 2, 'online event reconnects now');
  s.last().fail();
  doc.visibilityState = 'visible';
  doc.dispatchEvent(new Event('visibilitychange'));
  await flush();
  assert.equal(s.sockets.length, 3, 'visible again reconnects now');
  s.client.close();
});

test('offline while connected probes the connection and drops it if silent', async () => {
  const win = new EventTarget();
  const s = setup({ options: { window: win, heartbeatTimeoutMs: 2000 } });
  await connected(s, { heartbeat_ms: 1_000_000 });
  const ws = s.last();
  win.dispatchEvent(new Event('offline'));
  assert.ok(ws.lastSent('ping'));
  s.clock.advance(2000);
  assert.equal(s.client.state, 'reconnecting');
  assert.equal(s.of('close').at(-1).reason, 'probe timeout');
});

test('constructor validates its options', () => {
  const { FakeWebSocket } = makeFakeWebSocket();
  assert.throws(() => new WsgateClient({ token: 't', WebSocket: FakeWebSocket }), TypeError);
  assert.throws(() => new WsgateClient({ url: 'ws://h/ws', WebSocket: FakeWebSocket }), TypeError);
  assert.throws(() => new WsgateClient({ url: 'ftp://h/', token: 't', WebSocket: FakeWebSocket }), TypeError);
  const c = new WsgateClient({ url: '127.0.0.1:8080', token: 't', WebSocket: FakeWebSocket });
  assert.equal(c.url, 'ws://127.0.0.1:8080/ws');
  const d = new WsgateClient({ url: 'https://example.com', token: 't', WebSocket: FakeWebSocket });
  assert.equal(d.url, 'wss://example.com/ws');
});

test('a getToken that never answers counts as a failed attempt (bounded by connectTimeoutMs)', async () => {
  const s = setup({ options: { token: undefined, getToken: () => new Promise(() => {}), connectTimeoutMs: 2000 } });
  s.client.connect();
  await flush();
  assert.equal(s.client.state, 'connecting');
  s.clock.advance(2000);
  await flush();
  assert.equal(s.client.state, 'reconnecting');
  assert.equal(s.of('error').at(-1).code, 'token_unavailable');
  assert.equal(s.sockets.length, 0);
  s.client.close();
});

test('a failing getToken with a still-valid token reconnects with the old one', async () => {
  const exp = 1_700_000_000 + 3600;
  let calls = 0;
  const s = setup({ options: { token: fakeJwt({ exp }), getToken: async () => { calls += 1; throw new Error('token service down'); } } });
  await connected(s);
  s.last().serverClose(4001);
  s.clock.advance(10_000);
  await flush();
  assert.equal(calls, 1);
  assert.equal(s.sockets.length, 2, 'tried again with the token it had');
  s.client.close();
});

test('presence: join with presence:true, query after each (re-)join, events emitted', async () => {
  const s = setup();
  const got = [];
  for (const type of ['presence', 'presence_join', 'presence_leave']) s.client.on(type, (ev) => got.push([type, ev]));
  await connected(s);
  let ws = s.last();
  const jp = s.client.join('lobby', { presence: true });
  const jf = ws.lastSent('join');
  assert.equal(jf.presence, true);
  ws.frame({ type: 'joined', room: 'lobby', seq: 0, epoch: 'E', id: jf.id });
  await jp;
  const q = ws.lastSent('presence');
  assert.deepEqual({ type: q.type, room: q.room }, { type: 'presence', room: 'lobby' });
  ws.frame({ type: 'presence', room: 'lobby', count: 1, users: ['alice'], id: q.id });
  await flush();
  ws.frame({ type: 'presence_join', room: 'lobby', user: 'bob' });
  ws.frame({ type: 'presence_leave', room: 'lobby', user: 'bob' });
  assert.deepEqual(got, [
    ['presence', { room: 'lobby', count: 1, users: ['alice'], truncated: false }],
    ['presence_join', { room: 'lobby', user: 'bob' }],
    ['presence_leave', { room: 'lobby', user: 'bob' }],
  ]);
  // An explicit query resolves with the answer.
  const pp = s.client.presence('lobby');
  const q2 = ws.lastSent('presence');
  ws.frame({ type: 'presence', room: 'lobby', count: 1001, users: ['a'], truncated: true, id: q2.id });
  assert.deepEqual(await pp, { room: 'lobby', count: 1001, users: ['a'], truncated: true });
  // After a reconnect the re-join keeps the flag and presence is asked again.
  ws.serverClose(1001);
  await flush();
  s.clock.advance(60000);
  await flush();
  ws = s.last();
  ws.accept();
  await flush();
  const rj = ws.lastSent('join');
  assert.equal(rj.presence, true);
  ws.frame({ type: 'joined', room: 'lobby', seq: 0, epoch: 'E', id: rj.id });
  await flush();
  assert.equal(ws.lastSent('presence').room, 'lobby');
});

test('a join without presence sends no flag and asks nothing', async () => {
  const s = setup();
  await connected(s);
  const ws = s.last();
  const jp = s.client.join('lobby');
  const jf = ws.lastSent('join');
  assert.equal(jf.presence, undefined);
  ws.frame({ type: 'joined', room: 'lobby', seq: 0, epoch: 'E', id: jf.id });
  await jp;
  assert.equal(ws.lastSent('presence'), undefined);
});
