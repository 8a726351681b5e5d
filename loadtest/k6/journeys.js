// DeltaStream journeys against a running gateway (`deltastream-gateway demo`), open model.
//
//   k6 run loadtest/k6/journeys.js                         # BASE_URL=http://127.0.0.1:8000
//   BASE_URL=http://127.0.0.1:8000 SCALE=2 k6 run loadtest/k6/journeys.js
//
// Scenarios (arrival rates are per second, multiplied by SCALE):
//   data_anon      constant-arrival-rate  GET underlying / chain / products, no token
//   data_auth      constant-arrival-rate  GET /api/user/me + a data read with a bearer token
//   analytics      ramping-arrival-rate   GET pcr / volatility-surface, ramping up then down
//   auth_journey   constant-arrival-rate  POST register (a fresh user) then login
// Thresholds fail the run (exit 99) on error rate or p95/p99 latency per journey.
// A JSON summary is written to SUMMARY (default loadtest/results/k6-summary.json).
//
// The demo's default rate-limit policies (100/min per IP, 10/min for auth) would answer
// most of this with 429: run the demo with loadtest/k6/demo.toml, which raises them.
import http from 'k6/http';
import { check, group } from 'k6';
import exec from 'k6/execution';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8000';
const SCALE = Number(__ENV.SCALE || 1);
const DURATION = __ENV.DURATION || '30s';
const PRODUCTS = ['NIFTY', 'BANKNIFTY', 'FINNIFTY'];
const JSON_HEADERS = { 'Content-Type': 'application/json' };

const rate = (n) => Math.max(1, Math.round(n * SCALE));

