// Browser test of the --dev chat page (issue 6): two users on two nodes, a
// node killed under one page, which must reconnect to another node, resume,
// and show every message exactly once.
//
// Runs playwright-core against Debian's /usr/bin/chromium (never downloads a
// browser), a private redis-server and `$WSGATE_BIN serve --dev` nodes, all on
// loopback with free ports. Run it with tests/browser/run.sh.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import {
  OUT, REPO, assertExactlyOnce, chatPageHelpers, freePorts, launchChromium, mintToken, startNode, startRedis, stop, waitFor,
} from './support.mjs';

const BIN = process.env.WSGATE_BIN || path.join(REPO, 'target', 'release', 'wsgate');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SECRET = 'browser-test-secret-0123456789abcdef';
const T = 20000; // bound on every single wait

let browser;
let redis;
const nodes = {};
let ports;

before(async () => {
  assert.ok(existsSync(BIN), `WSGATE_BIN not found: ${BIN}`);
  assert.ok(existsSync(CHROMIUM), `chromium not found: ${CHROMIUM}`);
  // n1..n3 public + ops ports. n3 is started only after n2 is killed, so that
  // bob's page has to back off with every node of its list down first.
  ports = await freePorts(6);
  redis = await startRedis();
  for (const i of [1, 2]) nodes[`n${i}`] = await startNode(BIN, nodeOpts(i));
  browser = await launchChromium(chromium, CHROMIUM);
});

after(async () => {
  await browser?.close().catch(() => {});
  for (const n of Object.values(nodes)) await stop(n);
  await stop(redis);
});

function nodeOpts(i) {
  return {
    id: `n${i}`,
    port: ports[(i - 1) * 2],
    opsPort: ports[(i - 1) * 2 + 1],
    secret: SECRET,
    redisUrl: redis.url,
    origins: [1, 2, 3].map((k) => `http://127.0.0.1:${ports[(k - 1) * 2]}`),
  };
}

const wsUrl = (i) => `ws://127.0.0.1:${ports[(i - 1) * 2]}/ws`;
const httpUrl = (i) => `http://127.0.0.1:${ports[(i - 1) * 2]}`;

const { openPage: openUrl, status, waitConnected, messages, waitMessages, send } = chatPageHelpers({ timeout: T });

function openPage(name, { servedBy, nodeList, extra = '' }) {
  const nodesParam = nodeList.map(wsUrl).join(',');
  return openUrl(browser, `${httpUrl(servedBy)}/?name=${name}&room=lobby&autoconnect=1&nodes=${encodeURIComponent(nodesParam)}${extra}`);
}

