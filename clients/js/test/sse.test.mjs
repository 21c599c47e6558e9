import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SseParser, WsgateClient, sseUrl } from '../wsgate.js';
import { FakeClock, makeFakeWebSocket, makeFakeFetch, flush } from './fakes.mjs';

// ---------------------------------------------------------------- the event-stream parser

function parse(chunks, opts) {
  const events = [];
  const comments = [];
  const p = new SseParser({ onEvent: (d) => events.push(d), onComment: (c) => comments.push(c), ...opts });
  for (const c of chunks) p.push(c);
  return { events, comments };
}

test('SSE parser: one event per blank line, data lines joined with \\n, comments apart', () => {
  const { events, comments } = parse([': hb\n\ndata: {"type":"welcome"}\n\ndata:a\ndata: b\n\n:\n']);
  assert.deepEqual(events, ['{"type":"welcome"}', 'a\nb']);
  assert.deepEqual(comments, [' hb', '']);
});

test('SSE parser: \\n, \\r\\n and \\r line ends, split anywhere across chunks', () => {
  const text = 'data: 1\r\n\r\ndata: 2\r\rdata: 3\n\ndata: {"x":"\u00e9"}\r\n\r\n';
  const whole = parse([text]).events;
  assert.deepEqual(whole, ['1', '2', '3', '{"x":"\u00e9"}']);
  for (let cut = 1; cut < text.length; cut++) {
    assert.deepEqual(parse([text.slice(0, cut), text.slice(cut)]).events, whole, `cut at ${cut}`);
  }
  assert.deepEqual(parse([...text]).events, whole, 'one character at a time');
});

test('SSE parser: only `data` makes an event; other fields and an unfinished event are ignored', () => {
  const { events } = parse(['event: x\nid: 7\nretry: 10\n\ndata\n\ndata: tail-without-blank-line\n']);
  assert.deepEqual(events, ['']);
});

test('SSE parser: a line or event beyond maxBytes throws instead of growing', () => {
  assert.throws(() => parse(['data: ' + 'x'.repeat(100)], { maxBytes: 50 }), RangeError);
  assert.throws(() => parse(['data: xxxxxxxxxx\n'.repeat(10)], { maxBytes: 50 }), RangeError);
});

test('sseUrl: the /sse URL beside a /ws URL, http(s) for ws(s)', () => {
  assert.equal(sseUrl('ws://127.0.0.1:8080/ws?token=t'), 'http://127.0.0.1:8080/sse?token=t');
  assert.equal(sseUrl('wss://gw.example/chat/ws'), 'https://gw.example/chat/sse');
  assert.equal(sseUrl('wss://gw.example/sse'), 'https://gw.example/sse');
});

// ---------------------------------------------------------------- the client over SSE

function setup(options = {}) {
  const clock = new FakeClock();
  const { FakeWebSocket, sockets } = makeFakeWebSocket();
  const net = makeFakeFetch();
  const client = new WsgateClient({
    url: 'ws://127.0.0.1:1/ws',
    token: 'tok',
    WebSocket: FakeWebSocket,
    fetch: net.fetch,
    now: clock.now,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    random: () => 0.5,
    backoffBaseMs: 1000,
    backoffCapMs: 8000,
    ...options,
  });
  const events = [];
  for (const type of ['state', 'welcome', 'message', 'gap', 'close', 'fallback']) client.on(type, (ev) => events.push([type, ev]));
  const of = (type) => events.filter(([t]) => t === type).map(([, e]) => e);
  return { clock, sockets, net, client, of, stream: () => net.gets().at(-1) };
}

// Answer the latest GET /sse with a stream that starts with `welcome`.
async function openStream(s, welcome = {}) {
  await flush();
  const req = s.stream();
  req.respond(200);
  req.event({ type: 'welcome', conn: 'c-9', user: 'alice', node: 'n1', heartbeat_ms: 30000, transport: 'sse', ...welcome });
  await flush();
  return req;
}

