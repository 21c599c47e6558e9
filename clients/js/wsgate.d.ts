// Type declarations for wsgate.js (wsgate client protocol, version 1).

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export declare const PROTOCOL_VERSION: 1;

export interface Defaults {
  readonly backoffBaseMs: number;
  readonly backoffCapMs: number;
  readonly stableMs: number;
  readonly connectTimeoutMs: number;
  readonly heartbeatMs: number;
  readonly heartbeatTimeoutMs: number;
  readonly requestTimeoutMs: number;
  readonly refreshMarginMs: number;
}
export declare const DEFAULTS: Defaults;

/** Limits of the publish retries (idempotent publish, protocol v1.1). */
export declare const PUBLISH_RETRY: {
  /** An unacknowledged publish is sent again only while younger than this (ms; the gateway keeps keys 5 minutes). */
  readonly windowMs: number;
  /** At most this many publishes wait for a reconnect. */
  readonly maxQueued: number;
  /** A `timeout` answer is sent again this many times. */
  readonly timeoutRetries: number;
};

/** Error codes sent by the gateway in `error` frames. */
export type ServerErrorCode = 'bad_request' | 'forbidden' | 'rate_limited' | 'too_many_rooms' | 'unavailable' | 'invalid_token' | 'timeout';
/** Error codes raised by the client itself. */
export type ClientErrorCode =
  | 'not_connected'
  | 'disconnected'
  | 'timeout'
  | 'closed'
  | 'publish_expired'
  | 'left'
  | 'token_unavailable'
  | 'token_expired'
  | 'connect_failed'
  | 'bad_frame';

export declare class WsgateError extends Error {
  constructor(code: string, message?: string, details?: Record<string, unknown>);
  readonly name: 'WsgateError';
  readonly code: ServerErrorCode | ClientErrorCode | (string & {});
  /** The request id of the frame the gateway answered, if any. */
  readonly id?: string | number;
  /** The room of the request, when there was one. */
  readonly room?: string;
  /** The kind of request that failed: `join`, `leave`, `publish`, `ping`, `refresh`. */
  readonly request?: string;
  readonly cause?: unknown;
}

/** Full-jitter delay in [0, min(capMs, baseMs * 2^attempt)). */
export declare function backoffDelay(attempt: number, bounds?: { baseMs?: number; capMs?: number }, random?: () => number): number;

export declare class Backoff {
  constructor(options?: { baseMs?: number; capMs?: number; stableMs?: number; random?: () => number });
  baseMs: number;
  capMs: number;
  stableMs: number;
  random: () => number;
  /** Attempts made since the last reset. */
  attempt: number;
  next(): number;
  ceiling(): number;
  connected(now: number): void;
  disconnected(now: number): void;
  reset(): void;
}

export interface RoomState {
  room: string;
  epoch: string | null;
  /** Last seq delivered (or the room's seq when joined); `null` before the first join. */
  lastSeq: number | null;
  /** Joined on the current connection. */
  joined: boolean;
}

/** Who is in a room (v1.1): `users` sorted, at most 1,000. */
export interface PresenceInfo {
  room: string;
  count: number;
  users: string[];
  /** `users` lists fewer than `count`. */
  truncated: boolean;
}

/** `presence_join` / `presence_leave` (v1.1). */
export interface PresenceEvent {
  room: string;
  user: string;
}

export interface JoinOptions {
  since?: number;
  epoch?: string;
  /** v1.1: receive presence events for the room and its presence after each (re-)join. */
  presence?: boolean;
}

export interface JoinFrame {
  type: 'join';
  room: string;
  since?: number;
  epoch?: string;
  presence?: true;
  id?: string;
}

export declare class RoomTracker {
  want(room: string, resume?: JoinOptions): unknown;
  unwant(room: string): void;
  has(room: string): boolean;
  get(room: string): RoomState | undefined;
  list(): string[];
  joinFrame(room: string, id?: string): JoinFrame;
  disconnected(): void;
  onJoined(frame: JoinedFrame): { tracked: boolean; resumed: boolean; gap: GapEvent | null };
  onMessage(frame: MessageFrame): { deliver: boolean; duplicate: boolean; replayed: boolean; gap: GapEvent | null };
}

export declare function jwtExp(token: string): number | null;
export declare function normalizeUrl(url: string, base?: string): string;
export declare function withToken(url: string, token: string): string;

/** The `http(s)://.../sse` URL beside a `ws(s)://.../ws` URL (the SSE fallback, protocol v1.1 section 7). */
export declare function sseUrl(wsUrl: string): string;

/**
 * Incremental `text/event-stream` parser: `push` decoded text in chunks of any
 * size; `onEvent` gets each event's data (lines joined with `\n`), `onComment`
 * each comment line. Throws a RangeError past `maxBytes` (default 16 MiB).
 */
export declare class SseParser {
  constructor(handlers: { onEvent: (data: string) => void; onComment?: (text: string) => void; maxBytes?: number });
  push(text: string): void;
}

