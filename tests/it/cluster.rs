//! The fleet as docs/cluster.md runs it, from that page's own configuration and HAProxy snippet:
//! three `serve` processes and two `dispatchd sink` processes on one Redis of our own, load through
//! HAProxy, a worker registered through one instance and heartbeating through the balancer (so
//! through the others), SIGKILL of one serve and one sink mid-run, the killed serve restarted, and
//! a real Prometheus scraping all five with the shipped rules.
//!
//! It shows: every dispatch answered 200 has its event delivered, with duplicates bounded as
//! docs/pipeline.md says; every instance answers the same for every worker and stays ready; the
//! stale worker's alert fires once for the fleet, the killed instance's alert is on its way, and no
//! other alert fires; the dashboards count each dispatcher and worker once, not once per instance.
//! And the page's nginx snippet, run by nginx in front of one instance and a dead address.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::binary::{BINARY, Running, started_keeping_log};
use crate::monitoring::{panel_queries, query, repo, start_prometheus, wait_for_value};
use crate::redis::{delivered, free_port, own_redis};
use crate::support::{required_tool, wait_for, wait_for_async};

/// Events per batch of each sink process: the bound on duplicates is a few of these.
const BATCH: usize = 50;

/// The fenced block of docs/cluster.md whose info string is `info`.
fn snippet(info: &str) -> String {
    let page = std::fs::read_to_string(repo("docs/cluster.md")).unwrap();
    let start = page
        .find(&format!("```{info}\n"))
        .unwrap_or_else(|| panic!("docs/cluster.md has a ```{info} block"));
    let body = &page[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("```").unwrap()].to_owned()
}