test('auto: a WebSocket that cannot open falls back to SSE at once, same URL, token in ?token=', async () => {
  const s = setup();
  const p = s.client.connect();
  await flush();
  s.sockets[0].refuse();
  assert.deepEqual(s.of('fallback').map((f) => [f.from, f.to]), [['ws', 'sse']]);
  assert.equal(s.of('close').length, 0, 'the fallback is not a drop');
  await openStream(s);
  assert.equal(s.stream().url, 'http://127.0.0.1:1/sse?token=tok');
  const w = await p;
  assert.equal(w.conn, 'c-9');
  assert.equal(s.client.state, 'connected');
  assert.equal(s.client.transport, 'sse');
  assert.equal(s.of('welcome')[0].transport, 'sse');
  assert.equal(s.of('state').at(-1).transport, 'sse');
});

test('auto: a WebSocket upgrade that hangs falls back after connectTimeoutMs; one that opened does not', async () => {
  const s = setup({ connectTimeoutMs: 3000 });
  s.client.connect();
  await flush();
  s.clock.advance(3000);
  assert.equal(s.of('fallback').length, 1);
  assert.equal(s.sockets[0].closedWith.code, 4000);

  const t = setup();
  t.client.connect();
  await flush();
  t.sockets[0].readyState = 1;
  t.sockets[0].onopen({});
  t.sockets[0].serverClose(1013, 'overloaded');
  assert.equal(t.of('fallback').length, 0, 'an open WebSocket closed by the server is a drop, not a block');
  assert.equal(t.client.state, 'reconnecting');
  assert.equal(t.net.requests.length, 0);
});

test('frames go out as POST /sse/{conn}, in order, later ones batched as a JSON array; answers come on the stream', async () => {
  const s = setup({ transport: 'sse' });
  s.client.connect();
  const stream = await openStream(s);
  assert.equal(s.sockets.length, 0, 'transport sse never opens a WebSocket');
  const joins = ['a', 'b', 'c'].map((room) => s.client.join(room));
  await flush();
  const posts = s.net.posts();
  assert.equal(posts.length, 2);
  assert.equal(new URL(posts[0].url).pathname, '/sse/c-9');
  assert.equal(new URL(posts[0].url).searchParams.get('token'), 'tok');
  assert.equal(posts[0].body.room, 'a');
  assert.deepEqual(posts[1].body.map((f) => f.room), ['b', 'c']);
  for (const f of [posts[0].body, ...posts[1].body]) stream.event({ type: 'joined', room: f.room, seq: 0, epoch: 'E', id: f.id });
  await flush();
  assert.deepEqual((await Promise.all(joins)).map((j) => j.room), ['a', 'b', 'c']);
  const pub = s.client.publish('a', { text: 'hi' });
  await flush();
  const pf = s.net.posts().at(-1).body;
  assert.match(pf.key, /^[A-Za-z0-9_.:-]{1,64}$/);
  stream.event({ type: 'message', room: 'a', seq: 1, from: 'alice', data: { text: 'hi' }, ts: 1 });
  stream.event({ type: 'ack', id: pf.id, room: 'a', seq: 1 });
  assert.equal(await pub, 1);
  assert.deepEqual(s.of('message').map((m) => m.seq), [1]);
});

