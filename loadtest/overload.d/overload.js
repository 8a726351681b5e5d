// Open-model load for loadtest/overload (k6 constant-arrival-rate): requests start on a fixed
// schedule whatever the latency of earlier ones, so a queue in front of a saturated upstream
// shows up as latency and refusals instead of silently slowing the arrivals down.
//
// Three scenarios, from one clock:
//   offered  RATE req/s for DURATION s      the overload (or not) under test
//   after    AFTER_RATE req/s for AFTER_S s demand back under capacity: how soon is it all 200?
//   health   HEALTH_RATE req/s to HEALTH_URL for the whole run: the proxy's own /health
// Every response is one sample of the trend `ovl` (latency in ms: k6's timings from waiting
// for a connection to the last body byte, connection set-up included), tagged with what the report needs: phase, status,
// the JSON error body's `reason`, whether Retry-After was present. Env (all required):
// URL, HEALTH_URL, RATE, DURATION, AFTER_RATE, AFTER_S, HEALTH_RATE, MAX_VUS, TIMEOUT_S.
import http from 'k6/http';
import exec from 'k6/execution';
import { Trend } from 'k6/metrics';

const ovl = new Trend('ovl', true);
const num = (name) => {
  const v = Number(__ENV[name]);
  if (!Number.isFinite(v)) throw new Error(`${name} must be a number, got ${__ENV[name]}`);
  return v;
};
const RATE = num('RATE');
const DURATION = num('DURATION');
const AFTER_RATE = num('AFTER_RATE');
const AFTER_S = num('AFTER_S');
const HEALTH_RATE = num('HEALTH_RATE');
const MAX_VUS = num('MAX_VUS');
const TIMEOUT = `${num('TIMEOUT_S')}s`;

function arrivals(rate, seconds, startSeconds, exec, maxVUs) {
  return {
    executor: 'constant-arrival-rate',
    rate,
    timeUnit: '1s',
    duration: `${seconds}s`,
    startTime: `${startSeconds}s`,
    // A VU is busy for a request's whole wait: the most that can be in flight is rate x
    // timeout. All of them are set up before the run: k6 creates VUs on demand too slowly
    // (measured: 1517 of 4800 arrivals dropped at 320 req/s with 640 pre-allocated), and a
    // dropped arrival is an open-model request never sent (counted, reported).
    preAllocatedVUs: maxVUs,
    maxVUs,
    gracefulStop: `${num('TIMEOUT_S') + 5}s`,
    exec,
  };
}

export const options = {
  discardResponseBodies: false,
  // No k6 summary thresholds: the report is computed from the samples (loadtest/overload).
  summaryTrendStats: ['p(50)', 'p(99)', 'max', 'count'],
  scenarios: {
    offered: arrivals(RATE, DURATION, 0, 'data', MAX_VUS),
    after: arrivals(AFTER_RATE, AFTER_S, DURATION, 'data', Math.max(50, AFTER_RATE * num('TIMEOUT_S'))),
    health: arrivals(HEALTH_RATE, DURATION + AFTER_S, 0, 'health', 50),
  },
};

function record(res, phase, started) {
  const tags = { phase, status: String(res.status) };
  if (res.status === 0) {
    tags.error = res.error_code ? String(res.error_code) : 'client';
  } else if (res.status !== 200) {
    tags.retry_after = res.headers['Retry-After'] !== undefined ? 'yes' : 'no';
    let reason = 'none';
    try {
      const body = JSON.parse(res.body);
      if (body && typeof body === 'object') {
        reason = typeof body.reason === 'string' ? body.reason : 'json_without_reason';
      }
    } catch (_) {
      reason = 'not_json';
    }
    tags.reason = reason;
  }
  const t = res.timings;
  const ms = t.blocked + t.connecting + t.tls_handshaking + t.sending + t.waiting + t.receiving;
  // A request that got no answer (client timeout, reset) has no timings: its wall time.
  ovl.add(res.status === 0 ? Date.now() - started : ms, tags);
}

export function data() {
  const started = Date.now();
  const res = http.get(__ENV.URL, { timeout: TIMEOUT, tags: { name: 'data' } });
  record(res, exec.scenario.name, started);
}

export function health() {
  const started = Date.now();
  const res = http.get(__ENV.HEALTH_URL, { timeout: TIMEOUT, tags: { name: 'health' } });
  record(res, 'health', started);
}
