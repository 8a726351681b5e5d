//! End to end: the demo (three simulated services + the gateway, on free ports) and the
//! original walkthrough through the gateway, asserting shapes and values.

use deltastream_gateway::config::Config;
use deltastream_gateway::demo::{start_demo, DemoPorts};
use serde_json::{json, Value};

fn free_ports() -> DemoPorts {
    DemoPorts {
        gateway: 0,
        admin: 0,
        auth: 0,
        storage: 0,
        analytics: 0,
        socket: 0,
        // Three storage instances: the walkthrough's answers do not depend on which serves.
        storage_instances: 3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_walkthrough_through_the_gateway() {
    let mut cfg = Config::embedded();
    cfg.server.host = "127.0.0.1".parse().unwrap();
    let demo = start_demo(cfg, free_ports(), false)
        .await
        .expect("demo starts");
    let gw = demo.gateway.url();
    let c = reqwest::Client::new();
    let upstreams: Value = c
        .get(format!(
            "http://{}/admin/upstreams",
            demo.gateway.admin_addr
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let storage = upstreams["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["upstream"] == "storage")
        .unwrap()
        .clone();
    assert_eq!(
        storage["instances"].as_array().unwrap().len(),
        3,
        "{storage}"
    );

    let health: Value = c
        .get(format!("{gw}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        health,
        json!({"status": "healthy", "service": "api-gateway"})
    );

    let creds = json!({"email": "ada@example.com", "password": "correct-horse", "name": "Ada"});
    let r = c
        .post(format!("{gw}/api/auth/register"))
        .json(&creds)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let reg: Value = r.json().await.unwrap();
    assert_eq!(reg["message"], "User registered successfully");
    assert_eq!(reg["user"]["email"], "ada@example.com");
    let token = reg["token"].as_str().unwrap().to_string();

    // The token from register works on /api/user/me.
    let me: Value = c
        .get(format!("{gw}/api/user/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["email"], "ada@example.com");
    assert_eq!(me["user_id"], reg["user"]["id"]);

    let r = c
        .post(format!("{gw}/api/auth/login"))
        .json(&json!({"email": "ada@example.com", "password": "correct-horse"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let login: Value = r.json().await.unwrap();
    assert!(login["token"]
        .as_str()
        .is_some_and(|t| t.split('.').count() == 3));
    let r = c
        .post(format!("{gw}/api/auth/login"))
        .json(&json!({"email": "ada@example.com", "password": "wrong-password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Five NIFTY ticks, newest first.
    let ticks: Value = c
        .get(format!("{gw}/api/data/underlying/NIFTY?limit=5"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ticks["product"], "NIFTY");
    assert_eq!(ticks["count"], 5);
    let list = ticks["ticks"].as_array().unwrap();
    assert_eq!(list.len(), 5);
    let stamps: Vec<&str> = list
        .iter()
        .map(|t| t["timestamp"].as_str().unwrap())
        .collect();
    let mut sorted = stamps.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(stamps, sorted, "ticks must be newest first");

    let chain: Value = c
        .get(format!("{gw}/api/data/chain/NIFTY"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rows = chain["chain"].as_array().unwrap();
    assert!(!rows.is_empty());
    for side in ["call", "put"] {
        for field in [
            "bid",
            "ask",
            "last_price",
            "volume",
            "open_interest",
            "iv",
            "delta",
            "gamma",
            "theta",
            "vega",
        ] {
            assert!(rows[0][side][field].is_number(), "{side}.{field} missing");
        }
    }

    let products: Value = c
        .get(format!("{gw}/api/data/products"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let symbols: Vec<&str> = products["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["symbol"].as_str().unwrap())
        .collect();
    for s in ["NIFTY", "BANKNIFTY", "FINNIFTY"] {
        assert!(symbols.contains(&s));
    }

    // The PCR equals the ratio recomputed from the chain's open interest.
    let pcr: Value = c
        .get(format!("{gw}/api/analytics/pcr/NIFTY"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (call_oi, put_oi) = rows.iter().fold((0.0, 0.0), |(c, p), r| {
        (
            c + r["call"]["open_interest"].as_f64().unwrap(),
            p + r["put"]["open_interest"].as_f64().unwrap(),
        )
    });
    let expected = put_oi / call_oi;
    let got = pcr["pcr_oi"].as_f64().unwrap();
    assert!(
        (got - expected).abs() < 1e-3,
        "pcr {got} vs recomputed {expected}"
    );

    let surface: Value = c
        .get(format!("{gw}/api/analytics/volatility-surface/NIFTY"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        surface["iv"].as_array().unwrap().len(),
        surface["expiries"].as_array().unwrap().len()
    );
    assert!(!surface["atm_term_structure"].as_array().unwrap().is_empty());

    let docs: Value = c
        .get(format!("{gw}/api/docs"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(docs["paths"]["/api/analytics/pcr/{product}"].is_object());

    // Upstream errors pass through: unknown product is the storage service's own 404.
    let r = c
        .get(format!("{gw}/api/data/underlying/NOPE"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    demo.shutdown().await;
}