test('a close event ends the connection with its code; the reconnect tries the WebSocket again and resumes without duplicates', async () => {
  const s = setup();
  s.client.connect();
  await flush();
  s.sockets[0].refuse();
  let stream = await openStream(s);
  const jp = s.client.join('lobby');
  await flush();
  stream.event({ type: 'joined', room: 'lobby', seq: 4, epoch: 'E', id: s.net.posts().at(-1).body.id });
  stream.event({ type: 'message', room: 'lobby', seq: 5, from: 'bob', data: 1, ts: 1 });
  await jp;
  await flush();
  stream.event({ type: 'close', code: 1001, reason: 'shutting down' });
  await flush();
  const close = s.of('close').at(-1);
  assert.deepEqual([close.code, close.reason, close.transport], [1001, 'shutting down', 'sse']);
  assert.equal(s.client.state, 'reconnecting');
  assert.equal(s.client.transport, null);
  assert.ok(stream.aborted || s.net.gets().length === 1, 'the old stream is let go');

  s.clock.advance(s.of('state').at(-1).delayMs);
  await flush();
  assert.equal(s.sockets.length, 2, 'a later reconnect tries the WebSocket first');
  s.sockets[1].refuse();
  stream = await openStream(s, { node: 'n2' });
  assert.equal(s.client.node, 'n2');
  const rejoin = s.net.posts().at(-1).body;
  assert.deepEqual([rejoin.type, rejoin.room, rejoin.since, rejoin.epoch], ['join', 'lobby', 5, 'E']);
  stream.event({ type: 'joined', room: 'lobby', seq: 6, epoch: 'E', recovered: true, id: rejoin.id });
  stream.event({ type: 'message', room: 'lobby', seq: 5, from: 'bob', data: 1, ts: 1 });
  stream.event({ type: 'message', room: 'lobby', seq: 6, from: 'bob', data: 2, ts: 2 });
  await flush();
  assert.deepEqual(s.of('message').map((m) => m.seq), [5, 6], 'every seq once');
  assert.equal(s.of('gap').length, 0);
});

test('a stream that ends without a close event, or a POST answered 404, is a drop (1006)', async () => {
  const s = setup({ transport: 'sse' });
  s.client.connect();
  let stream = await openStream(s);
  stream.end();
  await flush();
  assert.equal(s.of('close').at(-1).code, 1006);
  assert.equal(s.client.state, 'reconnecting');

  s.clock.advance(s.of('state').at(-1).delayMs);
  stream = await openStream(s);
  assert.equal(s.client.state, 'connected');
  s.net.state.postStatus = 404;
  s.client.join('lobby');
  await flush();
  assert.equal(s.of('close').at(-1).code, 1006);
  assert.match(s.of('close').at(-1).reason, /404/);
  assert.equal(s.client.state, 'reconnecting');
  assert.ok(stream.aborted, 'the stream of the failed connection is closed');
});

test('a stream refused with an HTTP status is a failed attempt, then backoff', async () => {
  const s = setup({ transport: 'sse' });
  s.client.connect();
  await flush();
  s.stream().respond(503, 'text/plain');
  await flush();
  assert.equal(s.client.state, 'reconnecting');
  assert.match(s.of('close').at(-1).reason, /503/);
});

test('a stream refused 401 gets a new token from getToken before the next attempt', async () => {
  let tokens = 0;
  const s = setup({ transport: 'sse', token: undefined, getToken: async () => `tok${++tokens}` });
  s.client.connect();
  await flush();
  assert.equal(new URL(s.stream().url).searchParams.get('token'), 'tok1');
  s.stream().respond(401, 'application/json');
  await flush();
  assert.equal(s.of('close').at(-1).code, 4001);
  s.clock.advance(s.of('state').at(-1).delayMs);
  await flush();
  assert.equal(new URL(s.stream().url).searchParams.get('token'), 'tok2');
});

test('heartbeat comments keep an idle stream alive without pings', async () => {
  const s = setup({ transport: 'sse', heartbeatTimeoutMs: 5000 });
  s.client.connect();
  const stream = await openStream(s, { heartbeat_ms: 10000 });
  for (let i = 0; i < 5; i++) {
    s.clock.advance(9000);
    stream.push(':\n');
    await flush();
  }
  assert.equal(s.net.posts().length, 0, 'no ping was needed');
  assert.equal(s.client.state, 'connected');
  s.clock.advance(10000);
  assert.equal(s.net.posts().at(-1).body.type, 'ping', 'silence still gets a ping');
});

test('the transport option is checked', () => {
  assert.throws(() => new WsgateClient({ url: 'ws://h/ws', token: 't', transport: 'long-poll' }), TypeError);
});
