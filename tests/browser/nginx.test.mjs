// Browser test of the --dev chat page through the repo's nginx (issue 6): the
// real nginx runs nginx/nginx.conf unchanged except for the substitutions the
// deployment tests make (tests/deploy/harness.py, render_nginx_conf): the
// listen port, and an upstreams.conf with three loopback wsgate nodes.
//
// alice and bob open http://127.0.0.1:<nginx>/ in two browser contexts. nginx
// hashes on $remote_addr, and both come from 127.0.0.1, so both land on the
// same node: the test reads which one from the page, SIGKILLs it, and checks
// that both pages reconnect through nginx (its upstream fail-over picks
// another node), resume, and show every message exactly once.
//
// To have messages that the pages provably missed (the page does not let a
// user send while it is reconnecting), nginx is frozen (SIGSTOP) around the
// kill: the pages keep their sockets to nginx and cannot reconnect, the node
// dies, a back-end service publishes two messages through the HTTP API of a
// surviving node, then nginx continues (SIGCONT), passes the node's death on,
// and the pages' reconnects must replay those two messages.
//
// Everything listens on loopback, on free ports; every wait is bounded; nginx
// runs in its own process group, killed as a whole at the end.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { OUT, assertExactlyOnce, chatPageHelpers, startNginxCluster, stop } from './support.mjs';

const SECRET = 'browser-nginx-test-secret-0123456789abcdef';
const ROOM = 'lobby';
const T = 10000; // bound on every single wait

let cluster; // { nginx, nodes (id -> child), browser }

// ---------------------------------------------------------------- setup

before(async () => {
  cluster = await startNginxCluster({ chromium, secret: SECRET, name: 'nginx' });
});

after(() => cluster?.stop());

// ---------------------------------------------------------------- page helpers

const { openPage: openUrl, status, waitConnected, messages, waitMessages, send } = chatPageHelpers({ timeout: T });

function openPage(name) {
  // No `nodes=`: the page connects to ws://<its own host>/ws, i.e. nginx.
  return openUrl(cluster.browser, `http://127.0.0.1:${cluster.nginx.port}/?name=${name}&room=${ROOM}&autoconnect=1&backoff_base_ms=200&backoff_cap_ms=1000`);
}

/** Waits until the page is connected (to a node other than `notNode`) and can send; returns the node it shows. */
async function connectedNode(page, notNode = '') {
  await waitConnected(page, { notNode });
  const shown = await page.evaluate(() => ({
    node: document.querySelector('[data-testid=status]').dataset.node,
    info: document.getElementById('info-node').textContent.trim(),
    url: window.chat.client.url,
  }));
  assert.equal(shown.info, shown.node, 'the node panel and the status agree');
  assert.equal(shown.url, `ws://127.0.0.1:${cluster.nginx.port}/ws`, 'the page talks to nginx, not to a node');
  return shown.node;
}

async function publishHttp(node, token, text) {
  const res = await fetch(`${node.http}/api/rooms/${ROOM}/messages`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: JSON.stringify({ text }),
    signal: AbortSignal.timeout(T),
  });
  const body = await res.text();
  assert.equal(res.status, 200, `POST /api/rooms/${ROOM}/messages on ${node.opts.id}: ${res.status} ${body}`);
  return JSON.parse(body).seq;
}

// ---------------------------------------------------------------- the test

