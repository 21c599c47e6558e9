// Test doubles: a manual clock with timers, and a WebSocket whose server side
// the test drives by hand. No real time passes and no socket is opened.

export class FakeClock {
  constructor(start = 1_700_000_000_000) {
    this.t = start;
    this.timers = new Map();
    this.nextId = 1;
  }

  now = () => this.t;

  setTimeout = (fn, ms) => {
    const id = this.nextId++;
    this.timers.set(id, { at: this.t + Math.max(0, ms), fn, ms });
    return id;
  };

  clearTimeout = (id) => {
    this.timers.delete(id);
  };

  /** Move time forward, firing due timers in order (bounded). */
  advance(ms) {
    const end = this.t + ms;
    for (let i = 0; i < 100_000; i++) {
      let best = null;
      for (const [id, tm] of this.timers) if (tm.at <= end && (best === null || tm.at < best[1].at)) best = [id, tm];
      if (!best) break;
      this.timers.delete(best[0]);
      this.t = best[1].at;
      best[1].fn();
    }
    this.t = end;
  }

  /** Delays of pending timers, for assertions. */
  pending() {
    return [...this.timers.values()].map((tm) => tm.at - this.t);
  }
}

/** Await queued promise callbacks (getToken, then-chains). */
export async function flush(rounds = 5) {
  for (let i = 0; i < rounds; i++) await new Promise((r) => setImmediate(r));
}

export function makeFakeWebSocket() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.closedWith = null;
      sockets.push(this);
    }

    send(text) {
      if (this.readyState !== 1) throw new Error('not open');
      this.sent.push(JSON.parse(text));
    }

    close(code, reason) {
      this.closedWith = { code, reason };
      this.readyState = 3;
    }

    // --- server side, driven by the test
    accept(welcome = {}) {
      this.readyState = 1;
      this.onopen?.({});
      this.frame({ type: 'welcome', conn: 'c-1', user: 'alice', node: 'n1', heartbeat_ms: 30000, ...welcome });
    }

    frame(obj) {
      this.onmessage?.({ data: JSON.stringify(obj) });
    }

    serverClose(code = 1006, reason = '') {
      this.readyState = 3;
      this.onclose?.({ code, reason, wasClean: code !== 1006 });
    }

    // Node 20's experimental WebSocket after a refused handshake: an error
    // event and never a close event.
    refuse(message = 'Received network error or non-101 status code.') {
      this.readyState = 3;
      this.onerror?.({ message });
    }

    fail() {
      this.readyState = 3;
      this.onerror?.({});
      this.onclose?.({ code: 1006, reason: '', wasClean: false });
    }

    lastSent(type) {
      for (let i = this.sent.length - 1; i >= 0; i--) if (!type || this.sent[i].type === type) return this.sent[i];
      return undefined;
    }

    get token() {
      return new URL(this.url).searchParams.get('token');
    }
  }
  return { FakeWebSocket, sockets };
}

/** An unsigned JWT-shaped token with the given claims (the client only reads `exp`). */
export function fakeJwt(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}.sig`;
}

/**
 * A `fetch` whose server side the test drives by hand: every call is recorded
 * in `requests`. A GET (the event stream) waits until the test calls
 * `respond(status, contentType)`, then `push(text)` / `end()` feed its body.
 * A POST is answered at once with `postStatus` (202 unless changed); its
 * `body` is kept (parsed) for assertions.
 */
export function makeFakeFetch() {
  const requests = [];
  const state = { postStatus: 202 };
  async function fetch(url, init = {}) {
    const req = { url, method: init.method ?? 'GET', headers: init.headers ?? {}, signal: init.signal };
    requests.push(req);
    if (req.method === 'POST') {
      req.body = JSON.parse(init.body);
      return new Response(null, { status: state.postStatus });
    }
    return new Promise((resolve, reject) => {
      init.signal?.addEventListener('abort', () => {
        req.aborted = true;
        reject(new DOMException('aborted', 'AbortError'));
      });
      req.respond = (status = 200, contentType = 'text/event-stream') => {
        const encoder = new TextEncoder();
        let controller;
        const body = new ReadableStream({ start: (c) => { controller = c; } });
        req.push = (text) => controller.enqueue(encoder.encode(text));
        req.end = () => controller.close();
        req.event = (obj) => req.push(`data: ${JSON.stringify(obj)}\n\n`);
        resolve(new Response(status === 200 ? body : null, { status, headers: { 'content-type': contentType } }));
      };
    });
  }
  const of = (method) => requests.filter((r) => r.method === method);
  return { fetch, requests, state, gets: () => of('GET'), posts: () => of('POST') };
}
