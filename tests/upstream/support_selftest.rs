//! The fake upstream itself behaves as scripted (the other tests rely on it).
use crate::support;
use support::{FakeUpstream, Step};

#[tokio::test]
async fn fake_upstream_follows_its_script_and_records() {
    let up = FakeUpstream::builder()
        .statuses([503, 503])
        .then(Step::body(200, "text/plain", "ok"))
        .start()
        .await;
    let c = reqwest::Client::new();
    let mut got = vec![];
    for _ in 0..3 {
        got.push(
            c.get(format!("{}/x?a=1&a=2", up.url()))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(got, vec![503, 503, 200]);
    assert_eq!(up.hits(), 3);
    assert_eq!(up.last_request().unwrap().path_and_query, "/x?a=1&a=2");
    up.set_steps([Step::Reset]);
    assert!(c.get(up.url()).send().await.is_err());
    let refused = support::refused_addr().await;
    assert!(c
        .get(format!("http://{refused}/"))
        .send()
        .await
        .unwrap_err()
        .is_connect());
}
