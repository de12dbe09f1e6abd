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

/// Calls the operator API with the admin token; a non-2xx answer is an
/// error carrying the node's message.
async fn admin(
    config: &Config,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let url = format!("http://{}{path}", config.operator.listen);
    let mut req = http()?
        .request(method, &url)
        .bearer_auth(&config.operator.admin_token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req
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

/// `println!` and `print!` that return a failed write instead of panicking:
/// a reader that went away (`tai tenants | head -1`) ends the command
/// quietly (see `main`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)
    }};
}
pub(crate) use outln;

async fn admin_get(config: &Config, path: &str) -> anyhow::Result<Value> {
    admin(config, reqwest::Method::GET, path, None).await
}

/// `tai tree`: the live supervision tree, drawn like `pstree`.
pub async fn tree(config: &Config, json: bool) -> anyhow::Result<i32> {
    let tree = admin_get(config, "/admin/tree").await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&tree)?)?;
    } else {
        let mut out = String::new();
        draw(&tree, "", "", &mut out);
        out!("{out}")?;
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

// ---- signed public API ------------------------------------------------------

fn tenant_secret<'a>(config: &'a Config, tenant: &str) -> anyhow::Result<&'a str> {
    config
        .tenants
        .iter()
        .find(|t| t.id == tenant)
        .and_then(|t| t.secrets.first())
        .map(String::as_str)
        .ok_or_else(|| anyhow::anyhow!("tenant {tenant:?} has no secret in the config"))
}

fn default_tenant(config: &Config) -> anyhow::Result<String> {
    config
        .tenants
        .first()
        .map(|t| t.id.clone())
        .ok_or_else(|| anyhow::anyhow!("no [[tenants]] in the config: pass --tenant"))
}

async fn signed(
    config: &Config,
    tenant: &str,
    method: reqwest::Method,
    path: &str,
    body: Vec<u8>,
) -> anyhow::Result<(u16, Value)> {
    let ts = (tai_core::signal::now_ms() / 1000).to_string();
    let sig = tai_ingress::auth::sign(
        tenant_secret(config, tenant)?.as_bytes(),
        &ts,
        method.as_str(),
        path,
        &body,
    );
    let url = format!("http://{}{path}", config.ingress.listen);
    let resp = http()?
        .request(method, &url)
        .header("content-type", "application/json")
        .header(tai_ingress::auth::TENANT, tenant)
        .header(tai_ingress::auth::TIMESTAMP, ts)
        .header(tai_ingress::auth::SIGNATURE, sig)
        .body(body)
        .send()
        .await
        .with_context(|| format!("cannot reach the node at {url} (is `tai serve` running?)"))?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

pub struct SendArgs {
    pub tenant: Option<String>,
    pub sku: String,
    pub kind: String,
    pub payload: Option<String>,
    pub id: Option<String>,
    pub critical: bool,
}

/// `tai send`: one signed signal; prints the node's answer.
pub async fn send(config: &Config, a: SendArgs) -> anyhow::Result<i32> {
    let tenant = match a.tenant {
        Some(t) => t,
        None => default_tenant(config)?,
    };
    let payload: Value = match &a.payload {
        Some(p) => serde_json::from_str(p).context("--payload must be JSON")?,
        None => Value::Object(Default::default()),
    };
    let mut body = serde_json::json!({
        "tenant_id": tenant, "sku_id": a.sku, "kind": a.kind, "critical": a.critical, "payload": payload,
    });
    if let Some(id) = a.id {
        body["id"] = Value::String(id);
    }
    let (status, answer) = signed(
        config,
        &tenant,
        reqwest::Method::POST,
        "/v1/signals",
        serde_json::to_vec(&body)?,
    )
    .await?;
    outln!("{}", serde_json::to_string(&answer)?)?;
    Ok(if (200..300).contains(&status) { 0 } else { 1 })
}

/// `tai status ID`: the signal's status and receipts.
pub async fn status(config: &Config, tenant: Option<String>, id: &str) -> anyhow::Result<i32> {
    let tenant = match tenant {
        Some(t) => t,
        None => default_tenant(config)?,
    };
    let (status, answer) = signed(
        config,
        &tenant,
        reqwest::Method::GET,
        &format!("/v1/signals/{id}"),
        Vec::new(),
    )
    .await?;
    outln!("{}", serde_json::to_string_pretty(&answer)?)?;
    Ok(if status == 200 { 0 } else { 1 })
}

// ---- operator API -------------------------------------------------------------

/// `tai tenants`: every engine, one line each.
pub async fn tenants(config: &Config, json: bool, state: Option<&str>) -> anyhow::Result<i32> {
    let path = match state {
        Some(s) => format!("/admin/tenants?state={s}"),
        None => "/admin/tenants".to_string(),
    };
    let list = admin_get(config, &path).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&list)?)?;
        return Ok(0);
    }
    outln!(
        "{:<20} {:<16} {:<16} {:>8} {:>8} {:>9} {:>8} {:>6}",
        "TENANT",
        "SKU",
        "STATE",
        "QUOTA",
        "ENTITLED",
        "POSTPONED",
        "RESTARTS",
        "LIVE"
    )?;
    // A JSON value's `Display` ignores widths: each is made a string first.
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "?".to_string(),
        v => v.to_string(),
    };
    for e in list.as_array().map(Vec::as_slice).unwrap_or_default() {
        outln!(
            "{:<20} {:<16} {:<16} {:>8} {:>8} {:>9} {:>8} {:>6}",
            text(&e["tenant_id"]),
            text(&e["sku_id"]),
            text(&e["state"]),
            text(&e["quota_remaining"]),
            text(&e["entitled"]),
            text(&e["postponed"]),
            text(&e["restarts"]),
            text(&e["active"]),
        )?;
    }
    Ok(0)
}

