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