test('through the repo\'s nginx: the node under both pages is killed; nginx fails them over, they resume, every message once', { timeout: 60000 }, async () => {
  const alice = await openPage('alice');
  const bob = await openPage('bob');
  const first = await connectedNode(alice);
  assert.equal(await connectedNode(bob), first, 'nginx hashes the client address: both pages (127.0.0.1) are on one node');
  assert.ok(first in cluster.nodes, `a node of the cluster: ${first}`);

  const expected = [];
  const say = async (page, from, text) => {
    await send(page, text);
    expected.push({ from, text });
  };
  await say(alice, 'alice', `hello from alice (via nginx, on ${first})`);
  await say(bob, 'bob', 'hi alice, bob here');
  assertExactlyOnce(await waitMessages(alice, 2, 'alice'), expected, 'alice');
  assertExactlyOnce(await waitMessages(bob, 2, 'bob'), expected, 'bob');

  const survivors = Object.keys(cluster.nodes).filter((id) => id !== first);
  const service = cluster.nodes[survivors[0]];
  const tokenRes = await fetch(`${service.http}/dev/token?sub=backend`, { signal: AbortSignal.timeout(T) });
  assert.equal(tokenRes.status, 200);
  const { token } = await tokenRes.json();

  // Freeze nginx, kill the pages' node, publish while the pages cannot reconnect.
  cluster.nginx.signal('SIGSTOP');
  try {
    await stop(cluster.nodes[first], 'SIGKILL');
    for (const text of ['sent by the back-end while the pages were away', 'second one while away']) {
      await publishHttp(service, token, text);
      expected.push({ from: 'backend', text });
    }
    assert.equal((await messages(alice)).length, 2, 'alice has not seen the new messages yet');
    assert.equal((await messages(bob)).length, 2, 'bob has not seen the new messages yet');
  } finally {
    cluster.nginx.signal('SIGCONT');
  }

  // nginx passes the node's death on; the pages reconnect to nginx, which
  // fails over to another node; the page joins with `since` and resumes.
  const second = await connectedNode(alice, first);
  assert.equal(await connectedNode(bob, first), second, 'both pages fail over to the same node');
  assert.ok(survivors.includes(second), `failed over to a live node: ${second}`);
  for (const [who, page] of [['alice', alice], ['bob', bob]]) {
    await page.getByTestId('badge-resumed').waitFor({ timeout: T });
    const list = await waitMessages(page, 4, `${who} after resume`);
    assertExactlyOnce(list, expected, `${who} after resume`);
    assert.deepEqual(list.map((m) => m.replayed), [false, false, true, true], `${who}: the missed messages came as a replay`);
    const stats = await page.evaluate(() => window.chat.client.stats);
    assert.ok(stats.reconnects >= 1, `${who} reconnected`);
  }

  // live both ways again, on the new node
  await say(bob, 'bob', `back, now on ${second}`);
  await say(alice, 'alice', 'me too, nothing missed');
  for (const [who, page] of [['alice', alice], ['bob', bob]]) {
    assertExactlyOnce(await waitMessages(page, expected.length, `${who} final`), expected, who);
    await page.evaluate(() => window.chat.client.ping());
    assertExactlyOnce(await messages(page), expected, `${who} settled`);
    assert.equal((await status(page)).gaps, 0, `${who}: no gap`);
    assert.equal(await page.locator('[data-testid=notice][data-kind=gap]').count(), 0, `${who}: no gap notice`);
    assert.deepEqual(page.errors, [], `${who}: no page errors`);
  }

  // nginx did the fail-over: it tried the dead node and moved on.
  const dead = cluster.nodes[first].opts.port;
  const log = readFileSync(cluster.nginx.logPath, 'utf8');
  assert.match(log, new RegExp(`upstream: "http://127\\.0\\.0\\.1:${dead}/`), `nginx's log shows a failed attempt on the dead node ${first} (:${dead})`);
  assert.match(log, /"GET \/ws\S* HTTP\/1\.1" 101 /, 'nginx upgraded the pages\' WebSockets');
  // The access log (lines not starting with a date, which nginx's error log
  // lines do) never holds a token; nginx's error log prints the request line
  // as received, which deploy/README.md warns about.
  const access = log.split('\n').filter((l) => l && !/^\d{4}\/\d\d\/\d\d /.test(l));
  assert.ok(access.length > 0, 'nginx wrote access-log lines');
  for (const line of access) assert.doesNotMatch(line, /token=|eyJ/, 'no token in nginx\'s access log');

  mkdirSync(OUT, { recursive: true });
  await bob.screenshot({ path: path.join(OUT, 'nginx.png') });
  await alice.context().close();
  await bob.context().close();
});