/// docs/cluster.md's fleet configuration, on our Redis.
fn fleet_config(url: &str) -> String {
    let config = snippet(r#"toml title="fleet.toml""#);
    assert!(config.contains("redis://10.0.0.5:6379"), "{config}");
    config.replace("redis://10.0.0.5:6379", url)
}

/// docs/cluster.md's HAProxy configuration, listening on `port`, in front of `instances`.
fn haproxy_config(port: u16, instances: &[String]) -> String {
    let mut config = snippet(r#"haproxy title="haproxy.cfg""#);
    assert!(config.contains("bind 0.0.0.0:9000"), "{config}");
    config = config.replace("bind 0.0.0.0:9000", &format!("bind 127.0.0.1:{port}"));
    for (n, addr) in instances.iter().enumerate() {
        let documented = format!("10.0.0.1{}:9000", n + 1);
        assert!(config.contains(&documented), "{config}");
        config = config.replace(&documented, addr);
    }
    config
}

/// A `serve` of the fleet on `port`, in its own directory (its files are its own), and its address.
fn serve(config: &Path, dir: &Path, port: u16) -> (Running, String) {
    std::fs::create_dir_all(dir).unwrap();
    let child = Command::new(BINARY)
        .args(["serve", "--config"])
        .arg(config)
        .current_dir(dir)
        .env("DISPATCHD_LISTEN", format!("127.0.0.1:{port}"))
        .env("DISPATCHD_LOG", "info,dispatchd::dispatchers=warn")
        .env_remove("DISPATCHD_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("dispatchd serve starts");
    let (running, addr, _) = started_keeping_log(child);
    (running, addr)
}

/// A `dispatchd sink` writing the group's events to `out`; its consumer name is its default (the
/// host name and its port), so the two on this host are two consumers.
fn sink(url: &str, stream: &str, out: &Path, dead: &Path) -> (Running, String) {
    let child = Command::new(BINARY)
        .args([
            "sink",
            "--service",
            "file",
            "--name",
            "events",
            "--group",
            "fleet",
        ])
        .arg("--endpoint")
        .arg(out)
        .arg("--dead-letter")
        .arg(dead)
        .args([
            "--batch-size",
            &BATCH.to_string(),
            "--flush-interval",
            "50ms",
        ])
        .args(["--claim-idle", "2s", "--listen", "127.0.0.1:0"])
        .args(["--bus", url, "--stream", stream])
        .env("DISPATCHD_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("dispatchd sink starts");
    let (running, addr, _) = started_keeping_log(child);
    (running, addr)
}

/// A POST through the balancer at `base`; `None` when the connection failed.
async fn post(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    body: Option<&Value>,
) -> Option<(StatusCode, Value)> {
    let mut request = client.post(format!("{base}{path}"));
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.ok()?;
    let status = response.status();
    Some((status, response.json().await.unwrap_or(Value::Null)))
}

/// `GET url`, answered as JSON.
async fn get(client: &reqwest::Client, url: &str) -> Value {
    let response = client.get(url).send().await.unwrap();
    response.json().await.unwrap()
}

/// The remote workers an instance lists, with what it says of their health.
async fn workers(client: &reqwest::Client, addr: &str) -> BTreeMap<String, (Value, Value)> {
    let list = get(client, &format!("http://{addr}/api/v1/dispatchers")).await;
    list["dispatchers"]
        .as_array()
        .unwrap_or_else(|| panic!("a list from {addr}: {list}"))
        .iter()
        .filter(|d| d["origin"] == "remote")
        .map(|d| {
            (
                d["dispatcher_id"].as_str().unwrap().to_owned(),
                (d["healthy"].clone(), d["is_stale"].clone()),
            )
        })
        .collect()
}

/// The alerts Prometheus has, pending or firing.
async fn alerts(client: &reqwest::Client, base: &str) -> Vec<Value> {
    let answer = get(client, &format!("{base}/api/v1/alerts")).await;
    answer["data"]["alerts"].as_array().unwrap().clone()
}

/// The single value of an instant query.
async fn scalar(client: &reqwest::Client, base: &str, expr: &str) -> Option<f64> {
    let answer = query(client, base, expr).await;
    let result = answer["data"]["result"].as_array()?;
    assert!(result.len() <= 1, "`{expr}` is one series: {answer}");
    result.first()?["value"][1].as_str()?.parse().ok()
}

/// The query of the dashboard panel whose title starts with `title` (its first target).
fn panel(title: &str) -> String {
    panel_queries()
        .into_iter()
        .find(|(_, panel, _)| panel.starts_with(title))
        .unwrap_or_else(|| panic!("a panel titled {title}"))
        .2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_and_two_sinks_behave_as_one_service_through_kills_and_a_restart() {
    let Some(prometheus) = required_tool("prometheus") else {
        return;
    };
    let Some(haproxy) = required_tool("haproxy") else {
        return;
    };
    let Some((_redis, url)) = own_redis().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The defaults' stream name: the Redis is ours alone.
    let stream = "dispatchd:events";
    let config = dir.path().join("fleet.toml");
    std::fs::write(&config, fleet_config(&url)).unwrap();

    // Fixed ports, so the restarted instance comes back where the balancer and Prometheus look.
    let ports = [free_port(), free_port(), free_port()];
    let mut serves: Vec<Option<Running>> = Vec::new();
    let mut instances = Vec::new();
    for (n, port) in ports.iter().enumerate() {
        let (running, addr) = serve(&config, &dir.path().join(format!("serve-{n}")), *port);
        serves.push(Some(running));
        instances.push(addr);
    }
    let outs = [
        dir.path().join("sink-0.jsonl"),
        dir.path().join("sink-1.jsonl"),
    ];
    let mut sinks = Vec::new();
    let mut sink_addrs = Vec::new();
    for (n, out) in outs.iter().enumerate() {
        let dead = dir.path().join(format!("sink-{n}.dead-letters.jsonl"));
        let (running, addr) = sink(&url, stream, out, &dead);
        sinks.push(Some(running));
        sink_addrs.push(addr);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for addr in &instances {
        wait_for_async("every instance to be ready", || async {
            client
                .get(format!("http://{addr}/ready"))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
        })
        .await;
    }

    // HAProxy with docs/cluster.md's configuration in front of the three.
    let haproxy_port = free_port();
    let haproxy_config_path = dir.path().join("haproxy.cfg");
    std::fs::write(
        &haproxy_config_path,
        haproxy_config(haproxy_port, &instances),
    )
    .unwrap();
    let checked = Command::new(&haproxy)
        .arg("-c")
        .arg("-f")
        .arg(&haproxy_config_path)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "haproxy -c accepts docs/cluster.md's configuration: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let _haproxy = Running(
        Command::new(&haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&haproxy_config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let balancer = format!("http://127.0.0.1:{haproxy_port}");
    wait_for_async("HAProxy to send to the instances", || async {
        client
            .get(format!("{balancer}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
    })
    .await;

    // A real Prometheus with the shipped rules, scraping the three instances and the two sinks.
    let (_prometheus, base) = start_prometheus(
        &prometheus,
        dir.path(),
        &[("dispatchd", &instances), ("dispatchd-sink", &sink_addrs)],
    );
    wait_for_value(&client, &base, "count(up == 1)", "5").await;

    // A critical worker registers through the first instance and heartbeats through the other
    // two in turn, directly (through the balancer, its heartbeats would fall in step with the
    // load's round robin and land on one instance): while one is down, through the one left.
    let (status, body) = post(
        &client,
        &format!("http://{}", instances[0]),
        "/api/v1/dispatchers/fleet-worker/register",
        Some(&json!({"stale_threshold_seconds": 3, "critical": true})),
    )
    .await
    .expect("the first instance answers");
    assert_eq!(status, StatusCode::OK, "{body}");
    let stop = Arc::new(AtomicBool::new(false));
    let heartbeats = {
        let others = [
            format!("http://{}", instances[1]),
            format!("http://{}", instances[2]),
        ];
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut refused, mut slow) = (Vec::new(), 0);
            let mut tick = tokio::time::interval(Duration::from_millis(300));
            for turn in 0.. {
                tick.tick().await;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let path = "/api/v1/dispatchers/fleet-worker/heartbeat";
                let first = post(&client, &others[turn % 2], path, None).await;
                let answer = match first {
                    Some(answer) => Some(answer),
                    None => post(&client, &others[(turn + 1) % 2], path, None).await,
                };
                match answer {
                    Some((StatusCode::OK, _)) => {}
                    // Redis slower than the registry's 1 s bound (a loaded machine): the
                    // instance says so, and the worker's next heartbeat goes through.
                    Some((StatusCode::SERVICE_UNAVAILABLE, body))
                        if body["error"]["code"] == "registry_unavailable" =>
                    {
                        slow += 1;
                    }
                    other => refused.push(format!("{other:?}")),
                }
            }
            (refused, slow)
        })
    };

    // The load: order events spread over the three; what was answered 200 must be delivered.
    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    let sent = Arc::new(AtomicUsize::new(0));
    let load = {
        let (client, balancer, stop) = (client.clone(), balancer.clone(), stop.clone());
        let (accepted, sent) = (accepted.clone(), sent.clone());
        tokio::spawn(async move {
            let (mut other, mut cut) = (Vec::new(), false);
            let mut tick = tokio::time::interval(Duration::from_millis(4));
            for turn in 0.. {
                tick.tick().await;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let body = json!({"message_type": "order.placed", "payload": {"n": turn}});
                let path = "/api/v1/messages/shop.orders.events";
                match post(&client, &balancer, path, Some(&body)).await {
                    Some((StatusCode::OK, result)) => {
                        let id = result["dispatch_id"].as_str().unwrap().to_owned();
                        accepted.lock().unwrap().insert(id);
                    }
                    // One message at a time: only the one in flight on the instance killed
                    // may fail (HAProxy's 502, or the connection to HAProxy closed); it was not
                    // accepted. A refused connection HAProxy sends to another instance
                    // (`retry-on conn-failure`).
                    Some((StatusCode::BAD_GATEWAY, _)) | None if !cut => cut = true,
                    answer => other.push(format!("{answer:?}")),
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            other
        })
    };
    let accepted_reach = |count: usize| {
        let accepted = accepted.clone();
        move || accepted.lock().unwrap().len() >= count
    };
    wait_for("300 dispatches accepted", accepted_reach(300)).await;

    // SIGKILL of the second instance and of the first sink, under load.
    drop(serves[1].take());
    drop(sinks[0].take());
    let killed = &instances[1];
    wait_for_async("the killed instance's alert to be on its way", || async {
        alerts(&client, &base).await.iter().any(|a| {
            a["labels"]["alertname"] == "DispatchdTargetDown"
                && a["labels"]["instance"] == killed.as_str()
                && a["state"] == "pending"
        })
    })
    .await;
    wait_for("600 dispatches accepted", accepted_reach(600)).await;

    // The killed instance restarts where it was, and has lost nothing: it knows the worker.
    let (running, addr) = serve(&config, &dir.path().join("serve-1"), ports[1]);
    assert_eq!(&addr, killed);
    serves[1] = Some(running);
    let known = get(
        &client,
        &format!("http://{killed}/api/v1/dispatchers/fleet-worker"),
    )
    .await;
    assert_eq!(
        (&known["healthy"], &known["is_stale"]),
        (&json!(true), &json!(false)),
        "the restarted instance knows the live worker: {known}"
    );

    // A second critical worker registers through the third instance and never heartbeats.
    let (status, body) = post(
        &client,
        &format!("http://{}", instances[2]),
        "/api/v1/dispatchers/silent-worker/register",
        Some(&json!({"stale_threshold_seconds": 2, "critical": true})),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for("900 dispatches accepted", accepted_reach(900)).await;

    // Its alert fires once for the fleet (not once per instance), for it alone.
    wait_for_async(
        "DispatchdDispatcherStale to fire for the silent worker",
        || async {
            alerts(&client, &base).await.iter().any(|a| {
                a["labels"]["alertname"] == "DispatchdDispatcherStale"
                    && a["labels"]["dispatcher_id"] == "silent-worker"
                    && a["state"] == "firing"
            })
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (refused, slow) = heartbeats.await.unwrap();
    assert!(
        refused.is_empty(),
        "every heartbeat, through whichever instance, was taken (no instance said 404): {refused:?}"
    );
    println!("{slow} heartbeats answered registry_unavailable (Redis slower than 1 s)");
    let other = load.await.unwrap();
    assert!(
        other.is_empty(),
        "every message but one in flight at the kill was answered 200: {other:?}"
    );
    // The heartbeats went through the instances the worker did not register through (the
    // restarted one counts those since its start).
    for addr in &instances[1..] {
        let metrics = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let counted: f64 = metrics
            .lines()
            .filter(|line| {
                line.starts_with("dispatcher_heartbeat_total{")
                    && line.contains(r#"dispatcher_id="fleet-worker""#)
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(
            counted > 0.0,
            "{addr} took heartbeats of the worker registered on another instance"
        );
    }
    let accepted = accepted.lock().unwrap().clone();
    println!(
        "{} messages sent, {} accepted",
        sent.load(Ordering::Relaxed),
        accepted.len()
    );

    // Every accepted dispatch's event is delivered by the surviving sink or the one killed
    // before it; the killed sink's pending entries are claimed. Duplicates: a few batches.
    let union = || {
        let mut all = BTreeMap::<String, usize>::new();
        for out in &outs {
            for (id, count) in delivered(out) {
                *all.entry(id).or_default() += count;
            }
        }
        all
    };
    wait_for("every accepted dispatch's event to be delivered", || {
        let all = union();
        accepted.iter().all(|id| all.contains_key(id))
    })
    .await;
    // And acknowledged: nothing stays pending in the group, the killed sink's entries included.
    wait_for_async("every entry to be acknowledged", || async {
        let mut redis = ::redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let pending: ::redis::streams::StreamPendingReply =
            ::redis::AsyncCommands::xpending(&mut redis, stream, "fleet")
                .await
                .unwrap();
        pending.count() == 0
    })
    .await;
    let all = union();
    let duplicates: usize = all.values().map(|count| count - 1).sum();
    println!("delivered {} events, {duplicates} duplicates", all.len());
    assert!(
        duplicates <= 3 * BATCH,
        "duplicates are at most the killed sink's unacknowledged batches: {duplicates}"
    );

    // Every instance says the same of every worker, and a stale critical worker makes none of
    // them unready.
    let seen = workers(&client, &instances[0]).await;
    assert_eq!(seen["fleet-worker"], (json!(true), json!(false)));
    assert_eq!(seen["silent-worker"], (json!(false), json!(true)));
    for addr in &instances[1..] {
        assert_eq!(workers(&client, addr).await, seen, "{addr} agrees");
    }
    for addr in &instances {
        let ready = client
            .get(format!("http://{addr}/ready"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), StatusCode::OK, "{addr} stays ready");
    }

    // The alerts: the silent worker's fires once, without an instance (it is the fleet's); nothing
    // else fires, and nothing at all is said of the live worker.
    let now = alerts(&client, &base).await;
    let stale: Vec<&Value> = now
        .iter()
        .filter(|a| a["labels"]["alertname"] == "DispatchdDispatcherStale")
        .collect();
    assert_eq!(stale.len(), 1, "one stale alert for the fleet: {stale:?}");
    assert_eq!(stale[0]["labels"]["dispatcher_id"], "silent-worker");
    assert!(
        stale[0]["labels"].get("instance").is_none(),
        "{:?}",
        stale[0]
    );
    let false_alerts: Vec<&Value> = now
        .iter()
        .filter(|a| {
            a["state"] == "firing" && a["labels"]["alertname"] != "DispatchdDispatcherStale"
        })
        .collect();
    assert!(
        false_alerts.is_empty(),
        "no other alert fires: {false_alerts:?}"
    );
    assert!(
        !now.iter()
            .any(|a| a["labels"]["dispatcher_id"] == "fleet-worker"),
        "nothing alerts on the live worker: {now:?}"
    );

    // The live worker was never stale on any instance, at any scrape.
    let ever_stale = query(
        &client,
        &base,
        r#"max_over_time(dispatcher_health_status{dispatcher_id="fleet-worker", is_stale="true"}[10m])"#,
    )
    .await;
    assert_eq!(
        ever_stale["data"]["result"],
        json!([]),
        "the live worker was never seen stale: {ever_stale}"
    );

    // Every panel's query is valid over the three instances (the single-instance test in
    // monitoring.rs shows each one with data under `simulate`).
    for (file, title, expr) in panel_queries() {
        let answer = query(&client, &base, &expr).await;
        assert_eq!(
            answer["status"], "success",
            "{file}: {title}: `{expr}`: {answer}"
        );
    }

    // The dashboards count across the instances: the two default dispatchers and the two
    // workers once each (not once per instance: 6 and 6 before), and one stale worker (not 3).
    let mut counted = (None, None);
    for _ in 0..100 {
        counted = (
            scalar(&client, &base, &panel("Active dispatchers")).await,
            scalar(&client, &base, &panel("Stale dispatchers")).await,
        );
        if counted == (Some(4.0), Some(1.0)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        counted,
        (Some(4.0), Some(1.0)),
        "the dashboards' active dispatchers and stale workers, over three instances"
    );
}

/// docs/cluster.md's nginx snippet, run by nginx itself, in front of a dispatchd and an address
/// where nothing listens: nginx accepts the configuration, and every POST is answered by the live
/// instance, the refused connections retried there (`proxy_next_upstream error`) and the dead
/// address then skipped (`max_fails=1`).
#[tokio::test]
async fn nginx_from_the_docs_sends_every_post_past_an_instance_that_refuses() {
    let Some(nginx) = required_tool("nginx") else {
        return;
    };
    let app = crate::support::TestApp::start().await;
    let dead = free_port();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut upstreams = snippet("nginx");
    for (documented, ours) in [
        (
            "listen 9000;".to_owned(),
            format!("listen 127.0.0.1:{port};"),
        ),
        ("10.0.0.11:9000".to_owned(), format!("127.0.0.1:{dead}")),
        ("10.0.0.12:9000".to_owned(), app.addr.to_string()),
        ("10.0.0.13:9000".to_owned(), format!("127.0.0.1:{dead}")),
    ] {
        assert!(upstreams.contains(&documented), "{documented}: {upstreams}");
        upstreams = upstreams.replace(&documented, &ours);
    }
    // What a distribution's nginx.conf around the snippet provides, in our directory.
    let root = dir.path().display();
    let config = format!(
        "pid {root}/nginx.pid;\nerror_log {root}/error.log;\nevents {{}}\nhttp {{\n\
         access_log off;\nclient_body_temp_path {root}/body;\nproxy_temp_path {root}/proxy;\n\
         fastcgi_temp_path {root}/fastcgi;\nuwsgi_temp_path {root}/uwsgi;\n\
         scgi_temp_path {root}/scgi;\n{upstreams}}}\n"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, config).unwrap();
    let checked = Command::new(&nginx)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&path)
        .arg("-t")
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "nginx -t accepts docs/cluster.md's configuration: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let _nginx = Running(
        Command::new(&nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off; master_process off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx starts"),
    );
    let balancer = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_for_async("nginx to listen", || {
        let client = client.clone();
        let url = format!("{balancer}/health");
        async move { client.get(url).send().await.is_ok() }
    })
    .await;
    for n in 0..9 {
        let response = client
            .post(format!("{balancer}/api/v1/messages/shop.orders.events"))
            .json(&json!({"message_type": "order.placed", "payload": {"n": n}}))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap_or_default();
        assert_eq!(status, StatusCode::OK, "message {n} through nginx: {body}");
        assert_eq!(body["status"], "success", "message {n}: {body}");
    }
    let dispatched = app
        .jsonl_lines()
        .iter()
        .filter(|line| line["topic"] == "shop.orders.events")
        .count();
    assert_eq!(dispatched, 9, "each POST ran once, none twice");
    app.stop().await.unwrap();
}
