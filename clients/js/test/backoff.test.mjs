import { test } from 'node:test';
import assert from 'node:assert/strict';
import { backoffDelay, Backoff } from '../wsgate.js';

test('full jitter: delay is random in [0, min(cap, base * 2^attempt))', () => {
  const opts = { baseMs: 100, capMs: 5000 };
  const ceilings = [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000];
  ceilings.forEach((ceiling, attempt) => {
    assert.equal(backoffDelay(attempt, opts, () => 0), 0);
    assert.equal(backoffDelay(attempt, opts, () => 0.5), Math.floor(ceiling / 2));
    assert.equal(backoffDelay(attempt, opts, () => 0.999999), Math.floor(ceiling * 0.999999));
    assert.ok(backoffDelay(attempt, opts, () => 0.999999) < ceiling);
  });
});

test('huge attempt counts stay capped and finite', () => {
  assert.equal(backoffDelay(10_000, { baseMs: 500, capMs: 30000 }, () => 0.5), 15000);
  assert.equal(backoffDelay(-3, { baseMs: 500, capMs: 30000 }, () => 0.5), 250);
});

test('a misbehaving random source is clamped', () => {
  assert.equal(backoffDelay(0, { baseMs: 100, capMs: 100 }, () => 7), 100);
  assert.equal(backoffDelay(0, { baseMs: 100, capMs: 100 }, () => -1), 0);
});

test('Backoff grows, is capped, and uses the injected random source', () => {
  const draws = [0.9, 0.1, 0.5, 0.99, 0.25, 0.75, 0.5, 0.5];
  let i = 0;
  const b = new Backoff({ baseMs: 1000, capMs: 8000, stableMs: 5000, random: () => draws[i++] });
  const got = draws.map(() => b.next());
  assert.deepEqual(got, [900, 200, 2000, 7920, 2000, 6000, 4000, 4000]);
  assert.equal(b.attempt, 8);
  assert.equal(b.ceiling(), 8000);
});

test('delays are randomized: many draws spread over the range, never above the ceiling', () => {
  let seed = 42;
  const rnd = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  const values = new Set();
  for (let k = 0; k < 200; k++) {
    const d = backoffDelay(3, { baseMs: 500, capMs: 30000 }, rnd);
    assert.ok(d >= 0 && d < 4000);
    values.add(Math.floor(d / 400));
  }
  assert.ok(values.size >= 8, `draws should cover most of [0, 4000): ${[...values]}`);
});

test('a stable connection resets the schedule, a flapping one does not', () => {
  const b = new Backoff({ baseMs: 100, capMs: 10000, stableMs: 5000, random: () => 0.5 });
  b.next();
  b.next();
  b.next();
  assert.equal(b.attempt, 3);
  b.connected(1000);
  b.disconnected(2000); // up 1 s < stableMs
  assert.equal(b.attempt, 3);
  assert.equal(b.next(), 400);
  b.connected(10_000);
  b.disconnected(15_000); // up exactly stableMs
  assert.equal(b.attempt, 0);
  assert.equal(b.next(), 50);
});

test('Backoff rejects nonsense bounds', () => {
  assert.throws(() => new Backoff({ baseMs: 0, capMs: 10 }), RangeError);
  assert.throws(() => new Backoff({ baseMs: 100, capMs: 10 }), RangeError);
});
