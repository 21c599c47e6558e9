// Helpers for the browser tests: free ports, a private redis-server, wsgate
// nodes, the repo's nginx config under the real nginx, polling with
// deadlines, chromium and the chat page's DOM. Every wait
// is bounded; nothing sleeps as synchronization; everything listens on
// loopback only.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import {
  chmodSync, closeSync, createWriteStream, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync,
} from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(HERE, '..', '..');
export const OUT = path.join(REPO, 'tests', 'output', 'browser');
/** The gateway under test, and Debian's chromium (never a downloaded browser). */
export const WSGATE_BIN = process.env.WSGATE_BIN || path.join(REPO, 'target', 'release', 'wsgate');
export const CHROMIUM_PATH = process.env.CHROMIUM || '/usr/bin/chromium';
mkdirSync(OUT, { recursive: true });

const children = new Set();
process.on('exit', () => {
  for (const c of children) {
    try {
      c.kill('SIGKILL');
    } catch {
      /* gone */
    }
  }
});

/** A port that was free on 127.0.0.1 a moment ago. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Distinct free ports. */
export async function freePorts(n) {
  const set = new Set();
  for (let i = 0; set.size < n && i < n * 20; i++) set.add(await freePort());
  if (set.size < n) throw new Error('could not find free ports');
  return [...set];
}

/** Poll `fn` until it returns a truthy value; throw after `timeoutMs`. */
export async function waitFor(fn, { timeoutMs = 15000, intervalMs = 50, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  let lastErr;
  while (Date.now() < deadline) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) {
      lastErr = e;
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${lastErr ? ` (last error: ${lastErr.message})` : ''}`);
}

function spawnLogged(name, cmd, args) {
  const logPath = path.join(OUT, `${name}.log`);
  const log = createWriteStream(logPath);
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout.pipe(log, { end: false });
  child.stderr.pipe(log, { end: false });
  children.add(child);
  child.exited = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      children.delete(child);
      resolve({ code, signal });
    });
  });
  child.on('error', (e) => log.write(`spawn error: ${e.message}\n`));
  child.logPath = logPath;
  child.name = name;
  return child;
}

function tail(file, n = 20) {
  try {
    return readFileSync(file, 'utf8').trim().split('\n').slice(-n).join('\n');
  } catch {
    return '';
  }
}

/** Stop a child (SIGKILL by default) and wait, bounded, for it to exit. */
export async function stop(child, signal = 'SIGKILL', timeoutMs = 10000) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  child.kill(signal);
  if ((await within(child.exited, timeoutMs)) === TIMEOUT) {
    child.kill('SIGKILL');
    await within(child.exited, 2000);
  }
}

const TIMEOUT = Symbol('timeout');

/** `promise`, or TIMEOUT after `ms`; the timer never outlives the race. */
async function within(promise, ms) {
  let timer;
  const t = new Promise((r) => {
    timer = setTimeout(r, ms, TIMEOUT);
  });
  try {
    return await Promise.race([promise, t]);
  } finally {
    clearTimeout(timer);
  }
}

function redisPing(port) {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    let buf = '';
    const done = (v) => {
      s.destroy();
      resolve(v);
    };
    s.setTimeout(1000, () => done(false));
    s.on('error', () => done(false));
    s.on('connect', () => s.write('PING\r\n'));
    s.on('data', (d) => {
      buf += d;
      if (buf.includes('\r\n')) done(buf.startsWith('+PONG'));
    });
  });
}

/** A private redis-server on a free port (never the system one). */
export async function startRedis() {
  const port = await freePort();
  const child = spawnLogged(`redis-${port}`, 'redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no']);
  await waitFor(async () => {
    if (child.exitCode !== null) throw new Error(`redis-server exited: ${tail(child.logPath)}`);
    return redisPing(port);
  }, { timeoutMs: 10000, what: `redis-server on ${port}` });
  child.port = port;
  child.url = `redis://127.0.0.1:${port}/`;
  return child;
}

async function httpStatus(url) {
  const res = await fetch(url, { signal: AbortSignal.timeout(2000) });
  await res.arrayBuffer();
  return res.status;
}

/**
 * Start `$WSGATE_BIN serve --dev` on the given ports (every frame compressed
 * for clients that negotiate permessage-deflate); resolves once /ready is 200.
 * `opts`: { id, port, opsPort, secret, redisUrl, origins, extraArgs }
 */
export async function startNode(bin, opts) {
  const args = [
    'serve',
    '--dev',
    '--listen', `127.0.0.1:${opts.port}`,
    '--ops-listen', `127.0.0.1:${opts.opsPort}`,
    '--node-id', opts.id,
    '--jwt-secret', opts.secret,
    '--allowed-origins', opts.origins.join(','),
    // Chromium offers permessage-deflate: compress every server frame, so
    // that the page reads compressed frames throughout (PROTOCOL.md 12).
    '--compression-min-bytes', '0',
    ...(opts.redisUrl ? ['--redis-url', opts.redisUrl] : []),
    ...(opts.extraArgs ?? []),
  ];
  const child = spawnLogged(`node-${opts.id}`, bin, args);
  await waitFor(async () => {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`wsgate ${opts.id} exited early: ${tail(child.logPath)}`);
    }
    return (await httpStatus(`http://127.0.0.1:${opts.opsPort}/ready`)) === 200;
  }, { timeoutMs: 20000, what: `wsgate ${opts.id} /ready on 127.0.0.1:${opts.opsPort}` }).catch((e) => {
    stop(child);
    throw e;
  });
  child.opts = opts;
  child.http = `http://127.0.0.1:${opts.port}`;
  child.ws = `ws://127.0.0.1:${opts.port}/ws`;
  return child;
}

