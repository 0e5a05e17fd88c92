// connect.js — connect storm on the stream endpoint: open a stream, wait for the response head,
// close. See loadtest/README.md ("k6").
//
//   k6 run --log-output=none -e URL=http://127.0.0.1:3000 loadtest/k6/connect.js
//
// Env: URL (public listener, required), PATH_PREFIX (/k6: stream path; `?c=<n>` is appended),
// RATE (connects/s, 200), DURATION (30s), VUS (200: max concurrent opens), HOLD_MS (300: how long
// a stream is held before k6 drops it), HEAD_P99_MS (100: threshold on time-to-headers p99),
// MIN_OK_RATE (1: share of connects that must open).
//
// k6's http module has no streaming responses: a request returns when its body ends, and an SSE body
// never ends. So each request gets `timeout: HOLD_MS`; k6 then closes the connection and reports
// status 0 with error code 1050 (timeout), keeping the time to the first response byte in
// `timings.waiting`. A refusal (4xx/5xx) is a complete short JSON answer and returns with its status
// at once. So: a complete 200 or a timeout whose first byte came in under HOLD_MS/2 is a stream that
// opened (`stream_opened`); anything else (non-200 status, connect error, no byte in time) failed.
import http from 'k6/http';
import exec from 'k6/execution';
import { fail } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';

const URL = __ENV.URL || fail('set URL=http://host:port (the public listener)');
const PREFIX = __ENV.PATH_PREFIX || '/k6';
const RATE = Number(__ENV.RATE || 200);
const DURATION = __ENV.DURATION || '30s';
const VUS = Number(__ENV.VUS || 200);
const HOLD_MS = Number(__ENV.HOLD_MS || 300);
const HEAD_P99_MS = Number(__ENV.HEAD_P99_MS || 100);
const MIN_OK_RATE = Number(__ENV.MIN_OK_RATE || 1);

const opened = new Rate('stream_opened');
const refused = new Counter('stream_refused');
const headMs = new Trend('time_to_headers_ms');

export const options = {
  scenarios: {
    connect: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: VUS,
      maxVUs: VUS,
    },
  },
  thresholds: {
    stream_opened: [`rate>=${MIN_OK_RATE}`],
    time_to_headers_ms: [`p(99)<${HEAD_P99_MS}`],
    dropped_iterations: ['count==0'],
  },
  summaryTrendStats: ['avg', 'p(50)', 'p(99)', 'max'],
};

export default function () {
  const c = exec.scenario.iterationInTest;
  const r = http.get(`${URL}${PREFIX}?c=${c}`, {
    headers: { Accept: 'text/event-stream' },
    timeout: `${HOLD_MS}ms`,
    responseType: 'none',
    tags: { name: 'stream' },
  });
  const headOk = r.status === 200 ||
    (r.status === 0 && r.error_code === 1050 && r.timings.waiting > 0 && r.timings.waiting < HOLD_MS / 2);
  opened.add(headOk);
  if (headOk) {
    headMs.add(r.timings.waiting);
  } else if (r.status !== 0) {
    refused.add(1, { status: String(r.status) });
  }
}
