use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use dispatchd::simulate::{Options, run};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::support::{required_tool, test_config, wait_for_async};

pub(crate) fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn dashboards() -> Vec<(String, Value)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(repo("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let dashboard =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            found.push((
                path.file_name().unwrap().to_string_lossy().into_owned(),
                dashboard,
            ));
        }
    }
    assert_eq!(
        found.len(),
        3,
        "overview, dispatcher health, resilience and pipeline"
    );
    found
}

/// Every panel query of every dashboard, with Grafana's variables replaced for a direct query.
pub(crate) fn panel_queries() -> Vec<(String, String, String)> {
    let mut queries = Vec::new();
    for (file, dashboard) in dashboards() {
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "1m")
                    .replace("$instance", ".*")
                    .replace("$dispatcher_id", ".*");
                queries.push((
                    file.clone(),
                    panel["title"].as_str().unwrap().to_owned(),
                    expr,
                ));
            }
        }
    }
    queries
}

fn rule_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("alerts/dispatchd.rules.yml")).unwrap();
    let rules: Value = serde_yaml::from_str(&text).unwrap();
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .map(|r| {
            (
                r["alert"].as_str().unwrap().to_owned(),
                r["expr"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn dashboards_are_valid_with_unique_panel_ids_and_the_variables() {
    for (file, dashboard) in dashboards() {
        let ids: Vec<u64> = dashboard["panels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_u64().unwrap())
            .collect();
        let unique: HashSet<u64> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "{file}: panel ids are unique");
        let variables: Vec<&str> = dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert!(
            variables.contains(&"datasource") && variables.contains(&"instance"),
            "{file}: {variables:?}"
        );
        for panel in dashboard["panels"].as_array().unwrap() {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{file}: {}",
                panel["title"]
            );
        }
    }
}

/// The latency panels ask Prometheus for exemplars and link each to its trace in the data source
/// the `traces_datasource` variable picks; the provisioning example names the same label.
#[test]
fn latency_panels_show_exemplars_linked_to_their_traces() {
    let mut latency_panels = 0;
    for (file, dashboard) in dashboards() {
        for panel in dashboard["panels"].as_array().unwrap() {
            let targets = panel["targets"].as_array().cloned().unwrap_or_default();
            let latency = |t: &Value| {
                let expr = t["expr"].as_str().unwrap_or_default();
                expr.contains("dispatch_duration_seconds_bucket")
                    || expr.contains("dispatcher_execution_duration_seconds_bucket")
            };
            if !targets.iter().any(latency) {
                continue;
            }
            latency_panels += 1;
            let title = &panel["title"];
            for target in targets.iter().filter(|t| latency(t)) {
                assert_eq!(target["exemplar"], true, "{file}: {title}: {target}");
            }
            let links = panel["fieldConfig"]["defaults"]["links"].to_string();
            assert!(
                links.contains("${traces_datasource}")
                    && links.contains("${__data.fields.trace_id}"),
                "{file}: {title} links exemplars to their trace: {links}"
            );
            let variable = dashboard["templating"]["list"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == "traces_datasource")
                .unwrap_or_else(|| panic!("{file} has a traces_datasource variable"));
            assert_eq!(variable["type"], "datasource");
            assert_eq!(variable["query"], "tempo");
        }
    }
    assert!(
        latency_panels >= 2,
        "the dispatch and dispatcher latency panels"
    );
    let provisioning: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo("deploy/grafana-exemplars.yml")).unwrap(),
    )
    .unwrap();
    let destination = &provisioning["datasources"][0]["jsonData"]["exemplarTraceIdDestinations"][0];
    assert_eq!(destination["name"], "trace_id");
    assert_eq!(
        destination["datasourceUid"],
        provisioning["datasources"][1]["uid"]
    );
    let compose = std::fs::read_to_string(repo("docker-compose.yml")).unwrap();
    assert!(compose.contains("--enable-feature=exemplar-storage"));
}

/// Names of metrics in a PromQL expression: identifiers that start like dispatchd's metrics.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            // Label values are not metric names.
            quoted = !quoted;
            word.clear();
            continue;
        }
        if quoted {
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
            continue;
        }
        let labels: BTreeSet<String> = dispatchd::telemetry::catalog::ALL
            .iter()
            .flat_map(|spec| spec.exported_labels())
            .collect();
        let is_metric = [
            "dispatch_",
            "dispatcher_",
            "sink_",
            "bus_redis_",
            "otlp_",
            "trace_spans_",
            "http_server_",
            "metric_cardinality",
            "target_info",
        ]
        .iter()
        .any(|prefix| word.starts_with(prefix))
            && !labels.contains(word.as_str());
        if is_metric {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .unwrap_or(&word);
            names.insert(base.to_owned());
        }
        word.clear();
    }
    names
}