/** `wsgate token ...` (stdout, trimmed). */
export function mintToken(bin, args) {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, ['token', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    const timer = setTimeout(() => child.kill('SIGKILL'), 10000);
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    child.on('exit', (code) => {
      clearTimeout(timer);
      if (code === 0 && out.trim()) resolve(out.trim());
      else reject(new Error(`wsgate token failed (${code}): ${err.trim()}`));
    });
  });
}

// ---------------------------------------------------------------- chromium and the chat page

/** Debian's chromium (never a downloaded browser), headless. */
export function launchChromium(chromium, executablePath) {
  return chromium.launch({
    executablePath,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
      '--disable-dev-shm-usage',
    ],
    timeout: 30000,
  });
}

/**
 * The chat page's helpers, every wait bounded by `timeout` ms:
 * openPage(browser, url) opens `url` in a new context and collects the page's
 * errors in `page.errors` (failed WebSocket connects and resource loads, which
 * fail-over provokes, excepted).
 */
export function chatPageHelpers({ timeout }) {
  const T = timeout;

  async function openPage(browser, url) {
    const ctx = await browser.newContext({ viewport: { width: 1100, height: 680 }, deviceScaleFactor: 1 });
    const page = await ctx.newPage();
    page.errors = [];
    page.on('pageerror', (e) => page.errors.push(String(e)));
    page.on('console', (m) => {
      if (m.type() === 'error' && !/WebSocket connection to .* failed|ERR_CONNECTION_REFUSED|Failed to load resource/.test(m.text())) {
        page.errors.push(`console: ${m.text()}`);
      }
    });
    await page.goto(url, { timeout: T });
    return page;
  }

  async function status(page) {
    return page.$eval('[data-testid=status]', (el) => ({
      state: el.dataset.state,
      node: el.dataset.node,
      gaps: Number(el.dataset.gaps || 0),
      text: el.textContent.trim(),
    }));
  }

  /**
   * Waits until the page is connected and can send: to node `node` if given,
   * else to any node other than `notNode`. Returns the node the status shows.
   */
  async function waitConnected(page, { node = '', notNode = '' } = {}) {
    await page.waitForFunction(
      ({ node, notNode }) => {
        const st = document.querySelector('[data-testid=status]');
        const shown = st.dataset.node;
        return st.dataset.state === 'connected' && shown && (node ? shown === node : shown !== notNode) && !document.querySelector('[data-testid=send]').disabled;
      },
      { node, notNode },
      { timeout: T },
    );
    return page.$eval('[data-testid=status]', (el) => el.dataset.node);
  }

  async function messages(page) {
    return page.$$eval('[data-testid=message]', (els) =>
      els.map((e) => ({
        seq: Number(e.dataset.seq),
        from: e.dataset.from,
        text: e.querySelector('[data-testid=message-text]').textContent,
        replayed: e.dataset.replayed === 'true',
      })),
    );
  }

  async function waitMessages(page, n, what) {
    await page.waitForFunction((n) => document.querySelectorAll('[data-testid=message]').length >= n, n, { timeout: T }).catch(async (e) => {
      throw new Error(`${what}: expected ${n} messages, page shows ${JSON.stringify(await messages(page))} (${e.message})`);
    });
    return messages(page);
  }

  async function send(page, text) {
    await page.waitForFunction(() => !document.querySelector('[data-testid=send]').disabled, null, { timeout: T });
    await page.getByTestId('message-input').fill(text);
    await page.getByTestId('send').click({ timeout: T });
    // The page shows a message only once the room delivers it (never
    // optimistically), so the sender seeing it means the gateway took it.
    await page.waitForFunction(
      (text) => [...document.querySelectorAll('[data-testid=message-text]')].some((e) => e.textContent === text),
      text,
      { timeout: T },
    );
  }

  return { openPage, status, waitConnected, messages, waitMessages, send };
}

