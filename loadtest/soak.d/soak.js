// The soak's traffic against ONE gateway replica (loadtest/soak starts one k6 per replica):
// the journeys of loadtest/k6/journeys.js at a FIXED arrival rate for the whole run, plus
// WebSocket subscribers joining and leaving. Not meant to be run by hand (loadtest/soak sets
// every variable), but it can be:
//
//   BASE_URL=http://127.0.0.1:8000 MINUTES=3 T0_MS=$(date +%s%3N) k6 run loadtest/soak.d/soak.js
//
// Every request is tagged with the minute of the run it started in (`minute`, counted from
// T0_MS, the same clock for both k6 processes and the sampler), and the summary carries one
// submetric per minute (a threshold that always holds makes k6 keep it): the per-minute p50 /
// p99 the soak judges, without writing every sample to disk. The auth journey (argon2
// hashing, hundreds of ms by design) is tagged `auth_minute` instead, so it does not decide
// the p99 of the reads; it is in the overall figures.
//
// Knobs: RATE (data_anon arrivals per second, 20; the other journeys scale with it),
// WS_EVERY_S (a new subscriber every 2 s), WS_HOLD_MIN_S / WS_HOLD_MAX_S (30 / 30 s held,
// uniform between them: a fixed hold keeps 15 relays open at any time, so the gateway's fd
// count does not wander with a random number of subscribers), SUMMARY (JSON summary path).
import { WebSocket } from 'k6/experimental/websockets';
import { Counter } from 'k6/metrics';
import exec from 'k6/execution';
import { setup as journeysSetup, dataAnon, dataAuth, analytics, authJourney } from '../k6/journeys.js';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8000';
const WS_URL = __ENV.WS_URL || BASE.replace(/^http/, 'ws') + '/ws';
const MINUTES = Number(__ENV.MINUTES || 3);
const T0_MS = Number(__ENV.T0_MS || Date.now());
const RATE = Number(__ENV.RATE || 20);
const WS_EVERY_S = Number(__ENV.WS_EVERY_S || 2);
const HOLD_MIN_S = Number(__ENV.WS_HOLD_MIN_S || 30);
const HOLD_MAX_S = Number(__ENV.WS_HOLD_MAX_S || 30);
const SUMMARY = __ENV.SUMMARY || 'loadtest/results/k6-soak-summary.json';
const DURATION = `${MINUTES * 60}s`;
const CLOSE_GRACE_S = 5;

const wsSubscribed = new Counter('ws_subscribed');
const wsTicks = new Counter('ws_ticks');
const wsUnexpectedCloses = new Counter('ws_unexpected_closes');
const wsErrors = new Counter('ws_errors');
const wsCloseUnanswered = new Counter('ws_close_unanswered');

const arrivals = (rate, vus) => ({
  executor: 'constant-arrival-rate',
  rate: Math.max(1, Math.round(rate)),
  timeUnit: '1s',
  duration: DURATION,
  preAllocatedVUs: vus,
  maxVUs: vus * 10,
});

// One always-true threshold per minute and metric (and one for the auth journey): k6 puts a
// submetric in the summary only when a threshold names it. ws_sessions is k6's own (one per
// WebSocket opened).
const perMinute = {};
for (let m = 0; m <= MINUTES; m++) {
  perMinute[`http_req_duration{minute:${m}}`] = ['max>=0'];
  perMinute[`http_req_failed{minute:${m}}`] = ['rate>=0'];
  perMinute[`http_reqs{minute:${m}}`] = ['count>=0'];
}
perMinute['http_req_duration{journey:auth}'] = ['max>=0'];

export const options = {
  discardResponseBodies: false,
  scenarios: {
    data_anon: Object.assign(arrivals(RATE, 10), { exec: 'soakDataAnon', tags: { journey: 'data_anon' } }),
    data_auth: Object.assign(arrivals(RATE / 4, 5), { exec: 'soakDataAuth', tags: { journey: 'data_auth' } }),
    analytics: Object.assign(arrivals(RATE / 4, 5), { exec: 'soakAnalytics', tags: { journey: 'analytics' } }),
    // Register + login: argon2 in the auth simulator, the expensive calls; one every 4 s.
    auth_journey: {
      executor: 'constant-arrival-rate', exec: 'soakAuth', rate: 1, timeUnit: '4s',
      duration: DURATION, preAllocatedVUs: 2, maxVUs: 20, tags: { journey: 'auth' },
    },
    subscribers: {
      executor: 'constant-arrival-rate', exec: 'subscriber', rate: 1, timeUnit: `${WS_EVERY_S}s`,
      duration: DURATION, preAllocatedVUs: Math.ceil(HOLD_MAX_S / WS_EVERY_S) + 5,
      maxVUs: 4 * Math.ceil(HOLD_MAX_S / WS_EVERY_S) + 20,
      gracefulStop: `${CLOSE_GRACE_S + 10}s`, tags: { journey: 'ws' },
    },
  },
  thresholds: perMinute,
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(99)', 'max'],
};

function minute() {
  return String(Math.floor((Date.now() - T0_MS) / 60000));
}

function tag(name) {
  exec.vu.metrics.tags[name] = minute();
}

export function setup() {
  return journeysSetup();
}

export function soakDataAnon(data) {
  tag('minute');
  dataAnon(data);
}

export function soakDataAuth(data) {
  tag('minute');
  dataAuth(data);
}

export function soakAnalytics(data) {
  tag('minute');
  analytics(data);
}

export function soakAuth(data) {
  tag('auth_minute');
  authJourney(data);
}

// One subscriber: joins, subscribes to one product, holds for a random time (never past the
// end of the run), closes and waits for the server's close reply.
export function subscriber() {
  tag('minute');
  const left = (T0_MS + MINUTES * 60000 - Date.now()) / 1000;
  const hold = Math.min(HOLD_MIN_S + Math.random() * (HOLD_MAX_S - HOLD_MIN_S), Math.max(1, left - 1));
  const products = ['NIFTY', 'BANKNIFTY', 'FINNIFTY'];
  const ws = new WebSocket(WS_URL);
  let closing = false;
  let closed = false;
  ws.addEventListener('open', () => {
    ws.send(JSON.stringify({ action: 'subscribe', products: [products[exec.scenario.iterationInTest % 3]] }));
  });
  ws.addEventListener('message', (event) => {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch (_) {
      return;
    }
    if (message.type === 'tick') wsTicks.add(1);
    else if (message.type === 'subscribed') wsSubscribed.add(1);
  });
  ws.addEventListener('error', (event) => {
    // k6 refusing to pong a ping that crossed its own close is not the server's doing.
    if (closing && String(event.error).includes('close sent')) return;
    wsErrors.add(1);
    console.warn(`subscriber: ${event.error}`);
  });
  ws.addEventListener('close', () => {
    closed = true;
    if (!closing) wsUnexpectedCloses.add(1);
  });
  setTimeout(() => {
    closing = true;
    if (closed) return;
    ws.close();
    setTimeout(() => {
      if (!closed) {
        wsCloseUnanswered.add(1);
        closed = true;
      }
    }, CLOSE_GRACE_S * 1000);
  }, hold * 1000);
}

export function handleSummary(data) {
  return { [SUMMARY]: JSON.stringify(data, null, 2) };
}
