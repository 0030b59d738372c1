//! The architecture, checked by Cargo's own record: the engine crate an embedder depends on pulls in no I/O crate.

use std::collections::{BTreeMap, BTreeSet};

/// What the engine must never depend on, directly or through another crate.
const FORBIDDEN: &[&str] = &[
    "axum",
    "hyper",
    "hyper-util",
    "redis",
    "reqwest",
    "opentelemetry_sdk",
    "opentelemetry-prometheus",
    "opentelemetry-otlp",
    "prometheus",
    "tower-http",
];

/// Every package `root` depends on, directly or not, by the lock file (which lists the normal,
/// build and dev dependencies of each package together; the engine's dev-dependencies are test
/// crates, so that only makes the check stricter).
fn closure(lock: &toml::Table, root: &str) -> BTreeSet<String> {
    let mut edges: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for package in lock["package"].as_array().unwrap() {
        let name = package["name"].as_str().unwrap().to_owned();
        let deps = package
            .get("dependencies")
            .and_then(|d| d.as_array())
            .map(|deps| {
                deps.iter()
                    // "name" or "name version" when several versions are locked.
                    .map(|d| d.as_str().unwrap().split(' ').next().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        edges.entry(name).or_default().extend::<Vec<String>>(deps);
    }
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_owned()];
    while let Some(name) = todo.pop() {
        if seen.insert(name.clone()) {
            todo.extend(edges.get(&name).cloned().unwrap_or_default());
        }
    }
    seen
}

#[test]
fn the_engine_crate_depends_on_no_io_crate() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
    let lock: toml::Table = toml::from_str(&text).unwrap();
    let engine = closure(&lock, "dispatchd-engine");
    assert!(
        engine.contains("tokio") && engine.contains("serde"),
        "{engine:?}"
    );
    let found: Vec<&&str> = FORBIDDEN
        .iter()
        .filter(|name| engine.contains(**name))
        .collect();
    assert!(found.is_empty(), "the engine crate depends on {found:?}");
    // The check sees what it looks for: the service crate has them.
    let service = closure(&lock, "dispatchd");
    for name in ["axum", "hyper", "redis", "reqwest", "opentelemetry_sdk"] {
        assert!(
            service.contains(name),
            "{name} not found in the service's dependencies"
        );
    }
}

/// The Rust sources under `dir` (relative to the crate), with their text.
fn sources(dir: &str) -> Vec<(String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut found = Vec::new();
    let mut todo = vec![root];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                found.push((
                    path.display().to_string(),
                    std::fs::read_to_string(&path).unwrap(),
                ));
            }
        }
    }
    assert!(!found.is_empty(), "no sources under {dir}");
    found
}

#[test]
fn the_bus_alone_reads_redis_and_never_depends_on_the_sinks() {
    // The bus does not depend on the sinks at all (the consume loop, `BusObserver`, the dispatch
    // event and the dead-letter format are the bus's own; sinks subscribe to the in-memory bus
    // through `bus::Subscriber`). Its tests may use sinks.
    for (path, text) in sources("src/bus") {
        let code = text.split("#[cfg(test)]").next().unwrap();
        for forbidden in ["crate::sinks", "SinkDriver", "SinkHandle"] {
            assert!(!code.contains(forbidden), "{path} names {forbidden}");
        }
    }
    // The sinks read a stream only through the bus's consume loop: no Redis command, no
    // stream consumer of their own.
    for (path, text) in sources("src/sinks") {
        for forbidden in [
            "redis::cmd",
            "StreamConsumer",
            "XREADGROUP",
            "XAUTOCLAIM",
            "XACK",
        ] {
            assert!(!text.contains(forbidden), "{path} names {forbidden}");
        }
    }
    // And there is one consume loop: serve's sources go through it too.
    let app = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/app.rs")).unwrap();
    assert!(
        !app.contains("StreamConsumer"),
        "src/app.rs reads a stream by itself"
    );
}