/// `tai halt|resume TENANT SKU`.
pub async fn halt_resume(
    config: &Config,
    halt: bool,
    tenant: &str,
    sku: &str,
    reason: Option<String>,
) -> anyhow::Result<i32> {
    let (verb, body) = if halt {
        (
            "halt",
            serde_json::json!({"reason": reason.unwrap_or_else(|| "operator halt (tai halt)".into())}),
        )
    } else {
        ("resume", serde_json::json!({}))
    };
    let path = format!("/admin/tenants/{tenant}/{sku}/{verb}");
    let info = admin(config, reqwest::Method::POST, &path, Some(body)).await?;
    outln!("{}", serde_json::to_string(&info)?)?;
    Ok(0)
}

// ---- receipts ---------------------------------------------------------------

pub struct ReceiptsArgs {
    pub tenant: Option<String>,
    pub verify: bool,
    pub export: Option<std::path::PathBuf>,
    pub data_dir: Option<std::path::PathBuf>,
    pub file: Option<std::path::PathBuf>,
}

fn print_report(report: &tai_core::receipt::VerifyReport) -> anyhow::Result<i32> {
    outln!("{}", serde_json::to_string(report)?)?;
    Ok(if report.ok { 0 } else { 1 })
}

/// One exported line: a receipt, or (last) the ledger's signed head.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum ExportLine {
    Head {
        signed_head: tai_core::receipt::SignedHead,
    },
    Receipt(Box<tai_core::receipt::Receipt>),
}

/// Verifies an exported file a line at a time (constant memory, whatever
/// its length); a line that is neither a receipt nor the head is an error.
fn verify_export(
    path: &std::path::Path,
    keys: &std::collections::BTreeMap<String, String>,
) -> anyhow::Result<tai_core::receipt::VerifyReport> {
    use std::io::BufRead;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut v = tai_core::receipt::ChainVerifier::new(keys);
    let mut head = None;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<ExportLine>(&line)
            .with_context(|| format!("{}:{}: not a receipt", path.display(), i + 1))?
        {
            ExportLine::Head { signed_head } => head = Some(signed_head),
            ExportLine::Receipt(r) => {
                v.push(&r);
            }
        }
    }
    Ok(v.finish_ledger(head.as_ref()))
}

/// Where listed or exported receipts go, one at a time: stdout, or an
/// export file written beside its name and renamed into place once whole
/// and synced (a failed export leaves no partial file and keeps an earlier
/// one; a crash or power cut after it leaves the whole export, not a name
/// whose bytes never reached the disk).
struct Sink {
    out: Box<dyn std::io::Write>,
    /// (the file being written, its final name).
    file: Option<(std::path::PathBuf, std::path::PathBuf)>,
    count: u64,
}