test('two users on two nodes; bob\'s node is killed; his page fails over, resumes, shows every message once', { timeout: 150000 }, async () => {
  // alice talks to n1 only; bob's page comes from n2 and lists n2 then n3.
  const alice = await openPage('alice', { servedBy: 1, nodeList: [1] });
  const bob = await openPage('bob', { servedBy: 2, nodeList: [2, 3], extra: '&backoff_base_ms=200&backoff_cap_ms=1500' });
  await waitConnected(alice, { node: 'n1' });
  await waitConnected(bob, { node: 'n2' });
  // Presence (issue 11): each page lists both users, across nodes, live.
  await waitOnline(alice, ['alice', 'bob'], 'alice sees bob join');
  await waitOnline(bob, ['alice', 'bob'], 'bob sees alice');

  const expected = [];
  const say = async (page, from, text) => {
    await send(page, text);
    expected.push({ from, text });
  };

  // both ways, across nodes (through the Redis relay)
  await say(alice, 'alice', 'hello from alice on n1');
  await say(bob, 'bob', 'hi alice, bob here on n2');
  assertExactlyOnce(await waitMessages(alice, 2, 'alice'), expected, 'alice');
  assertExactlyOnce(await waitMessages(bob, 2, 'bob'), expected, 'bob');

  // kill bob's node: n2 is gone, n3 not started yet, so bob's page must back off
  await stop(nodes.n2, 'SIGKILL');
  await bob.waitForFunction(
    () => /reconnecting in \d+(\.\d)? s/.test(document.querySelector('[data-testid=status]').textContent),
    null,
    { timeout: T },
  );

  // alice talks while bob is disconnected
  await say(alice, 'alice', 'are you there, bob? (sent while you were away)');
  await say(alice, 'alice', 'second message while bob is away');
  assert.notEqual((await status(bob)).state, 'connected', 'bob is still disconnected while alice talks');
  assert.equal((await messages(bob)).length, 2, 'bob has not seen the new messages yet');

  // another node comes up; bob's page must find it, resume, and replay what it missed
  nodes.n3 = await startNode(BIN, nodeOpts(3));
  await waitConnected(bob, { node: 'n3' });
  await bob.getByTestId('badge-resumed').waitFor({ timeout: T });
  const afterResume = await waitMessages(bob, 4, 'bob after resume');
  assertExactlyOnce(afterResume, expected, 'bob after resume');
  assert.deepEqual(afterResume.map((m) => m.replayed), [false, false, true, true], 'the missed messages came as a replay');

  // live traffic both ways again, bob now on n3
  await say(alice, 'alice', 'welcome back, bob');
  await say(bob, 'bob', 'thanks, resumed on n3 without a gap');
  assertExactlyOnce(await waitMessages(alice, expected.length, 'alice final'), expected, 'alice');
  assertExactlyOnce(await waitMessages(bob, expected.length, 'bob final'), expected, 'bob');

  // nothing was lost, so no gap was reported; the client dropped any duplicate
  for (const [who, page] of [['alice', alice], ['bob', bob]]) {
    assert.equal((await status(page)).gaps, 0, `${who}: no gap`);
    assert.equal(await page.locator('[data-testid=notice][data-kind=gap]').count(), 0, `${who}: no gap notice`);
    assert.deepEqual(page.errors, [], `${who}: no page errors`);
  }
  const bobStats = await bob.evaluate(() => window.chat.client.stats);
  assert.ok(bobStats.reconnects >= 1, 'bob reconnected');

  // a settled page: nothing new arrives, nothing is shown twice
  const settled = await messages(bob);
  await bob.evaluate(() => window.chat.client.ping());
  assert.deepEqual(await messages(bob), settled);

  mkdirSync(OUT, { recursive: true });
  await bob.screenshot({ path: path.join(OUT, 'chat.png') });
  await alice.screenshot({ path: path.join(OUT, 'chat-alice.png') });
  if (process.env.WSGATE_UPDATE_SCREENSHOT === '1') {
    mkdirSync(path.join(REPO, 'docs', 'img'), { recursive: true });
    copyFileSync(path.join(OUT, 'chat.png'), path.join(REPO, 'docs', 'img', 'chat.png'));
  }
  // bob is online again through n3; when his page closes, alice's list
  // drops him (a closed connection leaves presence at once).
  await waitOnline(alice, ['alice', 'bob'], 'alice sees bob after his resume');
  await bob.context().close();
  await waitOnline(alice, ['alice'], 'alice sees bob leave');
  await alice.context().close();
});

// Wait until the page's Online panel lists exactly `users` (sorted), with
// its count.
async function waitOnline(page, users, what) {
  try {
    await page.waitForFunction(
      (want) => {
        const list = [...document.querySelectorAll('[data-testid=online] li')].map((li) => li.textContent);
        const count = document.querySelector('[data-testid=online-count]').textContent;
        return JSON.stringify(list) === JSON.stringify(want) && count === String(want.length);
      },
      users,
      { timeout: T },
    );
  } catch (e) {
    const list = await page.evaluate(() => [...document.querySelectorAll('[data-testid=online] li')].map((li) => li.textContent));
    throw new Error(`${what}: online list ${JSON.stringify(list)}, want ${JSON.stringify(users)} (${e.message})`);
  }
}

test('without /dev/token (404) the page asks for a token and works with a pasted one', { timeout: 60000 }, async () => {
  const ctx = await browser.newContext({ viewport: { width: 1000, height: 600 } });
  const page = await ctx.newPage();
  await page.route('**/dev/token**', (route) => route.fulfill({ status: 404, body: 'not found' }));
  await page.goto(`${httpUrl(1)}/?name=carol&room=lobby&autoconnect=1&nodes=${encodeURIComponent(wsUrl(1))}`, { timeout: T });
  await page.getByTestId('token-input').waitFor({ state: 'visible', timeout: T });
  assert.equal((await status(page)).state, 'idle');
  const token = await mintToken(BIN, ['--jwt-secret', SECRET, '--sub', 'carol', '--rooms', '*', '--publish', '*', '--ttl', '1h']);
  await page.getByTestId('token-input').fill(token);
  await page.getByTestId('connect').click({ timeout: T });
  await waitConnected(page, { node: 'n1' });
  await send(page, 'carol with a pasted token');
  const list = await messages(page);
  assert.equal(list.at(-1).from, 'carol');
  await ctx.close();
});