/** `list` (from messages()) is `expected` ({from, text}) in order, each once, with consecutive seqs. */
export function assertExactlyOnce(list, expected, who) {
  assert.deepEqual(list.map((m) => m.text), expected.map((e) => e.text), `${who}: messages in order, each once`);
  assert.deepEqual(list.map((m) => m.from), expected.map((e) => e.from), `${who}: senders`);
  const seqs = list.map((m) => m.seq);
  assert.equal(new Set(seqs).size, seqs.length, `${who}: no seq shown twice`);
  for (let i = 1; i < seqs.length; i++) assert.equal(seqs[i], seqs[i - 1] + 1, `${who}: seqs consecutive, none twice: ${seqs}`);
}

// ---------------------------------------------------------------- nginx

const NGINX = process.env.NGINX || ['/usr/sbin/nginx', '/usr/bin/nginx'].find((p) => existsSync(p)) || 'nginx';

/**
 * The repo's nginx.conf with the deployment tests' substitutions only:
 * `listen 8080;` -> `listen 127.0.0.1:<port>;`, and upstreams.conf next to it
 * listing `servers` with the server parameters of the shipped upstreams.conf.
 * `transform(text)`, when given, derives a variant from the result (a test
 * that plays a proxy blocking WebSockets).
 */
function renderNginxConf(dir, port, servers, transform = (t) => t) {
  const conf = readFileSync(path.join(REPO, 'nginx', 'nginx.conf'), 'utf8');
  let n = 0;
  const text = conf.replace(/^(\s*)listen 8080;/gm, (_, indent) => {
    n += 1;
    return `${indent}listen 127.0.0.1:${port};`;
  });
  assert.equal(n, 1, 'nginx.conf must contain exactly one active `listen 8080;`');
  const shipped = readFileSync(path.join(REPO, 'nginx', 'upstreams.conf'), 'utf8');
  const params = /^server\s+\S+(\s+[^;]*)?;/m.exec(shipped)?.[1] ?? '';
  writeFileSync(path.join(dir, 'upstreams.conf'), servers.map((s) => `server ${s}${params};\n`).join(''));
  const file = path.join(dir, 'nginx.conf');
  writeFileSync(file, transform(text));
  return file;
}

function canConnect(port) {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    const done = (v) => {
      s.destroy();
      resolve(v);
    };
    s.setTimeout(1000, () => done(false));
    s.on('connect', () => done(true));
    s.on('error', () => done(false));
  });
}

/**
 * `nginx -p <dir>/ -e stderr -c <dir>/nginx.conf -g 'pid ...; daemon off;'`
 * in its own process group, with the repo's config (see renderNginxConf) in
 * front of `servers`, on a free port. The child has `port`, `logPath`,
 * `signal(sig)` (the whole group: master and workers, never anything else)
 * and `stop()`.
 */