/**
 * The SSE + POST transport behind the WebSocket subset the client uses:
 * `GET url` read with `fetch`, frames sent as `POST /sse/{conn}` (in order,
 * batched as a JSON array while one is in flight).
 */
export declare class SseSocket implements WebSocketLike {
  constructor(url: string, options?: { fetch?: typeof fetch; getToken?: () => string });
  readonly url: string;
  readonly readyState: number;
  /** The connection id from `welcome` (null before it). */
  readonly conn: string | null;
  send(data: string): void;
  close(): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string; wasClean: boolean }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  /** A comment line (the server's heartbeat) arrived. */
  onheartbeat: (() => void) | null;
}

/** `ws`: WebSocket; `sse`: Server-Sent Events + POST (for networks that block the upgrade). */
export type Transport = 'ws' | 'sse';

// ------------------------------------------------------------------ frames

export interface WelcomeFrame {
  type: 'welcome';
  conn: string;
  user: string;
  node: string;
  heartbeat_ms: number;
  /** `"sse"` on the SSE transport. */
  transport?: 'sse';
}

export interface JoinedFrame {
  type: 'joined';
  room: string;
  seq: number;
  epoch: string;
  recovered?: boolean;
  id?: string | number;
}

export interface MessageFrame<D = Json> {
  type: 'message';
  room: string;
  seq: number;
  from: string;
  data: D;
  /** Publish time, Unix milliseconds. */
  ts: number;
}

export interface AckFrame {
  type: 'ack';
  id: string | number;
  room: string;
  seq: number;
}

export interface LeftFrame {
  type: 'left';
  room: string;
  id?: string | number;
}

export interface PongFrame {
  type: 'pong';
  id?: string | number;
}

// ------------------------------------------------------------------ events

export type ConnectionState = 'idle' | 'connecting' | 'connected' | 'reconnecting' | 'closed';

export interface StateEvent {
  state: ConnectionState;
  previous: ConnectionState;
  /** URL in use (or, when reconnecting, the one that was in use). */
  url: string;
  node: string | null;
  /** Reconnect attempts since the last reset. */
  attempt: number;
  /** `connected` only: true after the first connection. */
  reconnected?: boolean;
  /** `connected` only: the transport in use. */
  transport?: Transport;
  /** `reconnecting` only: the delay before the next attempt. */
  delayMs?: number;
  /** `reconnecting` only: when the next attempt starts (the client's clock, ms). */
  retryAt?: number;
  /** `reconnecting` only: the URL of the next attempt. */
  nextUrl?: string;
  /** `reconnecting` only: the close code that caused it (0: no token). */
  code?: number;
  reason?: string;
}

export interface WelcomeEvent extends Omit<WelcomeFrame, 'transport'> {
  url: string;
  reconnected: boolean;
  /** The transport of this connection. */
  transport: Transport;
}

export interface JoinedEvent {
  room: string;
  seq: number;
  epoch: string;
  recovered?: boolean;
  /** A resume with `since` succeeded: missed messages follow as `message` events with `replayed: true`. */
  resumed: boolean;
  /** An automatic re-join after a reconnect (or a retry). */
  rejoin: boolean;
  /** Sent by the gateway on its own (epoch change while in the room). */
  unsolicited: boolean;
}

export interface MessageEvent<D = Json> extends MessageFrame<D> {
  /** Delivered as part of a resume replay. */
  replayed: boolean;
}

export interface GapEvent {
  room: string;
  /**
   * `not_recovered`: a resume was refused (history too short, seq or epoch unknown);
   * `epoch_change`: the room's history was reset;
   * `seq_jump`: a seq was skipped within an epoch.
   */
  reason: 'not_recovered' | 'epoch_change' | 'seq_jump';
  recovered: false;
  /** Last seq seen before the gap. */
  lastSeq: number | null;
  /** The seq now current (`joined.seq`, or the message that jumped). */
  seq: number;
  epoch: string | null;
  previousEpoch?: string | null;
  /** `seq_jump` only: the missing seqs, inclusive. */
  from?: number;
  to?: number;
}

export interface CloseEvent {
  code: number;
  reason: string;
  wasClean: boolean;
  /** Closed by this client (app close, heartbeat/connect/probe timeout). */
  local: boolean;
  url: string;
  node: string | null;
  /** The transport of the connection (or attempt) that closed. */
  transport: Transport | null;
  /** False when the attempt ended before `welcome` (e.g. a refused handshake). */
  connected: boolean;
}

export interface EventMap {
  state: StateEvent;
  welcome: WelcomeEvent;
  joined: JoinedEvent;
  left: LeftFrame;
  message: MessageEvent;
  gap: GapEvent;
  ack: AckFrame;
  pong: PongFrame;
  refreshed: { exp: number | null };
  error: WsgateError;
  close: CloseEvent;
  /** `transport: 'auto'`: the WebSocket could not open, SSE is tried at once (no backoff). */
  fallback: { from: 'ws'; to: 'sse'; reason: string; url: string };
  wake: { reason: 'online' | 'visible' };
  /** The room's presence, asked after each (re-)join of a room joined with `presence: true`. */
  presence: PresenceInfo;
  presence_join: PresenceEvent;
  presence_leave: PresenceEvent;
  /** A frame of a type this client does not know. */
  frame: { type: string; [key: string]: unknown };
}

