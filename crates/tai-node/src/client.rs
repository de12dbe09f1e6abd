//! Client commands: they read the same config as the node to find its
//! operator address and admin token.

use std::fmt::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use tai_core::config::Config;

fn http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?)
}

async fn admin_get(config: &Config, path: &str) -> anyhow::Result<Value> {
    let url = format!("http://{}{path}", config.operator.listen);
    let resp = http()?
        .get(&url)
        .bearer_auth(&config.operator.admin_token)
        .send()
        .await
        .with_context(|| format!("cannot reach the node at {url} (is `tai serve` running?)"))?;
    let status = resp.status();
    let body: Value = resp
        .json()
        .await
        .context("the node answered with invalid JSON")?;
    if !status.is_success() {
        let msg = body["error"]["message"].as_str().unwrap_or("no message");
        bail!("{url}: {status}: {msg}");
    }
    Ok(body)
}

/// `tai tree`: the live supervision tree, drawn like `pstree`.
pub async fn tree(config: &Config, json: bool) -> anyhow::Result<i32> {
    let tree = admin_get(config, "/admin/tree").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&tree)?);
    } else {
        let mut out = String::new();
        draw(&tree, "", "", &mut out);
        print!("{out}");
    }
    Ok(0)
}

fn label(node: &Value) -> String {
    let mut s = format!(
        "{} [{}] {} restarts={}",
        node["name"].as_str().unwrap_or("?"),
        node["kind"].as_str().unwrap_or("?"),
        node["status"].as_str().unwrap_or("?"),
        node["restarts"].as_u64().unwrap_or(0),
    );
    if let Some(strategy) = node["strategy"].as_str() {
        let _ = write!(
            s,
            " {strategy} {}/{}s",
            node["intensity"].as_u64().unwrap_or(0),
            node["period_secs"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(state) = node["state"].as_str() {
        let _ = write!(s, " state={state}");
    }
    s
}

fn draw(node: &Value, first: &str, rest: &str, out: &mut String) {
    let _ = writeln!(out, "{first}{}", label(node));
    let children = node["children"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (i, child) in children.iter().enumerate() {
        let last = i + 1 == children.len();
        let (branch, indent) = if last {
            ("└─ ", "   ")
        } else {
            ("├─ ", "│  ")
        };
        draw(
            child,
            &format!("{rest}{branch}"),
            &format!("{rest}{indent}"),
            out,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_is_drawn_like_pstree() {
        let tree = serde_json::json!({
            "name": "tai_sup", "kind": "supervisor", "status": "running", "restarts": 0,
            "strategy": "rest_for_one", "intensity": 5, "period_secs": 60.0,
            "children": [
                {"name": "ingress_sup", "kind": "supervisor", "status": "running", "restarts": 1,
                 "strategy": "one_for_one", "intensity": 5, "period_secs": 10.0, "children": []},
                {"name": "processor_sup", "kind": "supervisor", "status": "running", "restarts": 0,
                 "strategy": "rest_for_one", "intensity": 5, "period_secs": 10.0, "children": [
                    {"name": "engine_sup", "kind": "supervisor", "status": "running", "restarts": 0,
                     "strategy": "simple_one_for_one", "intensity": 100, "period_secs": 10.0, "children": []}
                 ]}
            ]
        });
        let mut out = String::new();
        draw(&tree, "", "", &mut out);
        assert_eq!(
            out,
            "tai_sup [supervisor] running restarts=0 rest_for_one 5/60s\n\
             ├─ ingress_sup [supervisor] running restarts=1 one_for_one 5/10s\n\
             └─ processor_sup [supervisor] running restarts=0 rest_for_one 5/10s\n   \
             └─ engine_sup [supervisor] running restarts=0 simple_one_for_one 100/10s\n"
        );
    }
}
