// clients/js against real wsgate nodes and a private redis-server, in Node:
// a publish whose ack is lost in a dropped connection is sent again with the
// same idempotency key after the reconnect, and the room holds it once; over
// the WebSocket and over the SSE transport.
//
// Needs a WebSocket in Node: built in from Node 22, behind
// --experimental-websocket on Node 20 (run.sh passes it).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { WsgateClient } from '../../clients/js/wsgate.js';
import { REPO, freePorts, mintToken, startNode, startRedis, stop, waitFor } from './support.mjs';

const BIN = process.env.WSGATE_BIN || path.join(REPO, 'target', 'release', 'wsgate');
const SECRET = 'publish-test-secret-0123456789abcdef';
const API_KEY = 'publish-test-api-key';
const T = 20000; // bound on every single wait

let redis;
const nodes = [];
const clients = [];

/**
 * A TCP forwarder on a free loopback port. `hold()` keeps the target's bytes
 * from the client (the client's bytes still go through); `cut()` destroys
 * every forwarded connection and accepts no new one.
 */
async function holdingProxy(targetPort) {
  const conns = new Set();
  let held = false;
  const server = net.createServer((client) => {
    const upstream = net.connect(targetPort, '127.0.0.1');
    const c = { client, upstream };
    conns.add(c);
    const end = () => {
      client.destroy();
      upstream.destroy();
      conns.delete(c);
    };
    client.on('data', (d) => upstream.write(d));
    upstream.on('data', (d) => {
      if (!held) client.write(d);
    });
    for (const s of [client, upstream]) {
      s.on('error', end);
      s.on('close', end);
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: server.address().port,
    hold() {
      held = true;
    },
    cut() {
      server.close();
      for (const c of [...conns]) {
        c.client.destroy();
        c.upstream.destroy();
      }
    },
  };
}

before(async () => {
  assert.ok(existsSync(BIN), `WSGATE_BIN not found: ${BIN}`);
  const ports = await freePorts(4);
  redis = await startRedis();
  for (const i of [0, 1]) {
    nodes.push(await startNode(BIN, {
      id: `p${i + 1}`,
      port: ports[i * 2],
      opsPort: ports[i * 2 + 1],
      secret: SECRET,
      redisUrl: redis.url,
      origins: ['http://127.0.0.1'],
      extraArgs: ['--api-key', API_KEY],
    }));
  }
});

after(async () => {
  for (const c of clients) c.close();
  for (const n of nodes) await stop(n);
  await stop(redis);
});

async function client(sub, urls, transport = 'ws') {
  const token = await mintToken(BIN, ['--jwt-secret', SECRET, '--sub', sub, '--rooms', '*', '--publish', '*', '--ttl', '1h']);
  const c = new WsgateClient({ urls, token, transport, backoffBaseMs: 50, backoffCapMs: 200 });
  clients.push(c);
  const got = [];
  c.on('message', (m) => got.push([m.seq, m.data]));
  await c.connect();
  return { c, got };
}

async function metric(node, name) {
  const res = await fetch(`http://127.0.0.1:${node.opts.opsPort}/metrics`, { signal: AbortSignal.timeout(T) });
  const line = (await res.text()).split('\n').find((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `));
  return line === undefined ? 0 : Number(line.trim().split(/\s+/).pop());
}

async function history(node, room) {
  const res = await fetch(`${node.http}/api/rooms/${room}/history`, {
    headers: { authorization: `apikey ${API_KEY}` },
    signal: AbortSignal.timeout(T),
  });
  assert.equal(res.status, 200);
  return (await res.json()).messages.map((m) => [m.seq, m.data]);
}

/**
 * A publisher (over `transport`) whose ack node a's proxy holds back, then
 * cuts: it reconnects to node b, re-joins `room` and sends the publish again
 * with its key, gets the first seq, and the room holds the message once.
 */
async function ackLostThenRetried(transport, room) {
  const [a, b] = nodes;
  const member = await client('member', [b.ws]);
  await member.c.join(room);

  // The publisher reaches node a through the proxy, node b directly (its
  // next URL after a drop), and is in the room too.
  const proxy = await holdingProxy(a.opts.port);
  const pub = await client('pub', [`ws://127.0.0.1:${proxy.port}/ws`, b.ws], transport);
  assert.equal(pub.c.transport, transport);
  await pub.c.join(room);
  const duplicatesBefore = await metric(b, 'wsgate_publish_duplicates_total');

  // Node a's answers stop reaching the publisher: the publish gets through,
  // its ack does not.
  proxy.hold();
  let settled = false;
  const publishing = pub.c.publish(room, 'once').finally(() => (settled = true));
  await waitFor(() => member.got.length === 1, { timeoutMs: T, what: 'the member gets seq 1' });
  assert.deepEqual(member.got, [[1, 'once']]);
  assert.equal(settled, false, 'the ack was held back');

  // The connection drops; the client reconnects to node b, re-joins, and
  // sends the publish again with its key: the first seq, nothing published.
  proxy.cut();
  assert.equal(await publishing, 1);
  assert.equal(pub.c.node, 'p2');
  assert.equal(pub.c.transport, transport);
  assert.equal(await metric(b, 'wsgate_publish_duplicates_total'), duplicatesBefore + 1);

  // The next message is seq 2: nothing was published in between.
  assert.equal(await pub.c.publish(room, 'next'), 2);
  await waitFor(() => member.got.length === 2 && pub.got.length === 2, { timeoutMs: T, what: 'seq 2 everywhere' });
  assert.deepEqual(member.got, [[1, 'once'], [2, 'next']]);
  // The publisher saw seq 1 once, from its resume's replay.
  assert.deepEqual(pub.got, [[1, 'once'], [2, 'next']]);
  assert.deepEqual(await history(b, room), [[1, 'once'], [2, 'next']]);
}

test('a publish whose ack a drop swallowed is retried with its key on another node and stored once', { timeout: 60000 }, async () => {
  assert.equal(typeof WebSocket, 'function', 'Node needs a WebSocket (Node 22, or --experimental-websocket on Node 20)');
  await ackLostThenRetried('ws', 'r');
});

test('the same over the SSE transport (GET /sse read with fetch, POST /sse/{conn})', { timeout: 60000 }, async () => {
  await ackLostThenRetried('sse', 'r-sse');
});