// ------------------------------------------------------------------ client

/** The subset of the WebSocket API the client uses. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string; wasClean: boolean }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

export interface WsgateClientOptions {
  /** One gateway URL (`ws(s)://host/ws`, `http(s)://host`, `host:port`, or `/ws` relative to the page). */
  url?: string;
  /** Several gateway URLs, tried in order (the next one after each failure). */
  urls?: string[];
  /** Index into `urls` of the first one to try (default 0). */
  startIndex?: number;
  /** A fixed token. */
  token?: string;
  /** Fetches a token: at start, after close 4001, when the token expired, and before `exp` (for `refresh`). */
  getToken?: () => string | Promise<string>;
  /** WebSocket constructor; defaults to `globalThis.WebSocket` (Node 20: pass `ws`'s). */
  WebSocket?: new (url: string) => WebSocketLike;
  /**
   * `auto` (default): WebSocket, and SSE + POST at once when the WebSocket
   * cannot open (every reconnect tries the WebSocket again; without any
   * WebSocket, SSE only); `ws`: WebSocket only; `sse`: SSE only.
   */
  transport?: 'auto' | Transport;
  /** `fetch` for the SSE transport; defaults to `globalThis.fetch`. */
  fetch?: typeof fetch;
  /** Backoff base, ms (default 500). */
  backoffBaseMs?: number;
  /** Backoff cap, ms (default 30000). */
  backoffCapMs?: number;
  /** A connection up this long resets the backoff, ms (default 10000). */
  stableMs?: number;
  /** Give up on an attempt without `welcome` after this long, ms (default 10000). */
  connectTimeoutMs?: number;
  /** Heartbeat until `welcome` says otherwise, ms (default 30000). */
  heartbeatMs?: number;
  /** After `heartbeat_ms` of silence a `ping` is sent; after this much more, the connection is dropped (default 10000). */
  heartbeatTimeoutMs?: number;
  /** Timeout of `publish`, `leave`, `ping` and `refresh` answers, ms (default 10000). */
  requestTimeoutMs?: number;
  /** Send `refresh` this long before `exp` (at most half the remaining lifetime), ms (default 60000). */
  refreshMarginMs?: number;
  /** Random source in [0, 1) for the jitter (tests). */
  random?: () => number;
  /** Clock (tests). */
  now?: () => number;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (handle: unknown) => void;
  /** Listen to `online`/`offline`/`visibilitychange` (default true when in a browser). */
  browserEvents?: boolean;
  /** Targets for those events (default `window` / `document`). */
  window?: EventTarget | null;
  document?: (EventTarget & { visibilityState?: string }) | null;
}

export interface ClientStats {
  connects: number;
  reconnects: number;
  duplicatesDropped: number;
  gaps: number;
  messages: number;
}

export declare class WsgateClient {
  constructor(options: WsgateClientOptions);

  readonly state: ConnectionState;
  readonly welcome: WelcomeFrame | null;
  readonly node: string | null;
  /** The transport of the current connection (`null` while not connected). */
  readonly transport: Transport | null;
  readonly url: string;
  readonly urls: string[];
  readonly rooms: string[];
  readonly stats: ClientStats;
  readonly backoff: Backoff;
  readonly tracker: RoomTracker;

  on<K extends keyof EventMap>(type: K, listener: (ev: EventMap[K]) => void): () => void;
  off<K extends keyof EventMap>(type: K, listener: (ev: EventMap[K]) => void): void;
  once<K extends keyof EventMap>(type: K, listener: (ev: EventMap[K]) => void): () => void;

  /** Start connecting; resolves with the `welcome` frame, or `null` if closed before. */
  connect(): Promise<WelcomeFrame | null>;
  /** Drop the current connection and connect again now. */
  reconnect(): Promise<WelcomeFrame | null>;
  setToken(token: string): void;
  roomState(room: string): RoomState | undefined;

  /** Join (and keep joined across reconnects); resolves when joined. */
  join(room: string, options?: JoinOptions): Promise<JoinedEvent>;
  leave(room: string): Promise<void>;
  /** Who is in `room` (v1.1; needs the `rooms` grant, not membership). */
  presence(room: string, options?: { timeoutMs?: number }): Promise<PresenceInfo>;
  /**
   * Resolves with the message's seq. Every publish carries an idempotency
   * key; one whose ack a drop swallowed is sent again with the same key after
   * the reconnect (behind the re-joins), a `timeout` answer up to 3 times.
   */
  publish(room: string, data: Json, options?: { timeoutMs?: number }): Promise<number>;
  /** Application-level ping; resolves with the round trip in ms. */
  ping(options?: { timeoutMs?: number }): Promise<number>;
  /** Fetch a token with `getToken` and send `refresh`; resolves with the new `exp`. */
  refreshToken(): Promise<number | null>;
  /** Close for good (default code 1000); no reconnect follows. */
  close(code?: number, reason?: string): void;
}

export default WsgateClient;
