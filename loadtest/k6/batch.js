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
import { check, fail } from 'k6';
import { Counter, Rate } from 'k6/metrics';
import { LOSS_THRESHOLDS, holdSetup, holdTeardown, nextToken } from './hold.js';

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
    ...LOSS_THRESHOLDS,
  },
  summaryTrendStats: ['avg', 'p(50)', 'p(99)', 'max'],
};

export function setup() {
  return holdSetup(CONTROL, VUS);
}

export default function (data) {
  const requests = [];
  const now = Date.now() * 1000;
  for (let i = 0; i < BATCH; i++) {
    const { token, n } = nextToken(data, VUS);
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
  holdTeardown(data, {
    control: CONTROL,
    k6Api: K6_API,
    accepted: 'items_accepted',
    drainSeconds: DRAIN_SECONDS,
    what: 'items',
  });
}
