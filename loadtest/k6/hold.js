// hold.js — what send.js and batch.js share: the streams that `sse-load hold --control` holds open,
// each VU's own share of their tokens with a sequence number per token, and the end-of-run check
// that every accepted event arrived exactly once. Imported, never run by itself.
import http from 'k6/http';
import exec from 'k6/execution';
import { sleep, fail } from 'k6';
import { Counter, Trend } from 'k6/metrics';

const missing = new Counter('missing_deliveries');
const lost = new Counter('lost_deliveries');
const outOfOrder = new Counter('out_of_order_deliveries');
const delivered = new Counter('delivered_events');
const deliveryP99 = new Trend('delivery_p99_us_from_hold');

// The thresholds of the loss accounting, for a script's `options.thresholds`.
export const LOSS_THRESHOLDS = {
  missing_deliveries: ['count==0'],
  lost_deliveries: ['count==0'],
  out_of_order_deliveries: ['count==0'],
  dropped_iterations: ['count==0'],
};

function stats(control) {
  const r = http.get(`${control}/stats`, { tags: { name: 'stats' } });
  if (r.status !== 200) fail(`GET ${control}/stats: ${r.status} ${r.error}`);
  return r.json();
}

// For `setup()`: the held tokens and hold's counters before the run.
export function holdSetup(control, vus) {
  const r = http.get(`${control}/tokens`, { tags: { name: 'tokens' } });
  if (r.status !== 200) fail(`GET ${control}/tokens: ${r.status} ${r.error}`);
  const tokens = r.json();
  if (tokens.length < vus) fail(`${tokens.length} tokens for ${vus} VUs: hold more streams or lower VUS`);
  return { tokens, before: stats(control) };
}

// Per VU: its share of the tokens (those i % vus == its index, so sends to one token are never
// concurrent), the next one to use and each token's next sequence number.
let mine = null;
let next = 0;
const seq = {};

// The next token of this VU and its sequence number (1, 2, 3, ... per token).
export function nextToken(data, vus) {
  if (mine === null) {
    const k = (exec.vu.idInTest - 1) % vus;
    mine = data.tokens.filter((_, i) => i % vus === k);
  }
  const token = mine[next++ % mine.length];
  const n = (seq[token] || 0) + 1;
  seq[token] = n;
  return { token, n };
}

// For `teardown()`: waits `drainSeconds`, then checks that the `accepted` counter's count of events
// all arrived exactly once. k6 gives teardown no metric values, so this run's own counter is read
// from k6's REST API at `k6Api`. `what` names the events in the log line.
export function holdTeardown(data, { control, k6Api, accepted, drainSeconds, what }) {
  sleep(drainSeconds);
  const after = stats(control);
  const m = http.get(`${k6Api}/v1/metrics/${accepted}`, { tags: { name: 'k6api' } });
  if (m.status !== 200) fail(`GET ${k6Api}/v1/metrics/${accepted}: ${m.status} ${m.error}`);
  const sent = m.json().data.attributes.sample.count;
  const got = after.events - data.before.events;
  delivered.add(got);
  missing.add(Math.max(0, sent - got));
  lost.add(after.lost - data.before.lost);
  outOfOrder.add(after.out_of_order - data.before.out_of_order);
  deliveryP99.add(after.latency_p99_us);
  console.log(`${what} accepted ${sent}, delivered ${got}, lost (seq gaps) ${after.lost - data.before.lost}, ` +
    `out-of-order ${after.out_of_order - data.before.out_of_order}, delivery p50/p99/max ` +
    `${after.latency_p50_us}/${after.latency_p99_us}/${after.latency_max_us} µs, streams open ` +
    `${after.streams_open}, ended ${after.streams_ended}`);
}
