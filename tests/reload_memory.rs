//! What a reload under traffic must give back (issue 25 item 8, README "Soak").
//!
//! The soak's resident memory rose with each reload for its first ~15 minutes. The cause was
//! glibc's malloc keeping the litter of each reload (README "Soak"), not objects left alive;
//! these tests keep it that way: every state and pipeline a reload replaced is dropped once
//! the requests that started on it are done, its background loops end and its pooled
//! connections close; and a reload that changes nothing the OpenAPI document says keeps the
//! document instead of rendering it again (the biggest part of that litter).
//!
//! A binary of its own: it counts the tasks alive in its runtime, which another test's
//! gateway in the same runtime would add to.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use deltastream_gateway::config::{Config, Dur};
use deltastream_gateway::routes::AppState;
use deltastream_gateway::upstream::Pipeline;
use support::gateway::{client, config_with_instances, spawn};
use support::FakeUpstream;

const RELOADS: usize = 20;
/// Clients sending requests back to back through the reloads.
const CLIENTS: usize = 8;

/// Storage's settings alternate between two timeouts, so that every reload replaces its
/// pipeline (new settings) while keeping its health (same addresses), as the soak's do. The
/// breaker's probe path gives each storage pipeline a background loop (ejected instances'
/// probes) that must end with it.
fn config(up: &FakeUpstream, reload: usize) -> Config {
    let mut cfg = config_with_instances("storage", &[up.url()]);
    let storage = cfg.upstreams.get_mut("storage").expect("storage");
    storage.timeout = Dur::from_secs(if reload.is_multiple_of(2) { 2 } else { 3 });
    storage.breaker.probe_path = Some("/health".into());
    storage.breaker.probe_interval = Dur::from_millis(100);
    cfg
}

fn pipeline(state: &AppState, name: &str) -> Arc<Pipeline> {
    let i = state.upstream_index(name).expect("a configured upstream");
    state.upstreams[i].pipeline.clone()
}