export async function startNginx(dir, servers, { transform } = {}) {
  let lastLog = '';
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = await freePort();
    const conf = renderNginxConf(dir, port, servers, transform);
    const logPath = path.join(OUT, `nginx-${port}.log`);
    // Append mode: nginx reopens /dev/stdout (its access log) as a second
    // open file; without O_APPEND on ours the two would overwrite each other.
    writeFileSync(logPath, '');
    const fd = openSync(logPath, 'a');
    const child = spawn(NGINX, ['-p', `${dir}/`, '-e', 'stderr', '-c', conf, '-g', `pid ${dir}/nginx.pid; daemon off;`], {
      stdio: ['ignore', fd, fd],
      detached: true, // own process group: the workers are stopped, continued and killed with the master
    });
    closeSync(fd);
    child.exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
    child.on('error', () => {});
    child.port = port;
    child.logPath = logPath;
    child.signal = (sig) => {
      try {
        process.kill(-child.pid, sig);
      } catch {
        /* gone */
      }
    };
    child.stop = async () => {
      child.signal('SIGCONT');
      child.signal('SIGTERM');
      await Promise.race([child.exited, new Promise((r) => setTimeout(r, 5000).unref())]);
      child.signal('SIGKILL'); // leftover workers, if any
    };
    process.on('exit', () => child.signal('SIGKILL'));
    try {
      await waitFor(async () => {
        if (child.exitCode !== null || child.signalCode !== null) throw new Error('nginx exited');
        return canConnect(port);
      }, { timeoutMs: 10000, what: `nginx on 127.0.0.1:${port}` });
      return child;
    } catch (e) {
      child.signal('SIGKILL');
      lastLog = readFileSync(logPath, 'utf8');
      if (!/in use/.test(lastLog)) throw new Error(`nginx did not start: ${e.message}\n${lastLog}`);
    }
  }
  throw new Error(`could not start nginx on a free port:\n${lastLog}`);
}

/**
 * Three `--dev` nodes (n1, n2, n3; `bin`, `secret`) on a private
 * redis-server behind the real nginx with the repo's config (see
 * startNginx; `transform` derives a variant), and Chromium (`chromium`
 * from playwright-core, at `chromiumPath`; both default to the above). The nodes allow the nginx
 * origin, and with `directPages` also their own (pages opened on a node).
 * Returns { nginx, nodes (id -> child), browser, stop() }.
 */
export async function startNginxCluster({ bin = WSGATE_BIN, chromium, chromiumPath = CHROMIUM_PATH, secret, name, transform, directPages = false }) {
  assert.ok(existsSync(bin), `WSGATE_BIN not found: ${bin}`);
  assert.ok(existsSync(chromiumPath), `chromium not found: ${chromiumPath}`);
  const c = { nodes: {}, nginx: null, browser: null, redis: null };
  c.prefix = mkdtempSync(path.join(os.tmpdir(), `wsgate-browser-${name}-`));
  chmodSync(c.prefix, 0o755); // nginx's workers run as an unprivileged user when started as root
  c.stop = async () => {
    c.nginx?.signal('SIGCONT');
    await c.browser?.close().catch(() => {});
    for (const n of Object.values(c.nodes)) await stop(n);
    await c.nginx?.stop();
    await stop(c.redis);
    rmSync(c.prefix, { recursive: true, force: true });
  };
  try {
    c.redis = await startRedis();
    const ports = await freePorts(6);
    const ids = ['n1', 'n2', 'n3'];
    const pub = (i) => ports[i * 2];
    // nginx first (it only connects to a node when a request comes), so that
    // its origin is known when the nodes are started with --allowed-origins.
    c.nginx = await startNginx(c.prefix, ids.map((_, i) => `127.0.0.1:${pub(i)}`), { transform });
    const origins = [`http://127.0.0.1:${c.nginx.port}`, ...(directPages ? ids.map((_, i) => `http://127.0.0.1:${pub(i)}`) : [])];
    for (const [i, id] of ids.entries()) {
      c.nodes[id] = await startNode(bin, { id, port: pub(i), opsPort: ports[i * 2 + 1], secret, redisUrl: c.redis.url, origins });
    }
    c.browser = await launchChromium(chromium, chromiumPath);
  } catch (e) {
    await c.stop();
    throw e;
  }
  return c;
}