export const options = {
  discardResponseBodies: false,
  scenarios: {
    data_anon: {
      executor: 'constant-arrival-rate',
      exec: 'dataAnon',
      rate: rate(200), timeUnit: '1s', duration: DURATION,
      preAllocatedVUs: 20, maxVUs: 200,
      tags: { journey: 'data_anon' },
    },
    data_auth: {
      executor: 'constant-arrival-rate',
      exec: 'dataAuth',
      rate: rate(50), timeUnit: '1s', duration: DURATION,
      preAllocatedVUs: 10, maxVUs: 100,
      tags: { journey: 'data_auth' },
    },
    analytics: {
      executor: 'ramping-arrival-rate',
      exec: 'analytics',
      startRate: rate(5), timeUnit: '1s',
      preAllocatedVUs: 10, maxVUs: 100,
      stages: [
        { target: rate(50), duration: '10s' },
        { target: rate(50), duration: '10s' },
        { target: rate(5), duration: '10s' },
      ],
      tags: { journey: 'analytics' },
    },
    auth_journey: {
      executor: 'constant-arrival-rate',
      exec: 'authJourney',
      // Password hashing (argon2) makes these the expensive calls: a low, steady rate.
      rate: rate(2), timeUnit: '1s', duration: DURATION,
      preAllocatedVUs: 5, maxVUs: 50,
      tags: { journey: 'auth' },
    },
  },
  thresholds: {
    http_req_failed: ['rate<0.01'],
    checks: ['rate>0.99'],
    'http_req_duration{journey:data_anon}': ['p(95)<50', 'p(99)<150'],
    'http_req_duration{journey:data_auth}': ['p(95)<75', 'p(99)<200'],
    'http_req_duration{journey:analytics}': ['p(95)<150', 'p(99)<400'],
    'http_req_duration{journey:auth}': ['p(95)<1500', 'p(99)<3000'],
    dropped_iterations: ['count<50'],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

function product() {
  return PRODUCTS[Math.floor(Math.random() * PRODUCTS.length)];
}

function register(email, password) {
  return http.post(`${BASE}/api/auth/register`,
    JSON.stringify({ email, password, name: 'Load Test' }),
    { headers: JSON_HEADERS, tags: { name: 'POST /api/auth/register' } });
}

function login(email, password) {
  return http.post(`${BASE}/api/auth/login`, JSON.stringify({ email, password }),
    { headers: JSON_HEADERS, tags: { name: 'POST /api/auth/login' } });
}

// One user for the authenticated reads, registered once before the load starts.
export function setup() {
  const email = `k6-${Date.now()}@example.com`;
  const password = 'correct-horse-battery';
  const r = register(email, password);
  check(r, { 'setup: register 200/201': (x) => x.status === 200 || x.status === 201 });
  const l = login(email, password);
  check(l, { 'setup: login 200': (x) => x.status === 200 });
  return { token: l.status === 200 ? l.json('token') : '' };
}

export function dataAnon() {
  const p = product();
  const pick = Math.random();
  let r;
  if (pick < 0.4) {
    r = http.get(`${BASE}/api/data/underlying/${p}?limit=50`, { tags: { name: 'GET /api/data/underlying/{product}' } });
  } else if (pick < 0.8) {
    r = http.get(`${BASE}/api/data/chain/${p}`, { tags: { name: 'GET /api/data/chain/{product}' } });
  } else {
    r = http.get(`${BASE}/api/data/products`, { tags: { name: 'GET /api/data/products' } });
  }
  check(r, { 'data: 200': (x) => x.status === 200 });
}

export function dataAuth(data) {
  const auth = { headers: { Authorization: `Bearer ${data.token}` } };
  group('authenticated', () => {
    const me = http.get(`${BASE}/api/user/me`, Object.assign({ tags: { name: 'GET /api/user/me' } }, auth));
    check(me, { 'me: 200 with user_id': (x) => x.status === 200 && !!x.json('user_id') });
    const r = http.get(`${BASE}/api/data/underlying/${product()}`,
      Object.assign({ tags: { name: 'GET /api/data/underlying/{product}' } }, auth));
    check(r, { 'auth data: 200': (x) => x.status === 200 });
  });
}

export function analytics() {
  const p = product();
  const r = Math.random() < 0.5
    ? http.get(`${BASE}/api/analytics/pcr/${p}`, { tags: { name: 'GET /api/analytics/pcr/{product}' } })
    : http.get(`${BASE}/api/analytics/volatility-surface/${p}`, { tags: { name: 'GET /api/analytics/volatility-surface/{product}' } });
  check(r, { 'analytics: 200': (x) => x.status === 200 });
}

export function authJourney() {
  const email = `k6-${exec.vu.idInTest}-${exec.scenario.iterationInTest}-${Date.now()}@example.com`;
  const password = 'correct-horse-battery';
  const r = register(email, password);
  check(r, { 'register: 200/201': (x) => x.status === 200 || x.status === 201 });
  const l = login(email, password);
  check(l, { 'login: 200 with token': (x) => x.status === 200 && !!x.json('token') });
}

export function handleSummary(data) {
  const out = __ENV.SUMMARY || 'loadtest/results/k6-summary.json';
  const m = data.metrics;
  const line = (name) => {
    const v = m[name] && m[name].values;
    return v ? `${name}: p95=${(v['p(95)'] || 0).toFixed(1)}ms p99=${(v['p(99)'] || 0).toFixed(1)}ms` : '';
  };
  const text = [
    `requests: ${m.http_reqs.values.count} (${m.http_reqs.values.rate.toFixed(1)}/s), failed: ${(m.http_req_failed.values.rate * 100).toFixed(2)}%`,
    line('http_req_duration{journey:data_anon}'),
    line('http_req_duration{journey:data_auth}'),
    line('http_req_duration{journey:analytics}'),
    line('http_req_duration{journey:auth}'),
    `thresholds: ${Object.entries(m).filter(([, v]) => v.thresholds && Object.values(v.thresholds).some((t) => !t.ok)).map(([k]) => k).join(', ') || 'all passed'}`,
  ].filter(Boolean).join('\n');
  return { stdout: text + '\n', [out]: JSON.stringify(data, null, 2) };
}