#[test]
fn every_metric_a_dashboard_or_rule_names_is_one_dispatchd_exports() {
    let exported: BTreeSet<String> = dispatchd::telemetry::catalog::ALL
        .iter()
        .map(|spec| spec.exported_name(""))
        .chain(["target_info".to_owned()])
        .collect();
    let mut used: Vec<(String, String)> = panel_queries()
        .into_iter()
        .map(|(file, title, expr)| (format!("{file}: {title}"), expr))
        .collect();
    used.extend(rule_exprs());
    let mut checked = 0;
    for (place, expr) in used {
        for name in metric_names(&expr) {
            assert!(
                exported.contains(&name),
                "{place} uses `{name}`, which dispatchd does not export"
            );
            checked += 1;
        }
    }
    assert!(checked > 40, "the scan found the metric names ({checked})");
}

/// Every alert links `docs/runbook.md#<its name in lower case>`, and that section exists.
#[test]
fn every_alert_links_its_section_of_the_runbook() {
    let text = std::fs::read_to_string(repo("alerts/dispatchd.rules.yml")).unwrap();
    let rules: Value = serde_yaml::from_str(&text).unwrap();
    let runbook = std::fs::read_to_string(repo("docs/runbook.md")).unwrap();
    let sections: BTreeSet<String> = runbook
        .lines()
        .filter_map(|line| line.strip_prefix("## "))
        .map(str::to_lowercase)
        .collect();
    let alerts: Vec<&Value> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert!(alerts.len() > 20, "{}", alerts.len());
    for alert in alerts {
        let name = alert["alert"].as_str().unwrap().to_lowercase();
        assert_eq!(
            alert["annotations"]["runbook_url"],
            format!("docs/runbook.md#{name}"),
            "{name}"
        );
        assert!(
            sections.contains(&name),
            "docs/runbook.md has no `## {name}`"
        );
    }
}

