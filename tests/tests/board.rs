//! The Andon board (SPEC §4, §8): sign-in by `?token=` into an HttpOnly
//! cookie, the live WebSocket, and the page rendered in a real browser
//! (headless Debian chromium, installed by scripts/test.sh): green with the
//! tree, red once a breaker opens. Screenshots go to tests/artifacts/.

use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};
use tai_tests::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn board_node(gw: &Gateway) -> Node {
    Node::start_with(
        &test_config(&format!(
            "[executors.gw]\nkind = \"webhook\"\nurl = \"{}\"\n\n[skus.hooked]\npolicies = []\nexecutor = \"gw\"\n",
            gw.url
        )),
        &[],
    )
}

/// The DOM of the board after its scripts ran, and a screenshot of it.
fn chromium(url: &str, screenshot: &std::path::Path) -> String {
    let common = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1400,1000",
        "--virtual-time-budget=1500",
    ];
    let chromium = |mode: &str| {
        let out = Command::new("chromium")
            .args(common)
            .arg(mode)
            .arg(url)
            .output()
            .expect("chromium (scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let dom = chromium("--dump-dom");
    chromium(&format!("--screenshot={}", screenshot.display()));
    assert!(
        std::fs::metadata(screenshot).map(|m| m.len()).unwrap_or(0) > 10_000,
        "a screenshot at {}",
        screenshot.display()
    );
    String::from_utf8_lossy(&dom.stdout).into_owned()
}

fn artifacts() -> std::path::PathBuf {
    let dir = workspace_root().join("tests/artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn the_board_signs_in_by_cookie_and_is_live_over_its_websocket() {
    let gw = Gateway::start().await;
    let node = board_node(&gw);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http.get(node.url("/board")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(node.url("/board?token=wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(node.url(&format!("/board?token={ADMIN_TOKEN}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/board");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    let pair = cookie.split(';').next().unwrap().to_string();
    // The cookie is not the admin token, and opens no admin endpoint.
    let value = pair.split_once('=').unwrap().1;
    assert!(!value.is_empty() && value != ADMIN_TOKEN, "{pair}");
    let r = http
        .get(node.url("/admin/tree"))
        .bearer_auth(value)
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let page = http
        .get(node.url("/board"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("\"status\":\"green\""));

    // The socket without the cookie is refused; with it, snapshots flow.
    let ws_url = format!("ws://{}/board/ws", node.operator);
    assert!(tokio_tungstenite::connect_async(&ws_url).await.is_err());
    let mut req = ws_url.as_str().into_client_request().unwrap();
    req.headers_mut().insert("cookie", pair.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut next = async || -> Value {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a snapshot within 10 s")
            .unwrap()
            .unwrap();
        serde_json::from_str(msg.to_text().unwrap()).unwrap()
    };
    let first = next().await;
    assert_eq!(first["status"], "green", "{first}");
    assert_eq!(first["tree"]["name"], "tai_sup");
    assert_eq!(first["breakers"][0]["name"], "gw");
    assert_eq!(first["queue"]["wip_limit"], 50);

    // A breaker opens: the board turns red, with the alert.
    let (status, _) = node.admin(Method::POST, "/admin/breakers/gw/melt").await;
    assert_eq!(status, 200);
    let end = Instant::now() + Duration::from_secs(10);
    let red = loop {
        let s = next().await;
        if s["status"] == "red" {
            break s;
        }
        assert!(Instant::now() < end, "never red: {s}");
    };
    assert!(
        red["reasons"][0]
            .as_str()
            .unwrap()
            .contains("breaker gw is open"),
        "{red}"
    );
    assert_eq!(red["breakers"][0]["state"], "open");
    assert!(
        red["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "breaker_open"),
        "{red}"
    );
}

#[tokio::test]
async fn a_real_browser_shows_green_with_the_tree_then_red() {
    let gw = Gateway::start().await;
    let node = board_node(&gw);
    let c = Client::new(&node, "acme", "acme-secret");
    for s in [
        entitlement("acme", "hooked", "e1"),
        signal(
            "acme",
            "hooked",
            "deploy",
            "d1",
            json!({"version": "1.2.3"}),
        ),
    ] {
        assert_eq!(c.post(&s).await.unwrap().status, 202);
    }
    assert_eq!(c.decided("d1").await["status"], "completed");
    let url = node.url(&format!("/board?token={ADMIN_TOKEN}"));
    let dir = artifacts();

    let dom = chromium(&url, &dir.join("board-green.png"));
    assert!(dom.contains("data-status=\"green\""), "{dom}");
    for name in [
        "tai_sup",
        "kanban_queue",
        "engine_router",
        "engine:acme:hooked",
    ] {
        assert!(
            dom.contains(&format!("data-name=\"{name}\"")),
            "{name} in the tree"
        );
    }
    assert!(dom.contains("action_successful"), "last actions: {dom}");
    // Engines by state, live or passive, and how many run.
    assert!(dom.contains("1 of them running now"), "{dom}");

    let (status, _) = node.admin(Method::POST, "/admin/breakers/gw/melt").await;
    assert_eq!(status, 200);
    let dom = chromium(&url, &dir.join("board-red.png"));
    assert!(dom.contains("data-status=\"red\""), "{dom}");
    assert!(dom.contains("breaker gw is open"), "{dom}");
}
