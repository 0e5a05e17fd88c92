// batch.js — POST /internal/batch (PROTOCOL §12) at a fixed event rate to streams held open by
// `sse-load hold --control ...`, then check that every accepted item was delivered. The same loss
// accounting as send.js; see loadtest/README.md ("k6").
//
//   k6 run -e GATEWAY=http://127.0.0.1:3001 -e CONTROL=http://127.0.0.1:4100 loadtest/k6/batch.js
//
// Env: GATEWAY (internal listener, required), CONTROL (sse-load hold control port, required),
// SECRET (INTERNAL_SECRET, optional), RATE (events/s, 10000), BATCH (sends per request, 100: the
// request rate is RATE / BATCH), DURATION (30s), VUS (16: senders; each owns the tokens
// i % VUS == its index, so sends to one token are never in concurrent requests, and within a batch
// its items keep their order, so sequence numbers count 1, 2, 3 per token), DRAIN_SECONDS (3),
// PAYLOAD_BYTES (0), P99_MS (50: threshold on the batch request's p99), MAX_ERROR_RATE (0: share of
// failed items), K6_API (http://127.0.0.1:6565: this k6's REST API, where teardown reads how many
// items were accepted). One run per `hold`, as send.js.
import http from 'k6/http';
import exec from 'k6/execution';
import { check, sleep, fail } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';

const GATEWAY = __ENV.GATEWAY || fail('set GATEWAY=http://host:port (the internal listener)');
const CONTROL = __ENV.CONTROL || fail('set CONTROL=http://host:port (sse-load hold control)');
const RATE = Number(__ENV.RATE || 10000);
const BATCH = Number(__ENV.BATCH || 100);
const DURATION = __ENV.DURATION || '30s';
const VUS = Number(__ENV.VUS || 16);
const DRAIN_SECONDS = Number(__ENV.DRAIN_SECONDS || 3);
const PAD = 'x'.repeat(Number(__ENV.PAYLOAD_BYTES || 0));
const P99_MS = Number(__ENV.P99_MS || 50);
const MAX_ERROR_RATE = Number(__ENV.MAX_ERROR_RATE || 0);
const K6_API = __ENV.K6_API || 'http://127.0.0.1:6565';
if (!(BATCH >= 1) || RATE / BATCH <= 0) fail('RATE and BATCH must be positive');

const headers = { 'Content-Type': 'application/json' };
if (__ENV.SECRET) headers.Authorization = `Bearer ${__ENV.SECRET}`;

const itemFailed = new Rate('item_failed');
const itemsOk = new Counter('items_accepted');
const missing = new Counter('missing_deliveries');
const lost = new Counter('lost_deliveries');
const outOfOrder = new Counter('out_of_order_deliveries');
const delivered = new Counter('delivered_events');
const deliveryP99 = new Trend('delivery_p99_us_from_hold');

export const options = {
  scenarios: {
    batch: {
      executor: 'constant-arrival-rate',
      // Batches per second; k6 wants an integer, so express it per minute.
      rate: Math.round((RATE / BATCH) * 60),
      timeUnit: '1m',
      duration: DURATION,
      preAllocatedVUs: VUS,
      maxVUs: VUS,
    },
  },
  thresholds: {
    item_failed: [`rate<=${MAX_ERROR_RATE}`],
    http_req_failed: [`rate<=${MAX_ERROR_RATE}`],
    'http_req_duration{name:batch}': [`p(99)<${P99_MS}`],
    missing_deliveries: ['count==0'],
    lost_deliveries: ['count==0'],
    out_of_order_deliveries: ['count==0'],
    dropped_iterations: ['count==0'],
  },
  summaryTrendStats: ['avg', 'p(50)', 'p(99)', 'max'],
};

function stats() {
  const r = http.get(`${CONTROL}/stats`, { tags: { name: 'stats' } });
  if (r.status !== 200) fail(`GET ${CONTROL}/stats: ${r.status} ${r.error}`);
  return r.json();
}

export function setup() {
  const r = http.get(`${CONTROL}/tokens`, { tags: { name: 'tokens' } });
  if (r.status !== 200) fail(`GET ${CONTROL}/tokens: ${r.status} ${r.error}`);
  const tokens = r.json();
  if (tokens.length < VUS) fail(`${tokens.length} tokens for ${VUS} VUs: hold more streams or lower VUS`);
  return { tokens, before: stats() };
}

// Per VU: its share of the tokens, the next one to use and each token's next sequence number.
let mine = null;
let next = 0;
const seq = {};

export default function (data) {
  if (mine === null) {
    const k = (exec.vu.idInTest - 1) % VUS;
    mine = data.tokens.filter((_, i) => i % VUS === k);
  }
  const requests = [];
  const now = Date.now() * 1000;
  for (let i = 0; i < BATCH; i++) {
    const token = mine[next++ % mine.length];
    const n = (seq[token] || 0) + 1;
    seq[token] = n;
    requests.push({ op: 'send', token, event: { name: 'k6', data: `${n} ${now}${PAD}` } });
  }
  const r = http.post(`${GATEWAY}/internal/batch`, JSON.stringify({ requests }), {
    headers,
    tags: { name: 'batch' },
  });
  let results = null;
  if (r.status === 200) {
    try {
      results = r.json('results');
    } catch (e) {
      results = null;
    }
  }
  const whole = check(r, {
    'batch 200': (x) => x.status === 200,
    'one result per item': () => Array.isArray(results) && results.length === BATCH,
  });
  if (!whole) {
    for (let i = 0; i < BATCH; i++) itemFailed.add(true);
    return;
  }
  let ok = 0;
  for (const item of results) {
    const good = item.status === 200;
    itemFailed.add(!good);
    if (good) ok++;
  }
  check(results, { 'every item 200': () => ok === BATCH });
  itemsOk.add(ok);
}

export function teardown(data) {
  sleep(DRAIN_SECONDS);
  const after = stats();
  // Every accepted item must have arrived exactly once; k6 gives teardown no metric values, so
  // read this run's own counter from k6's REST API.
  const m = http.get(`${K6_API}/v1/metrics/items_accepted`, { tags: { name: 'k6api' } });
  if (m.status !== 200) fail(`GET ${K6_API}/v1/metrics/items_accepted: ${m.status} ${m.error}`);
  const sent = m.json().data.attributes.sample.count;
  const got = after.events - data.before.events;
  delivered.add(got);
  missing.add(Math.max(0, sent - got));
  lost.add(after.lost - data.before.lost);
  outOfOrder.add(after.out_of_order - data.before.out_of_order);
  deliveryP99.add(after.latency_p99_us);
  console.log(`items accepted ${sent}, delivered ${got}, lost (seq gaps) ${after.lost - data.before.lost}, ` +
    `out-of-order ${after.out_of_order - data.before.out_of_order}, delivery p50/p99/max ` +
    `${after.latency_p50_us}/${after.latency_p99_us}/${after.latency_max_us} µs, streams open ` +
    `${after.streams_open}, ended ${after.streams_ended}`);
}