#[test]
fn promtool_accepts_the_rules_their_unit_tests_and_the_prometheus_config() {
    let Some(promtool) = required_tool("promtool") else {
        return;
    };
    let check = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(repo("alerts/dispatchd.rules.yml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let test = Command::new(&promtool)
        .args(["test", "rules"])
        .arg(repo("alerts/tests/dispatchd.test.yml"))
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );

    // The compose stack's config, with its rule path pointed at this checkout.
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(repo("deploy/prometheus.yml"))
        .unwrap()
        .replace(
            "/etc/prometheus/alerts/dispatchd.rules.yml",
            &repo("alerts/dispatchd.rules.yml").display().to_string(),
        );
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    let check = Command::new(&promtool)
        .args(["check", "config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    let compose: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo("docker-compose.yml")).unwrap())
            .unwrap();
    for service in ["dispatchd", "traffic", "prometheus", "grafana"] {
        assert!(
            compose["services"].get(service).is_some(),
            "compose has {service}"
        );
    }
}

/// A Prometheus of our own on a free loopback port, scraping each job's targets and evaluating
/// the shipped rules every second, stopped when dropped; and its base URL.
pub(crate) fn start_prometheus(
    binary: &Path,
    dir: &Path,
    jobs: &[(&str, &[String])],
) -> (crate::binary::Running, String) {
    start_prometheus_with(binary, dir, jobs, &[])
}

/// [`start_prometheus`] with extra command-line `flags` (`--enable-feature=…`).
pub(crate) fn start_prometheus_with(
    binary: &Path,
    dir: &Path,
    jobs: &[(&str, &[String])],
    flags: &[&str],
) -> (crate::binary::Running, String) {
    let port = crate::redis::free_port();
    let mut config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n",
        repo("alerts/dispatchd.rules.yml").display()
    );
    for (job, targets) in jobs {
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        config.push_str(&format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ));
    }
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    let child = Command::new(binary)
        .arg(format!("--config.file={}", path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .args(flags)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (
        crate::binary::Running(child),
        format!("http://127.0.0.1:{port}"),
    )
}

/// Waits, bounded, until Prometheus answers `expr` with the single value `value`.
pub(crate) async fn wait_for_value(client: &reqwest::Client, base: &str, expr: &str, value: &str) {
    wait_for_async(
        &format!("Prometheus to answer `{expr}` with {value}"),
        || async {
            let answer = client
                .get(format!("{base}/api/v1/query"))
                .query(&[("query", expr)])
                .send()
                .await;
            match answer {
                Ok(answer) => answer
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["data"]["result"][0]["value"][1] == value),
                Err(_) => false,
            }
        },
    )
    .await;
}

pub(crate) async fn query(client: &reqwest::Client, base: &str, expr: &str) -> Value {
    client
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_shows_data_and_the_stale_alert_fires_against_a_real_prometheus() {
    let Some(prometheus) = required_tool("prometheus") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    // The pipeline through Redis, so its panels have data too; short sink intervals.
    let redis_url = std::env::var("DISPATCHD_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("dispatchd-test:monitoring:{}", uuid::Uuid::new_v4());
    config.bus.redis = Some(dispatchd::config::RedisBusConfig {
        url: redis_url,
        max_len: None,
        consumer: Some("monitoring".into()),
        claim_idle: Duration::from_secs(2),
        consumer_retention: Duration::from_secs(3600),
        trim_every: Duration::from_secs(1),
        dead_letter: dir.path().join("bus.dead-letters.jsonl"),
    });
    config.bus.events_stream = format!("{prefix}:events");
    config.bus.outputs_prefix = format!("{prefix}:topic:");
    for sink in &mut config.sinks {
        sink.driver.flush_interval = Duration::from_millis(200);
    }
    config.health.stale_threshold = Duration::from_secs(8);
    for dispatcher in &mut config.dispatchers {
        dispatcher.stale_threshold = Duration::from_secs(8);
        dispatcher.heartbeat_interval = Duration::from_secs(1);
    }

    let stop = CancellationToken::new();
    let (serving, address) = tokio::sync::oneshot::channel();
    let options = Options {
        progress_every: Duration::from_secs(60),
        ..Options::new(100.0, Duration::from_secs(300))
    };
    let simulation = tokio::spawn(run(config, options, stop.clone(), Some(serving)));
    let address = address.await.expect("dispatchd serves");

    let (_prometheus, base) = start_prometheus(
        &prometheus,
        dir.path(),
        &[("dispatchd", &[address.to_string()])],
    );
    let client = reqwest::Client::new();
    wait_for_value(&client, &base, "up", "1").await;

    // Every panel: the query parses and returns at least one series. Some need the traffic to
    // have run a while (rates need two samples, the breaker a run of failures), so each waits,
    // with a bound.
    for (file, title, expr) in panel_queries() {
        let mut last = Value::Null;
        for _ in 0..60 {
            last = query(&client, &base, &expr).await;
            assert_eq!(
                last["status"], "success",
                "{file}: {title}: `{expr}` does not parse: {last}"
            );
            if last["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            last["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty()),
            "{file}: panel `{title}` shows nothing: `{expr}`"
        );
    }

    // A worker registers, never heartbeats, and the stale alert fires.
    let dispatchd = reqwest::Client::new();
    let registered = dispatchd
        .post(format!(
            "http://{address}/api/v1/dispatchers/doomed-worker/register"
        ))
        .json(&json!({"stale_threshold_seconds": 2, "critical": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 200);
    let mut fired = false;
    for _ in 0..60 {
        let alerts: Value = client
            .get(format!("{base}/api/v1/alerts"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        fired = alerts["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| {
                a["labels"]["alertname"] == "DispatchdDispatcherStale"
                    && a["labels"]["dispatcher_id"] == "doomed-worker"
                    && a["state"] == "firing"
            });
        if fired {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        fired,
        "DispatchdDispatcherStale fires for the worker that stopped heartbeating"
    );

    // simulate's mix is protections at work (rejections, denials, skips) and a few real
    // failures: the error-ratio page's expression stays below its threshold, while rejections
    // show under their own status.
    let rule = |alert: &str| {
        let (_, expr) = rule_exprs()
            .into_iter()
            .find(|(name, _)| name == alert)
            .unwrap();
        let (ratio, threshold) = expr.trim().rsplit_once('>').unwrap();
        (ratio.to_owned(), threshold.trim().parse::<f64>().unwrap())
    };
    let value = |answer: &Value| -> f64 {
        answer["data"]["result"][0]["value"][1]
            .as_str()
            .unwrap_or_else(|| panic!("a value: {answer}"))
            .parse()
            .unwrap()
    };
    let (errors, threshold) = rule("DispatchdHighErrorRatio");
    let error_ratio = value(&query(&client, &base, &errors).await);
    assert!(
        error_ratio < threshold,
        "the error ratio under simulate is {error_ratio}, over {threshold}: it would page"
    );
    let (rejections, _) = rule("DispatchdHighRejectionRatio");
    let rejection_ratio = value(&query(&client, &base, &rejections).await);
    assert!(rejection_ratio > 0.0, "rejections are counted as such");
    println!("under simulate: error ratio {error_ratio:.4}, rejection ratio {rejection_ratio:.4}");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), simulation)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Exemplars end to end: Prometheus with exemplar storage scrapes OpenMetrics from a dispatchd
/// whose dispatches are sampled, and `/api/v1/query_exemplars` answers with the trace ids the
/// callers sent, which the OTLP export carries too.
#[tokio::test]
async fn prometheus_stores_exemplars_that_name_the_exported_traces() {
    let Some(prometheus) = required_tool("prometheus") else {
        return;
    };
    let traced = crate::openmetrics::TracedApp::start().await;
    let sampled = crate::openmetrics::trace_ids(4);
    for trace_id in &sampled {
        traced.post_in_trace(trace_id, true).await;
    }
    let exported = traced.exported_trace_ids(&sampled).await;
    let dir = tempfile::tempdir().unwrap();
    let target = traced.addr.clone();
    let (_prometheus, base) = start_prometheus_with(
        &prometheus,
        dir.path(),
        &[("dispatchd", &[target])],
        &["--enable-feature=exemplar-storage"],
    );
    let client = reqwest::Client::new();
    wait_for_value(&client, &base, "up", "1").await;

    let stored = |histogram: &'static str| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let answer: Value = client
                .get(format!("{base}/api/v1/query_exemplars"))
                .query(&[
                    ("query", format!("{histogram}_bucket")),
                    ("start", (now - 600).to_string()),
                    ("end", (now + 60).to_string()),
                ])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(answer["status"], "success", "{answer}");
            answer["data"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|series| series["exemplars"].as_array().unwrap().clone())
                .map(|e| {
                    e["labels"]["trace_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect::<BTreeSet<String>>()
        }
    };
    for histogram in [
        "dispatch_duration_seconds",
        "dispatcher_execution_duration_seconds",
    ] {
        let mut found = BTreeSet::new();
        for _ in 0..100 {
            found = stored(histogram).await;
            if !found.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            !found.is_empty(),
            "Prometheus stored no exemplar of {histogram}"
        );
        for trace_id in &found {
            assert!(
                sampled.contains(trace_id),
                "{trace_id} of {histogram} is a trace a caller sent"
            );
            assert!(
                exported.contains(trace_id),
                "{trace_id} is exported over OTLP"
            );
        }
    }
    traced.stop().await;
}
