// send.js — POST /internal/send at a fixed rate to streams held open by `sse-load hold --control ...`,
// then check that every accepted send was delivered. See loadtest/README.md ("k6").
//
//   k6 run -e GATEWAY=http://127.0.0.1:3001 -e CONTROL=http://127.0.0.1:4100 loadtest/k6/send.js
//
// Env: GATEWAY (internal listener, required), CONTROL (sse-load hold control port, required),
// SECRET (INTERNAL_SECRET, optional), RATE (sends/s, 1000), DURATION (30s), VUS (32: senders; each
// owns the tokens i % VUS == its index, so sends to one token are never concurrent and sequence
// numbers count 1, 2, 3 per token), DRAIN_SECONDS (3: wait before reading /stats), PAYLOAD_BYTES (0),
// P99_MS (50: threshold on request p99), MAX_ERROR_RATE (0), K6_API (http://127.0.0.1:6565: this k6's
// REST API, where teardown reads how many sends were accepted; change it with k6's --address).
// One run per `hold`: sequence numbers start at 1, so a second run against the same streams counts
// every event as out-of-order. Restart `hold` between runs.
import http from 'k6/http';
import { check, fail } from 'k6';
import { Counter, Rate } from 'k6/metrics';
import { LOSS_THRESHOLDS, holdSetup, holdTeardown, nextToken } from './hold.js';

const GATEWAY = __ENV.GATEWAY || fail('set GATEWAY=http://host:port (the internal listener)');
const CONTROL = __ENV.CONTROL || fail('set CONTROL=http://host:port (sse-load hold control)');
const RATE = Number(__ENV.RATE || 1000);
const DURATION = __ENV.DURATION || '30s';
const VUS = Number(__ENV.VUS || 32);
const DRAIN_SECONDS = Number(__ENV.DRAIN_SECONDS || 3);
const PAD = 'x'.repeat(Number(__ENV.PAYLOAD_BYTES || 0));
const P99_MS = Number(__ENV.P99_MS || 50);
const MAX_ERROR_RATE = Number(__ENV.MAX_ERROR_RATE || 0);
const K6_API = __ENV.K6_API || 'http://127.0.0.1:6565';

const headers = { 'Content-Type': 'application/json' };
if (__ENV.SECRET) headers.Authorization = `Bearer ${__ENV.SECRET}`;

const sendFailed = new Rate('send_failed');
const sendsOk = new Counter('sends_accepted');

export const options = {
  scenarios: {
    send: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: VUS,
      maxVUs: VUS,
    },
  },
  thresholds: {
    send_failed: [`rate<=${MAX_ERROR_RATE}`],
    http_req_failed: [`rate<=${MAX_ERROR_RATE}`],
    'http_req_duration{name:send}': [`p(99)<${P99_MS}`],
    ...LOSS_THRESHOLDS,
  },
  summaryTrendStats: ['avg', 'p(50)', 'p(99)', 'max'],
};

export function setup() {
  return holdSetup(CONTROL, VUS);
}

export default function (data) {
  const { token, n } = nextToken(data, VUS);
  const body = JSON.stringify({ token, event: { name: 'k6', data: `${n} ${Date.now() * 1000}${PAD}` } });
  const r = http.post(`${GATEWAY}/internal/send`, body, { headers, tags: { name: 'send' } });
  const ok = check(r, { 'send 200': (x) => x.status === 200 });
  sendFailed.add(!ok);
  if (ok) sendsOk.add(1);
}

export function teardown(data) {
  holdTeardown(data, {
    control: CONTROL,
    k6Api: K6_API,
    accepted: 'sends_accepted',
    drainSeconds: DRAIN_SECONDS,
    what: 'sends',
  });
}