impl Sink {
    fn open(export: Option<&std::path::Path>) -> anyhow::Result<Sink> {
        let Some(path) = export else {
            return Ok(Sink {
                out: Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
                file: None,
                count: 0,
            });
        };
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = std::path::PathBuf::from(partial);
        let f = std::fs::File::create(&partial)
            .with_context(|| format!("cannot write {}", partial.display()))?;
        Ok(Sink {
            out: Box::new(std::io::BufWriter::new(f)),
            file: Some((partial, path.to_path_buf())),
            count: 0,
        })
    }

    fn line(&mut self, value: &impl serde::Serialize) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.out, value)?;
        self.out.write_all(b"\n")?;
        Ok(())
    }

    fn receipt(&mut self, r: &tai_core::receipt::Receipt) -> anyhow::Result<()> {
        self.count += 1;
        self.line(r)
    }

    /// An export ends with the signed head, then takes its name.
    fn finish(mut self, head: Option<tai_core::receipt::SignedHead>) -> anyhow::Result<i32> {
        let Some((partial, path)) = self.file.take() else {
            self.out.flush()?;
            return Ok(0);
        };
        let count = self.count;
        let written = (|| -> anyhow::Result<()> {
            if let Some(signed_head) = head {
                self.line(&ExportLine::Head { signed_head })?;
            }
            self.out.flush()?;
            Ok(())
        })()
        .and_then(|()| {
            drop(self);
            // Synced before it takes the name, and the name synced after.
            std::fs::File::open(&partial)?.sync_all()?;
            std::fs::rename(&partial, &path)?;
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            std::fs::File::open(dir)?.sync_all()?;
            Ok(())
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&partial);
            return Err(e.context(format!("cannot write {}", path.display())));
        }
        eprintln!("exported {count} receipts to {}", path.display());
        Ok(0)
    }
}

impl Drop for Sink {
    /// An export that did not finish leaves no partial file behind.
    fn drop(&mut self) {
        if let Some((partial, _)) = self.file.take() {
            let _ = std::fs::remove_file(partial);
        }
    }
}

/// `tai receipts`: list, export or verify, from a running node or offline
/// from its data dir (the node must be stopped: sled locks it) or an export.
/// Receipts are streamed, never all held: a ledger may hold millions.
pub async fn receipts(config: &Config, a: ReceiptsArgs) -> anyhow::Result<i32> {
    let keys = &config.andon.signing_keys;
    if let Some(file) = &a.file {
        return print_report(&verify_export(file, keys)?);
    }
    if let Some(dir) = &a.data_dir {
        let store = tai_store::Store::open_existing(dir).map_err(|e| {
            crate::store_check::not_opened(
                e,
                "a running node's receipts are read online, without --data-dir",
            )
        })?;
        if a.verify {
            return print_report(&tai_andon::verify_store(
                &store,
                keys,
                tai_andon::Extent::Whole,
            ));
        }
        let mut sink = Sink::open(a.export.as_deref())?;
        for block in store.receipt_blocks(0, a.tenant.as_deref()) {
            for r in block? {
                sink.receipt(&r)?;
            }
        }
        return sink.finish(store.head()?);
    }
    if a.verify {
        let report: tai_core::receipt::VerifyReport =
            serde_json::from_value(admin_get(config, "/admin/receipts/verify").await?)?;
        return print_report(&report);
    }
    // An export is the ledger as of its signed head, read first: receipts
    // the node adds while the pages are read come after it and are left
    // out, so the file ends with the head its last receipt matches.
    let head = match &a.export {
        Some(_) => {
            let answer = admin_get(config, "/admin/receipts/head").await?;
            let head: Option<tai_core::receipt::SignedHead> =
                serde_json::from_value(answer["signed_head"].clone())
                    .context("the node's signed head")?;
            Some(head)
        }
        None => None,
    };
    let upto = head.as_ref().map(|h| h.as_ref().map_or(0, |h| h.seq));
    let mut sink = Sink::open(a.export.as_deref())?;
    let mut after = 0u64;
    while upto.is_none_or(|upto| after < upto) {
        let mut path = format!("/admin/receipts?after_seq={after}&limit=1000");
        if let Some(t) = &a.tenant {
            path.push_str(&format!("&tenant={t}"));
        }
        let page: Vec<tai_core::receipt::Receipt> =
            serde_json::from_value(admin_get(config, &path).await?)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in page
            .iter()
            .filter(|r| upto.is_none_or(|upto| r.seq <= upto))
        {
            sink.receipt(r)?;
        }
    }
    sink.finish(head.flatten())
}
