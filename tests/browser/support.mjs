// Helpers for the browser test: free ports, a private redis-server, wsgate
// nodes, polling with deadlines. Every wait is bounded; nothing sleeps as
// synchronization; everything listens on loopback only.

import { spawn } from 'node:child_process';
import { createWriteStream, mkdirSync, readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(HERE, '..', '..');
export const OUT = path.join(REPO, 'tests', 'output', 'browser');
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
 * Start `$WSGATE_BIN serve --dev` on the given ports; resolves once /ready is 200.
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
