//! `GET /api/v1/openapi.json` against the server that serves it: every described operation is
//! answered (not 404/405), every route the docs name and the server answers is described, no
//! undescribed method answers; then, with the real binary, `openapi-spec-validator` on the
//! document and `schemathesis` (PyPI) against the live instance.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use regex::Regex;
use reqwest::Method;
use serde_json::Value;

use crate::binary::{BINARY, Running, started_keeping_log};
use crate::support::{TestApp, required_tool};

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// `(method, path template)` of every operation the document describes.
fn described(document: &Value) -> BTreeSet<(String, String)> {
    let mut operations = BTreeSet::new();
    for (path, item) in document["paths"].as_object().expect("paths is an object") {
        for method in METHODS {
            if item.get(method).is_some() {
                operations.insert((method.to_owned(), path.clone()));
            }
        }
    }
    operations
}

/// A concrete path for a template: `{topic}` a topic, any other parameter a worker id.
fn concrete(template: &str) -> String {
    template
        .replace("{topic}", "orders.order.events")
        .replace("{id}", "w-1")
}

/// The error code of an answer, if it is a JSON error.
async fn answer(app: &TestApp, method: &str, path: &str) -> (u16, Option<String>) {
    let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
    let mut request = app
        .client
        .request(method.clone(), format!("http://{}{path}", app.addr));
    if method == Method::POST {
        request = request
            .header("content-type", "application/json")
            .body(r#"{"message_type":"order.created","payload":{}}"#);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let code = response
        .json::<Value>()
        .await
        .ok()
        .and_then(|body| body["error"]["code"].as_str().map(str::to_owned));
    (status, code)
}

/// Whether the router has no route for the path (`not_found`) or none for the method
/// (`method_not_allowed`): the two answers of the fallbacks, distinct from a handler's 404
/// (`unknown_dispatcher`, `no_dispatcher`).
fn unrouted(status: u16, code: Option<&str>) -> bool {
    (status == 404 && code == Some("not_found")) || status == 405
}

/// Every `GET /x`-style endpoint named in the repository's documentation.
fn documented_endpoints() -> BTreeSet<(String, String)> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files = vec![
        format!("{root}/README.md"),
        format!("{root}/ARCHITECTURE.md"),
    ];
    for entry in std::fs::read_dir(format!("{root}/docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path.display().to_string());
        }
    }
    let endpoint = Regex::new(r"\b(GET|POST|PUT|PATCH|DELETE) (/[A-Za-z0-9_.{}/-]*)").unwrap();
    let mut found = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for capture in endpoint.captures_iter(&text) {
            let path = capture[2].trim_end_matches(['.', '/']).to_owned();
            let path = if path.is_empty() {
                "/".to_owned()
            } else {
                path
            };
            found.insert((capture[1].to_ascii_lowercase(), path));
        }
    }
    // The status page, whether or not a page names it.
    found.insert(("get".to_owned(), "/".to_owned()));
    found
}

/// Matches a concrete or template path against a template of the document.
fn matches(template: &str, path: &str) -> bool {
    let (a, b): (Vec<_>, Vec<_>) = (template.split('/').collect(), path.split('/').collect());
    a.len() == b.len()
        && a.iter()
            .zip(&b)
            .all(|(t, p)| t == p || (t.starts_with('{') && t.ends_with('}')))
}

#[tokio::test]
async fn the_description_and_the_router_have_the_same_routes() {
    let app = TestApp::start().await;
    let response = app
        .client
        .get(format!("http://{}/api/v1/openapi.json", app.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let document: Value = response.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(document["info"]["version"], env!("CARGO_PKG_VERSION"));
    let operations = described(&document);
    assert!(operations.len() >= 12, "{operations:?}");

    // Every described operation is routed: its answer is a handler's, not the fallbacks'.
    for (method, template) in &operations {
        let (status, code) = answer(&app, method, &concrete(template)).await;
        assert!(
            !unrouted(status, code.as_deref()),
            "{method} {template} is described but the router answers {status} {code:?}"
        );
        // And no other method on that path is answered by a handler: an undescribed method
        // added to a described path fails here.
        for other in METHODS {
            if operations.contains(&(other.to_owned(), template.clone())) {
                continue;
            }
            let (status, code) = answer(&app, other, &concrete(template)).await;
            assert!(
                unrouted(status, code.as_deref()),
                "{other} {template} answers {status} {code:?} but is not described"
            );
        }
    }

    // Every endpoint the docs name that the server answers is described, with that method.
    let endpoints = documented_endpoints();
    assert!(
        endpoints.contains(&("post".to_owned(), "/api/v1/messages/{topic}".to_owned())),
        "the docs scan finds endpoints: {endpoints:?}"
    );
    for (method, path) in endpoints {
        let (status, code) = answer(&app, &method, &concrete(&path)).await;
        if unrouted(status, code.as_deref()) {
            continue;
        }
        assert!(
            operations
                .iter()
                .any(|(m, template)| *m == method && matches(template, &path)),
            "{method} {path} answers {status} {code:?} but /api/v1/openapi.json does not describe it"
        );
    }
    app.stop().await.unwrap();
}

/// The document passes `openapi-spec-validator` (an OpenAPI 3.1 validator nobody here wrote), and
/// `schemathesis` finds no 5xx and no answer that differs from the description, against the real
/// binary with tokens configured (so the scopes the description declares are enforced).
#[tokio::test]
async fn schemathesis_finds_the_live_api_as_described() {
    let Some(st) = required_tool("st") else {
        return;
    };
    let Some(validator) = required_tool("openapi-spec-validator") else {
        return;
    };
    const TOKEN: &str = "schemathesis-token-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dispatchd.toml");
    std::fs::write(
        &config,
        r#"
[[auth.tokens]]
name = "schemathesis"
token_env = "ST_DISPATCHD_TOKEN"
scopes = ["ingest", "admin", "metrics"]
"#,
    )
    .unwrap();
    let child = Command::new(BINARY)
        .args(["serve", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env("DISPATCHD_LISTEN", "127.0.0.1:0")
        .env("ST_DISPATCHD_TOKEN", TOKEN)
        .env("DISPATCHD_LOG", "warn,dispatchd=info")
        .env_remove("DISPATCHD_CONFIG")
        .env_remove("DISPATCHD_API_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the binary starts");
    let (running, addr, _log): (Running, String, _) = started_keeping_log(child);

    let client = reqwest::Client::new();
    let document = client
        .get(format!("http://{addr}/api/v1/openapi.json"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, &document).unwrap();

    let validated = Command::new(&validator)
        .args(["--schema", "3.1.0"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        validated.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );

    let run = Command::new(&st)
        .arg("run")
        .arg(&file)
        .args(["--url", &format!("http://{addr}")])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args(["--checks", "all"])
        // Bounded: a few dozen cases per operation and phase, a fixed seed so a failure
        // reproduces, one worker (the machine is shared).
        .args(["--max-examples", "25", "--seed", "18", "--workers", "1"])
        .args(["--request-timeout", "10", "--no-shrink"])
        .env("NO_COLOR", "1")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "schemathesis failed:\n{output}");
    // Its summary in the test's output (`--nocapture`): what was generated and checked.
    let summary: Vec<&str> = output
        .lines()
        .skip_while(|l| !l.contains("SUMMARY"))
        .collect();
    eprintln!("{}", summary.join("\n"));
    drop(running);
}