/// Polls `done` every 50 ms for up to `within`.
async fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// `CLIENTS` clients, each on its own keep-alive connection, sending requests back to back
/// until `stop` is set (checked between requests, which take milliseconds); returns how many
/// requests failed.
fn load(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            let (url, stop) = (url.clone(), stop.clone());
            clients.push(tokio::spawn(async move {
                let c = client();
                let mut failed = 0;
                while !stop.load(Ordering::Relaxed) {
                    match c.get(&url).timeout(Duration::from_secs(10)).send().await {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                        }
                        _ => failed += 1,
                    }
                }
                failed
            }));
        }
        let mut failed = 0;
        for c in clients {
            failed += c.await.expect("client task");
        }
        failed
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_traffic_leave_no_state_pipeline_task_or_connection_behind() {
    let up = FakeUpstream::ok().await;
    let gw = spawn(config(&up, 0)).await;
    let url = format!("{}/api/data/products", gw.url());

    // A first round of load and its end, so that the baseline has every connection, pool and
    // loop a steady gateway has.
    let stop = Arc::new(AtomicBool::new(false));
    let warm = load(url.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    assert_eq!(warm.await.unwrap(), 0, "warm-up requests failed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tasks_before = alive_tasks();

    let stop = Arc::new(AtomicBool::new(false));
    let running = load(url.clone(), stop.clone());
    let mut replaced: Vec<(Weak<AppState>, Weak<Pipeline>)> = Vec::new();
    for reload in 1..=RELOADS {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let state = gw.gateway.current();
        replaced.push((
            Arc::downgrade(&state),
            Arc::downgrade(&pipeline(&state, "storage")),
        ));
        drop(state);
        let report = gw
            .gateway
            .apply(config(&up, reload))
            .await
            .expect("the reload applies");
        assert!(
            report.changed.contains(&"upstreams".to_string()),
            "{report:?}"
        );
    }
    // Every reload replaced the storage pipeline (new settings).
    let current = Arc::downgrade(&pipeline(&gw.gateway.current(), "storage"));
    assert!(
        replaced.iter().all(|(_, p)| !p.ptr_eq(&current)),
        "every reload replaced the storage pipeline"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    assert_eq!(
        running.await.unwrap(),
        0,
        "requests failed across the reloads"
    );

    let states_gone = eventually(Duration::from_secs(5), || {
        replaced.iter().all(|(s, _)| s.strong_count() == 0)
    })
    .await;
    let alive_states = replaced
        .iter()
        .filter(|(s, _)| s.strong_count() > 0)
        .count();
    assert!(
        states_gone,
        "{alive_states} of {RELOADS} replaced states still alive"
    );
    let pipelines_gone = eventually(Duration::from_secs(5), || {
        replaced.iter().all(|(_, p)| p.strong_count() == 0)
    })
    .await;
    let alive_pipelines = replaced
        .iter()
        .filter(|(_, p)| p.strong_count() > 0)
        .count();
    assert!(
        pipelines_gone,
        "{alive_pipelines} of {RELOADS} replaced storage pipelines still alive"
    );

    // A replaced pipeline's probe loop ends at its next tick (100 ms) and its pool's
    // connections close with it: the tasks come back to what the steady gateway had. Each
    // leaked pipeline would keep at least its loop (20 tasks), each leaked pool its
    // connections' tasks on both sides.
    let mut tasks_after = alive_tasks();
    let settled = eventually(Duration::from_secs(5), || {
        tasks_after = alive_tasks();
        tasks_after <= tasks_before + 4
    })
    .await;
    assert!(
        settled,
        "tasks alive: {tasks_before} before the reloads, {tasks_after} after"
    );
    // The fake upstream sees the pools: the current pipelines' connections (at most one per
    // client) and none of the replaced ones'.
    let open = up.open_connections();
    assert!(
        open <= CLIENTS + 2,
        "{open} upstream connections open after {RELOADS} reloads"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_openapi_document_unless_what_it_says_changed() {
    let up = FakeUpstream::ok().await;
    let gw = spawn(config(&up, 0)).await;
    let before = gw.gateway.current();

    // An upstream's timeout is not in the document: the same bytes, not rendered again.
    gw.gateway.apply(config(&up, 1)).await.expect("reload");
    let after = gw.gateway.current();
    assert!(!Arc::ptr_eq(&before, &after), "a new state");
    assert_eq!(
        before.openapi.as_ptr(),
        after.openapi.as_ptr(),
        "the document was rendered again"
    );
    assert_eq!(before.openapi_etag, after.openapi_etag);

    // A new route is: the document is rendered again and names it, with a new validator.
    let mut cfg = config(&up, 1);
    let mut route = cfg
        .routes
        .iter()
        .find(|r| r.upstream.as_deref() == Some("storage"))
        .expect("a storage route")
        .clone();
    route.path = "/api/reload-memory/new".into();
    route.upstream = Some("storage".into());
    route.upstream_path = Some("/products".into());
    cfg.routes.push(route);
    gw.gateway.apply(cfg).await.expect("reload");
    let renamed = gw.gateway.current();
    assert_ne!(after.openapi.as_ptr(), renamed.openapi.as_ptr());
    assert_ne!(after.openapi_etag, renamed.openapi_etag);
    let doc: serde_json::Value = serde_json::from_slice(&renamed.openapi).unwrap();
    assert!(
        doc["paths"].get("/api/reload-memory/new").is_some(),
        "the new route is documented"
    );

    // And an upstream's 503 message, which the document quotes, is too.
    let mut cfg = config(&up, 1);
    cfg.upstreams
        .get_mut("storage")
        .unwrap()
        .unavailable_message = Some("Storage is resting".into());
    gw.gateway.apply(cfg).await.expect("reload");
    let resting = gw.gateway.current();
    assert_ne!(renamed.openapi_etag, resting.openapi_etag);
    assert!(String::from_utf8_lossy(&resting.openapi).contains("Storage is resting"));
    gw.shutdown().await;
}