test('a node that comes back with its history lost: the page reports the gap, never hides it', { timeout: 60000 }, async () => {
  // One node with the in-process broker: killing it loses the room's history,
  // so the restarted node has a new epoch and the resume cannot be recovered.
  const [port, opsPort] = await freePorts(2);
  const opts = { id: 'solo', port, opsPort, secret: SECRET, origins: [`http://127.0.0.1:${port}`] };
  nodes.solo = await startNode(BIN, opts);
  const ctx = await browser.newContext({ viewport: { width: 1000, height: 600 } });
  const page = await ctx.newPage();
  await page.goto(`http://127.0.0.1:${port}/?name=frank&room=history&autoconnect=1&backoff_base_ms=100&backoff_cap_ms=500`, { timeout: T });
  await waitConnected(page, { node: 'solo' });
  await send(page, 'before the restart 1');
  await send(page, 'before the restart 2');
  await stop(nodes.solo, 'SIGKILL');
  nodes.solo = await startNode(BIN, opts);
  await waitConnected(page, { node: 'solo' });
  await page.locator('[data-testid=notice][data-kind=gap]').waitFor({ timeout: T });
  const st = await status(page);
  assert.ok(st.gaps >= 1, `status shows the gap: ${JSON.stringify(st)}`);
  await page.getByTestId('badge-gap').waitFor({ timeout: T });
  const gapEvent = await page.locator('[data-testid=event][data-kind=gap]').first().textContent();
  assert.match(gapEvent, /history was reset|could not resume/);
  await send(page, 'after the restart');
  const list = await messages(page);
  assert.deepEqual(list.map((m) => m.text), ['before the restart 1', 'before the restart 2', 'after the restart']);
  await ctx.close();
  await stop(nodes.solo);
});

test('the page and the client are served by the node in --dev mode', { timeout: 30000 }, async () => {
  await waitFor(async () => {
    const res = await fetch(`${httpUrl(1)}/wsgate.js`, { signal: AbortSignal.timeout(3000) });
    const body = await res.text();
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /javascript/);
    assert.match(body, /export class WsgateClient/);
    return true;
  }, { timeoutMs: 5000, what: '/wsgate.js' });
  const res = await fetch(`${httpUrl(1)}/dev/token?sub=dave`, { signal: AbortSignal.timeout(3000) });
  assert.equal(res.status, 200);
  const { token } = await res.json();
  assert.equal(token.split('.').length, 3);
});

test('a refused WebSocket: the page says why (403 origin, 401 token) instead of looping on 1006', { timeout: 60000 }, async () => {
  // A node that does not allow the origin of the page (served by n1).
  const [port, opsPort] = await freePorts(2);
  nodes.strict = await startNode(BIN, { id: 'strict', port, opsPort, secret: SECRET, origins: ['https://app.example'] });
  const strictWs = encodeURIComponent(`ws://127.0.0.1:${port}/ws`);
  const reason = async (page) => {
    await page.waitForFunction(() => document.querySelector('[data-testid=status]').textContent.includes('cannot connect'), null, { timeout: T });
    return status(page);
  };

  const refusedOrigin = await openUrl(browser, `${httpUrl(1)}/?name=gina&room=lobby&autoconnect=1&nodes=${strictWs}`);
  const st = await reason(refusedOrigin);
  assert.equal(st.state, 'closed');
  assert.match(st.text, /HTTP 403/);
  assert.ok(st.text.includes(`origin ${httpUrl(1)}`), st.text);
  assert.match(st.text, /--allowed-origins/);
  await refusedOrigin.context().close();

  const badToken = await openUrl(browser, `${httpUrl(1)}/?name=hal&room=lobby&autoconnect=1&token=not-a-jwt&nodes=${encodeURIComponent(wsUrl(1))}`);
  const st2 = await reason(badToken);
  assert.equal(st2.state, 'closed');
  assert.match(st2.text, /HTTP 401/);
  assert.match(st2.text, /malformed token/);
  await badToken.context().close();
  await stop(nodes.strict);
});
