import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RoomTracker } from '../wsgate.js';

const msg = (room, seq) => ({ type: 'message', room, seq, from: 'a', data: seq, ts: 0 });

test('first join sends no since; messages after joined.seq are delivered in order', () => {
  const t = new RoomTracker();
  assert.deepEqual(t.joinFrame('lobby', 'c1'), { type: 'join', room: 'lobby', id: 'c1' });
  const r = t.onJoined({ type: 'joined', room: 'lobby', seq: 57, epoch: 'E1' });
  assert.equal(r.gap, null);
  assert.equal(r.resumed, false);
  assert.equal(t.onMessage(msg('lobby', 57)).deliver, false, 'seq <= joined.seq is history, not new');
  assert.equal(t.onMessage(msg('lobby', 58)).deliver, true);
  assert.equal(t.onMessage(msg('lobby', 59)).deliver, true);
  assert.deepEqual(t.get('lobby'), { room: 'lobby', epoch: 'E1', lastSeq: 59, joined: true });
});

test('duplicates are dropped, never delivered twice', () => {
  const t = new RoomTracker();
  t.want('r');
  t.onJoined({ type: 'joined', room: 'r', seq: 0, epoch: 'E' });
  for (const s of [1, 2, 2, 1, 3, 3]) t.onMessage(msg('r', s));
  const delivered = [];
  const t2 = new RoomTracker();
  t2.want('r');
  t2.onJoined({ type: 'joined', room: 'r', seq: 0, epoch: 'E' });
  for (const s of [1, 2, 2, 1, 3, 3, 4]) {
    const res = t2.onMessage(msg('r', s));
    if (res.deliver) delivered.push(s);
    else assert.equal(res.duplicate, true);
  }
  assert.deepEqual(delivered, [1, 2, 3, 4]);
});

test('a seq jump is reported as a gap with the missing range, then delivered', () => {
  const t = new RoomTracker();
  t.want('r');
  t.onJoined({ type: 'joined', room: 'r', seq: 10, epoch: 'E' });
  assert.equal(t.onMessage(msg('r', 11)).gap, null);
  const res = t.onMessage(msg('r', 15));
  assert.equal(res.deliver, true);
  assert.deepEqual(res.gap, { room: 'r', reason: 'seq_jump', recovered: false, from: 12, to: 14, lastSeq: 11, seq: 15, epoch: 'E' });
});

test('resume: join carries since + epoch; recovered replay is delivered once and marked', () => {
  const t = new RoomTracker();
  t.want('r');
  t.onJoined({ type: 'joined', room: 'r', seq: 3, epoch: 'E' });
  t.onMessage(msg('r', 4));
  t.onMessage(msg('r', 5));
  t.disconnected();
  assert.equal(t.get('r').joined, false);
  assert.deepEqual(t.joinFrame('r', 'c9'), { type: 'join', room: 'r', since: 5, epoch: 'E', id: 'c9' });
  const j = t.onJoined({ type: 'joined', room: 'r', seq: 8, epoch: 'E', recovered: true });
  assert.equal(j.resumed, true);
  assert.equal(j.gap, null);
  const out = [5, 6, 7, 8, 9].map((s) => t.onMessage(msg('r', s)));
  assert.deepEqual(out.map((o) => o.deliver), [false, true, true, true, true]);
  assert.deepEqual(out.map((o) => o.replayed), [false, true, true, true, false]);
  assert.ok(out.every((o) => o.gap === null));
});

test('recovered:false is a gap, never hidden; live messages continue after joined.seq', () => {
  const t = new RoomTracker();
  t.want('r');
  t.onJoined({ type: 'joined', room: 'r', seq: 5, epoch: 'E' });
  t.disconnected();
  t.joinFrame('r', 'c2');
  const j = t.onJoined({ type: 'joined', room: 'r', seq: 2000, epoch: 'E', recovered: false });
  assert.deepEqual(j.gap, { room: 'r', reason: 'not_recovered', recovered: false, lastSeq: 5, seq: 2000, epoch: 'E', previousEpoch: 'E' });
  assert.equal(t.onMessage(msg('r', 2000)).deliver, false);
  assert.equal(t.onMessage(msg('r', 2001)).deliver, true);
});

test('an epoch change (answer or unsolicited) is a gap and resets the seq', () => {
  const t = new RoomTracker();
  t.want('r');
  t.onJoined({ type: 'joined', room: 'r', seq: 40, epoch: 'old' });
  t.onMessage(msg('r', 41));
  // unsolicited, while in the room (Redis restarted empty)
  const j = t.onJoined({ type: 'joined', room: 'r', seq: 0, epoch: 'new', recovered: false });
  assert.equal(j.gap.reason, 'epoch_change');
  assert.equal(j.gap.previousEpoch, 'old');
  assert.equal(j.gap.lastSeq, 41);
  const r1 = t.onMessage(msg('r', 1));
  assert.equal(r1.deliver, true, 'seq 1 of the new epoch is new, though 1 < 41');
  assert.equal(r1.gap, null);
  // even a (buggy) recovered:true with another epoch is a gap
  const j2 = t.onJoined({ type: 'joined', room: 'r', seq: 9, epoch: 'newer', recovered: true });
  assert.equal(j2.gap.reason, 'epoch_change');
});

test('a resume point given by the app is used on the first join', () => {
  const t = new RoomTracker();
  t.want('r', { since: 12, epoch: 'E' });
  assert.deepEqual(t.joinFrame('r'), { type: 'join', room: 'r', since: 12, epoch: 'E' });
  const j = t.onJoined({ type: 'joined', room: 'r', seq: 14, epoch: 'E', recovered: true });
  assert.equal(j.resumed, true);
  assert.deepEqual([12, 13, 14].map((s) => t.onMessage(msg('r', s)).deliver), [false, true, true]);
});

test('since:0 asks for the whole history', () => {
  const t = new RoomTracker();
  t.want('r', { since: 0 });
  assert.deepEqual(t.joinFrame('r'), { type: 'join', room: 'r', since: 0 });
  const j = t.onJoined({ type: 'joined', room: 'r', seq: 2, epoch: 'E', recovered: true });
  assert.equal(j.gap, null);
  assert.deepEqual([1, 2].map((s) => t.onMessage(msg('r', s)).deliver), [true, true]);
});

test('messages and joins for rooms not tracked are ignored', () => {
  const t = new RoomTracker();
  assert.equal(t.onMessage(msg('x', 1)).deliver, false);
  assert.equal(t.onJoined({ type: 'joined', room: 'x', seq: 1, epoch: 'E' }).tracked, false);
  t.want('x');
  t.unwant('x');
  assert.equal(t.has('x'), false);
});
