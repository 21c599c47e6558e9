// Terminal chat with wsgate.js: prints every message of ROOM as a JSON line,
// publishes each line read from stdin as {"text": line}.
//
//   node clients/js/examples/chat.mjs URL[,URL...] TOKEN [ROOM]
//
// Node 22+ has a global WebSocket; on Node 20 add --experimental-websocket,
// or leave it out and the client uses the SSE transport (GET /sse + POST).
// WSGATE_TRANSPORT=sse (or ws, auto) chooses the transport.
// TOKEN may be "dev:NAME": the token is then fetched from GET /dev/token?sub=NAME
// of the first URL's host (a node started with --dev).

import { createInterface } from 'node:readline';
import { WsgateClient } from '../wsgate.js';

const [urlArg, tokenArg, room = 'lobby'] = process.argv.slice(2);
if (!urlArg || !tokenArg) {
  console.error('usage: node chat.mjs URL[,URL...] TOKEN|dev:NAME [ROOM]');
  process.exit(2);
}
const urls = urlArg.split(',');

async function devToken(name) {
  const u = new URL(urls[0].includes('://') ? urls[0] : `ws://${urls[0]}`);
  const origin = `${u.protocol === 'wss:' ? 'https:' : 'http:'}//${u.host}`;
  const res = await fetch(`${origin}/dev/token?sub=${encodeURIComponent(name)}`);
  if (!res.ok) throw new Error(`GET /dev/token: HTTP ${res.status}`);
  return (await res.json()).token;
}

const transport = process.env.WSGATE_TRANSPORT || 'auto';
if (typeof globalThis.WebSocket !== 'function' && transport !== 'sse') {
  console.error(`[note] node ${process.version} has no global WebSocket (Node 22+, or --experimental-websocket on Node 20): using SSE`);
}
const client = new WsgateClient({
  urls,
  transport,
  ...(tokenArg.startsWith('dev:') ? { getToken: () => devToken(tokenArg.slice(4)) } : { token: tokenArg }),
});
const log = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
client.on('state', (s) => console.error(`[${s.state}]${s.delayMs !== undefined ? ` retry in ${s.delayMs} ms` : ''}${s.node ? ` node ${s.node}` : ''}${s.transport ? ` over ${s.transport}` : ''}`));
client.on('message', (m) => log({ room: m.room, seq: m.seq, from: m.from, data: m.data, ts: m.ts }));
client.on('gap', (g) => console.error(`[gap] ${JSON.stringify(g)}`));
client.on('error', (e) => console.error(`[error] ${e.code}: ${e.message}`));

await client.connect();
await client.join(room);
console.error(`[joined ${room}] type lines to publish, Ctrl-D to quit`);

const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  try {
    const seq = await client.publish(room, { text: line });
    console.error(`[ack #${seq}]`);
  } catch (e) {
    console.error(`[not sent] ${e.code}: ${e.message}`);
  }
}
client.close();
