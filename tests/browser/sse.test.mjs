// Browser test of the SSE fallback (issue 12): headless Chromium loads the
// --dev chat page through the repo's nginx config, derived (as a proxy that
// blocks WebSockets would behave) so that `location = /ws` answers 403 to
// every upgrade. The page's client (transport `auto`) must fall back to
// Server-Sent Events + POST by itself, say so, chat with bob (a page that
// talks WebSocket straight to another node), and survive the SIGKILL of its
// node: reconnect through nginx (which fails over to a live node), fall back
// again, resume, and show every message exactly once.
//
// As in nginx.test.mjs, nginx is frozen (SIGSTOP) around the kill so that
// messages are provably sent while alice is away; bob sends them, from his
// own node, which the kill does not touch.
//
// Everything listens on loopback, on free ports; every wait is bounded; nginx
// runs in its own process group, killed as a whole at the end.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { OUT, assertExactlyOnce, chatPageHelpers, startNginxCluster, stop } from './support.mjs';

const SECRET = 'browser-sse-test-secret-0123456789abcdef';
const ROOM = 'lobby';
const T = 10000; // bound on every single wait

let cluster; // { nginx, nodes (id -> child), browser }

/** The repo's config, with every WebSocket upgrade on /ws refused (403). */
function blockWebSockets(conf) {
  let n = 0;
  const text = conf.replace(/^([ \t]*)location = \/ws \{\n/m, (line, indent) => {
    n += 1;
    return `${line}${indent}    return 403; # test: a proxy that blocks WebSockets\n`;
  });
  assert.equal(n, 1, 'nginx.conf has one `location = /ws {` block');
  assert.match(text, /location (= )?\/sse \{/, 'nginx.conf proxies /sse');
  return text;
}

before(async () => {
  cluster = await startNginxCluster({ chromium, secret: SECRET, name: 'sse', transform: blockWebSockets, directPages: true });
});

after(() => cluster?.stop());

const { openPage: openUrl, status, waitConnected, messages, waitMessages, send } = chatPageHelpers({ timeout: T });

function openPage(base, name, extra = '') {
  return openUrl(cluster.browser, `${base}/?name=${name}&room=${ROOM}&autoconnect=1&backoff_base_ms=200&backoff_cap_ms=1000${extra}`);
}

/** What the page shows about its transport, and what its client says. */
function transportOf(page) {
  return page.evaluate(() => ({
    status: document.querySelector('[data-testid=status]').dataset.transport,
    panel: document.querySelector('[data-testid=transport]').textContent.trim(),
    client: window.chat.client.transport,
    url: window.chat.client.url,
    fallbacks: document.querySelectorAll('[data-testid=event][data-kind=fallback]').length,
  }));
}

test('WebSockets blocked by the proxy: the page falls back to SSE, chats with a WebSocket user, survives the SIGKILL of its node', { timeout: 60000 }, async () => {
  const viaNginx = `http://127.0.0.1:${cluster.nginx.port}`;
  const alice = await openPage(viaNginx, 'alice');
  const first = await waitConnected(alice);
  assert.ok(first in cluster.nodes, `a node of the cluster: ${first}`);
  const shown = await transportOf(alice);
  assert.equal(shown.client, 'sse', 'the client fell back to SSE');
  assert.equal(shown.status, 'sse');
  assert.match(shown.panel, /SSE/, 'the page says which transport it uses');
  assert.ok(shown.fallbacks >= 1, 'the page logged the fallback');
  assert.equal(shown.url, `ws://127.0.0.1:${cluster.nginx.port}/ws`, 'alice talks to nginx, not to a node');

  // bob: straight to another node, WebSocket only.
  const bobNode = Object.keys(cluster.nodes).find((id) => id !== first);
  const bob = await openPage(cluster.nodes[bobNode].http, 'bob', '&transport=ws');
  assert.equal(await waitConnected(bob), bobNode);
  assert.equal((await transportOf(bob)).client, 'ws');

  const expected = [];
  const say = async (page, from, text) => {
    await send(page, text);
    expected.push({ from, text });
  };
  await say(alice, 'alice', `hello from alice (SSE through nginx, on ${first})`);
  await say(bob, 'bob', `hi alice, bob here (WebSocket, on ${bobNode})`);
  assertExactlyOnce(await waitMessages(alice, 2, 'alice'), expected, 'alice');
  assertExactlyOnce(await waitMessages(bob, 2, 'bob'), expected, 'bob');

  // Freeze nginx, kill alice's node, bob talks while alice cannot reconnect.
  cluster.nginx.signal('SIGSTOP');
  try {
    await stop(cluster.nodes[first], 'SIGKILL');
    for (const text of ['said while alice was away', 'and a second one']) await say(bob, 'bob', text);
    assert.equal((await messages(alice)).length, 2, 'alice has not seen them yet');
  } finally {
    cluster.nginx.signal('SIGCONT');
  }

  // nginx passes the death on; alice reconnects through it (the WebSocket
  // is refused again, SSE again), lands on a live node and resumes.
  const second = await waitConnected(alice, { notNode: first });
  assert.notEqual(second, first);
  const after = await transportOf(alice);
  assert.equal(after.client, 'sse', 'still SSE after the reconnect');
  assert.ok(after.fallbacks >= 2, 'the reconnect tried the WebSocket first again');
  await alice.getByTestId('badge-resumed').waitFor({ timeout: T });
  const list = await waitMessages(alice, 4, 'alice after resume');
  assertExactlyOnce(list, expected, 'alice after resume');
  assert.deepEqual(list.map((m) => m.replayed), [false, false, true, true], 'the missed messages came as a replay');
  assert.ok((await alice.evaluate(() => window.chat.client.stats)).reconnects >= 1);

  // Live both ways again.
  await say(alice, 'alice', `back, now on ${second}, nothing missed`);
  await say(bob, 'bob', 'welcome back');
  for (const [who, page] of [['alice', alice], ['bob', bob]]) {
    assertExactlyOnce(await waitMessages(page, expected.length, `${who} final`), expected, who);
    await page.evaluate(() => window.chat.client.ping());
    assertExactlyOnce(await messages(page), expected, `${who} settled`);
    assert.equal((await status(page)).gaps, 0, `${who}: no gap`);
    assert.deepEqual(page.errors, [], `${who}: no page errors`);
  }

  // nginx refused the upgrades and carried the stream and the POSTs.
  const log = readFileSync(cluster.nginx.logPath, 'utf8');
  assert.match(log, /"GET \/ws HTTP\/1\.1" 403 /, 'nginx refused the WebSocket upgrade');
  assert.match(log, /"GET \/sse HTTP\/1\.1" 200 /, 'nginx carried the event stream');
  assert.match(log, /"POST \/sse\/\S+ HTTP\/1\.1" 202 /, 'nginx carried the POSTs');
  const access = log.split('\n').filter((l) => l && !/^\d{4}\/\d\d\/\d\d /.test(l));
  for (const line of access) assert.doesNotMatch(line, /token=|eyJ/, 'no token in nginx\'s access log');

  mkdirSync(OUT, { recursive: true });
  await alice.screenshot({ path: path.join(OUT, 'sse.png') });
  await alice.context().close();
  await bob.context().close();
});

test('a page on another allowed origin, forced to SSE with ?transport=sse, chats across origins (CORS)', { timeout: 30000 }, async () => {
  const live = Object.keys(cluster.nodes).filter((id) => cluster.nodes[id].exitCode === null && cluster.nodes[id].signalCode === null);
  assert.ok(live.length >= 2, `two live nodes: ${live}`);
  const [pageNode, gatewayNode] = live.map((id) => cluster.nodes[id]);
  // Served by one node, talking to another: a cross-origin stream and POSTs.
  const carol = await openPage(pageNode.http, 'carol', `&transport=sse&nodes=${encodeURIComponent(gatewayNode.ws)}`);
  assert.equal(await waitConnected(carol), gatewayNode.opts.id);
  const shown = await transportOf(carol);
  assert.equal(shown.client, 'sse');
  assert.equal(shown.fallbacks, 0, 'forced, not a fallback');
  const text = 'carol, cross-origin over SSE';
  await send(carol, text);
  const mine = (await messages(carol)).filter((m) => m.text === text);
  assert.equal(mine.length, 1);
  assert.deepEqual(carol.errors, [], 'no page errors (no CORS failure)');
  await carol.context().close();
});
