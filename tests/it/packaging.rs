//! Packaging: shell completions and the man page read by a real bash and groff, the systemd unit
//! by `systemd-analyze verify`, the Kubernetes manifests by `kubernetes-validate` (and promtool
//! for the PrometheusRule), generated files checked for drift, stop timeouts checked against
//! the shutdown of the embedded defaults, and the Dockerfile and compose file read for what they
//! must say (there is no docker here).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dispatchd::config::Config;
use serde_yaml::{Mapping, Value};

use crate::binary::BINARY;
use crate::support::{TestApp, required_tool};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn run(command: &mut Command) -> std::process::Output {
    let output = command.output().expect("the command starts");
    assert!(
        output.status.success(),
        "{command:?}: {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The completion scripts of every shell clap supports are generated, and bash's is valid bash
/// that registers a completion for `dispatchd` offering its subcommands.
#[test]
fn completions_are_valid_bash_and_complete_the_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let output = run(Command::new(BINARY).args(["completions", shell]));
        assert!(output.stdout.len() > 1000, "{shell}: a real script");
    }
    let bash = dir.path().join("dispatchd.bash");
    std::fs::write(
        &bash,
        run(Command::new(BINARY).args(["completions", "bash"])).stdout,
    )
    .unwrap();
    run(Command::new("bash").arg("-n").arg(&bash));
    // Loaded into a real bash, and asked what follows `dispatchd `.
    let script = format!(
        "source {}; complete -p dispatchd; COMP_WORDS=(dispatchd ''); COMP_CWORD=1; COMP_LINE='dispatchd '; COMP_POINT=10; _dispatchd dispatchd '' dispatchd; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        bash.display()
    );
    let output = run(Command::new("bash").args(["-c", &script]));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.lines().next().is_some_and(
            |line| line.starts_with("complete ") && line.ends_with(" -F _dispatchd dispatchd")
        ),
        "{stdout}"
    );
    for subcommand in [
        "serve",
        "sink",
        "simulate",
        "loadtest",
        "completions",
        "man",
    ] {
        assert!(
            stdout.lines().any(|line| line == subcommand),
            "{subcommand} offered: {stdout}"
        );
    }
    // A wrong shell is a usage error naming the choices, not a panic.
    let output = Command::new(BINARY)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("possible values"));
}

/// `dispatchd man` and `dispatchd man <subcommand>` are roff that groff formats without a
/// warning, documenting every subcommand and their options.
#[test]
fn the_man_pages_format_without_warnings() {
    let Some(groff) = required_tool("groff") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (subcommand, expected) in [
        (
            None,
            vec!["dispatchd", "simulate", "completions", "--config"],
        ),
        (
            Some("sink"),
            vec!["dispatchd-sink", "--replay-dead-letters"],
        ),
        (Some("simulate"), vec!["--progress-every", "--target"]),
    ] {
        let mut command = Command::new(BINARY);
        command.arg("man").args(subcommand);
        let page = dir.path().join("page.1");
        std::fs::write(&page, run(&mut command).stdout).unwrap();
        // -k: the page's UTF-8 through preconv, as man does; -ww: every warning.
        let output = run(Command::new(&groff)
            .args(["-k", "-man", "-Tutf8", "-ww", "-P-cbou"])
            .arg(&page));
        assert!(
            output.stderr.is_empty(),
            "groff warns: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8_lossy(&output.stdout);
        for word in expected {
            assert!(text.contains(word), "{word} in {subcommand:?}:\n{text}");
        }
    }
    let output = Command::new(BINARY).args(["man", "nope"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no subcommand `nope`"));
}

/// The stop timeout every packaging gives dispatchd: what SIGTERM takes at most with the
/// embedded defaults (the drain delay, the grace of in-flight requests, the sinks' last flush),
/// plus a margin.
fn shutdown_takes_at_most() -> Duration {
    let config = Config::embedded().unwrap();
    let flush = config
        .sinks
        .iter()
        .map(|s| s.driver.shutdown_deadline)
        .max()
        .unwrap_or_default();
    config.server.drain_delay + config.server.shutdown_grace + flush
}

const MARGIN: Duration = Duration::from_secs(5);

fn unit_setting<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

/// The unit is hardened, reloads with SIGHUP, waits long enough at stop, and
/// `systemd-analyze verify` accepts it (with its binary and man page where it says).
#[test]
fn the_systemd_unit_is_hardened_and_verifies() {
    let unit = read("deploy/systemd/dispatchd.service");
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("StateDirectory", "dispatchd"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(unit_setting(&unit, key), [value], "{key}");
    }
    let stop = humantime::parse_duration(unit_setting(&unit, "TimeoutStopSec")[0]).unwrap();
    assert_eq!(stop, shutdown_takes_at_most() + MARGIN, "TimeoutStopSec");

    let Some(analyze) = required_tool("systemd-analyze") else {
        return;
    };
    // verify wants the ExecStart binaries to exist and runs `man` for Documentation=: the
    // test binary stands at the unit's path, the generated page in a MANPATH of its own.
    let dir = tempfile::tempdir().unwrap();
    let unit = unit.replace("/usr/local/bin/dispatchd", BINARY);
    assert!(!unit.contains("/usr/local/bin"));
    let file = dir.path().join("dispatchd.service");
    std::fs::write(&file, unit).unwrap();
    let man1 = dir.path().join("man/man1");
    std::fs::create_dir_all(&man1).unwrap();
    std::fs::write(
        man1.join("dispatchd.1"),
        run(Command::new(BINARY).arg("man")).stdout,
    )
    .unwrap();
    let mut verify = Command::new(analyze);
    verify
        .arg("verify")
        .arg(&file)
        .env("MANPATH", dir.path().join("man"));
    if required_tool("man").is_none() {
        verify.arg("--man=no");
    }
    let output = run(&mut verify);
    assert!(
        output.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The Deployment's stop fits the shutdown of the defaults: a preStop sleep of the drain delay
/// (while the endpoint removal spreads), then SIGTERM and the whole shutdown, then a margin. The
/// compose file gives `docker stop` as long.
#[test]
fn stop_timeouts_cover_the_shutdown_of_the_embedded_defaults() {
    let config = Config::embedded().unwrap();
    let deployment = yaml("deploy/kubernetes/deployment.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("a preStop sleep");
    assert_eq!(Duration::from_secs(pre_stop), config.server.drain_delay);
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert_eq!(
        Duration::from_secs(grace),
        Duration::from_secs(pre_stop) + shutdown_takes_at_most() + MARGIN,
        "terminationGracePeriodSeconds"
    );
    let compose = yaml("docker-compose.yml");
    let stop = compose["services"]["dispatchd"]["stop_grace_period"]
        .as_str()
        .unwrap();
    assert_eq!(
        humantime::parse_duration(stop).unwrap(),
        shutdown_takes_at_most() + MARGIN
    );
}

/// Probes, ports and selectors agree across the Deployment, the Service and the ServiceMonitor
/// (what `kubernetes-validate` cannot see: it checks each object alone, and knows no CRD).
#[test]
fn the_kubernetes_objects_agree_with_each_other_and_with_dispatchd() {
    let deployment = yaml("deploy/kubernetes/deployment.yaml");
    let service = yaml("deploy/kubernetes/service.yaml");
    let monitor = yaml("deploy/kubernetes/servicemonitor.yaml");
    let pod = &deployment["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let port = &container["ports"][0];
    assert_eq!(port["name"], "http");
    let listen = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "DISPATCHD_LISTEN")
        .expect("DISPATCHD_LISTEN")["value"]
        .as_str()
        .unwrap();
    assert_eq!(
        listen,
        format!("0.0.0.0:{}", port["containerPort"].as_u64().unwrap())
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/health");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(container[probe]["httpGet"]["port"], "http", "{probe}");
    }
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);

    let subset = |wanted: &Value, labels: &Value| {
        wanted
            .as_mapping()
            .unwrap()
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    };
    assert!(subset(
        &service["spec"]["selector"],
        &pod["metadata"]["labels"]
    ));
    assert!(subset(
        &deployment["spec"]["selector"]["matchLabels"],
        &pod["metadata"]["labels"]
    ));
    assert!(subset(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], service["spec"]["ports"][0]["name"]);
    assert_eq!(endpoint["path"], "/metrics");
    // The alert rules select job=~"dispatchd.*"; the operator names the job after the Service.
    assert!(
        service["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("dispatchd")
    );
    // Every manifest is in the kustomization, and only those.
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    let mut listed: Vec<&str> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    listed.sort_unstable();
    assert_eq!(
        listed,
        manifests().iter().map(String::as_str).collect::<Vec<_>>()
    );
}

/// The manifests of deploy/kubernetes (not the kustomization), sorted.
fn manifests() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    names.sort();
    names
}

fn generated_header(source: &str) -> String {
    format!(
        "# Generated from {source} by tests/it/packaging.rs: edit that, then\n# UPDATE_GOLDEN=1 cargo test --test it packaging:: rewrites this file (the test fails when it drifts).\n"
    )
}

fn object(kind: &str, api_version: &str, name: &str, labels: &[(&str, &str)]) -> Mapping {
    let mut metadata = Mapping::new();
    metadata.insert("name".into(), name.into());
    let mut label_map = Mapping::new();
    for (k, v) in labels {
        label_map.insert((*k).into(), (*v).into());
    }
    metadata.insert("labels".into(), label_map.into());
    let mut object = Mapping::new();
    object.insert("apiVersion".into(), api_version.into());
    object.insert("kind".into(), kind.into());
    object.insert("metadata".into(), metadata.into());
    object
}

/// The files of `dir` with one of `extensions`, sorted: (name, text).
fn files_of(dir: &str, extensions: &[&str]) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(repo(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| extensions.iter().any(|x| e == *x))
        })
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// The PrometheusRule: every group of alerts/*.yml, as it is.
fn prometheus_rule() -> String {
    let mut groups = Vec::new();
    for (name, text) in files_of("alerts", &["yml", "yaml"]) {
        let rules: Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        groups.extend(rules["groups"].as_sequence().unwrap().iter().cloned());
    }
    let mut rule = object(
        "PrometheusRule",
        "monitoring.coreos.com/v1",
        "dispatchd",
        &[("app.kubernetes.io/name", "dispatchd")],
    );
    let mut spec = Mapping::new();
    spec.insert("groups".into(), Value::Sequence(groups));
    rule.insert("spec".into(), spec.into());
    generated_header("alerts/*.yml") + &serde_yaml::to_string(&rule).unwrap()
}

/// The dashboards as a ConfigMap, labelled for Grafana's dashboard sidecar.
fn dashboards_config_map() -> String {
    let mut map = object(
        "ConfigMap",
        "v1",
        "dispatchd-dashboards",
        &[
            ("app.kubernetes.io/name", "dispatchd"),
            ("grafana_dashboard", "1"),
        ],
    );
    let mut data = Mapping::new();
    for (name, text) in files_of("dashboards", &["json"]) {
        data.insert(name.into(), text.into());
    }
    map.insert("data".into(), data.into());
    generated_header("dashboards/*.json") + &serde_yaml::to_string(&map).unwrap()
}

/// prometheusrule.yaml and dashboards-configmap.yaml are what alerts/ and dashboards/ make.
#[test]
fn the_generated_manifests_match_alerts_and_dashboards() {
    for (path, generated) in [
        ("deploy/kubernetes/prometheusrule.yaml", prometheus_rule()),
        (
            "deploy/kubernetes/dashboards-configmap.yaml",
            dashboards_config_map(),
        ),
    ] {
        if std::env::var("UPDATE_GOLDEN").as_deref() == Ok("1") {
            std::fs::write(repo(path), &generated).unwrap();
        }
        let committed = std::fs::read_to_string(repo(path))
            .unwrap_or_else(|e| panic!("{path}: {e} (UPDATE_GOLDEN=1 writes it)"));
        assert!(
            committed == generated,
            "{path} drifted from its sources; UPDATE_GOLDEN=1 cargo test --test it packaging:: rewrites it"
        );
    }
    // The dashboards keep their content whole (the YAML string is the JSON file).
    let map = yaml("deploy/kubernetes/dashboards-configmap.yaml");
    let overview: serde_json::Value =
        serde_json::from_str(map["data"]["overview.json"].as_str().unwrap()).unwrap();
    assert!(overview["panels"].is_array());
}

/// `kubernetes-validate --strict` passes every built-in object; the PrometheusRule's rules pass
/// `promtool check rules` (Prometheus's own parser: the CRD's schema is not available offline,
/// and what the operator does with spec.groups is load it into Prometheus).
#[test]
fn the_kubernetes_manifests_validate() {
    let names = manifests();
    if let Some(validate) = required_tool("kubernetes-validate") {
        let output = run(Command::new(validate)
            .arg("--strict")
            .args(&names)
            .current_dir(repo("deploy/kubernetes")));
        let report = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        for object in [
            "deployment/dispatchd",
            "service/dispatchd",
            "configmap/dispatchd-dashboards",
        ] {
            assert!(
                report.contains(&format!("passed for resource {object}")),
                "{object}: {report}"
            );
        }
        assert!(!report.contains("ERROR"), "{report}");
    }
    if let Some(promtool) = required_tool("promtool") {
        let dir = tempfile::tempdir().unwrap();
        let rule = yaml("deploy/kubernetes/prometheusrule.yaml");
        let rules = dir.path().join("rules.yml");
        std::fs::write(&rules, serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
        let output = run(Command::new(promtool).args(["check", "rules"]).arg(&rules));
        let count: usize = rule["spec"]["groups"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|g| g["rules"].as_sequence().unwrap().len())
            .sum();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains(&format!("SUCCESS: {count} rules found")),
            "{stdout}"
        );
    }
}

/// The image runs as an unprivileged user and probes itself with `dispatchd health`; the build
/// context leaves target/ and .git out; compose pins every image.
#[test]
fn the_image_runs_unprivileged_with_a_healthcheck_and_compose_pins_its_images() {
    let dockerfile = read("Dockerfile");
    let last_stage = dockerfile
        .rsplit("\nFROM ")
        .next()
        .expect("a runtime stage");
    let user = last_stage
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    let uid = user.split(':').next().unwrap().trim();
    assert!(uid != "root" && uid != "0", "USER {user}");
    let healthcheck = last_stage
        .split("HEALTHCHECK")
        .nth(1)
        .expect("a HEALTHCHECK")
        .split("\n\n")
        .next()
        .unwrap()
        .replace("\\\n", " ");
    assert!(
        healthcheck
            .contains(r#"CMD ["dispatchd", "health", "--url", "http://127.0.0.1:9000/health""#),
        "{healthcheck}"
    );
    assert!(last_stage.contains("ENV DISPATCHD_LISTEN=0.0.0.0:9000"));

    let ignored: Vec<&str> = include_str!("../../.dockerignore")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    for needed in ["target/", ".git/", "fuzz/artifacts/", "fuzz/corpus/"] {
        assert!(ignored.contains(&needed), "{needed} in .dockerignore");
    }

    let compose = yaml("docker-compose.yml");
    for (name, service) in compose["services"].as_mapping().unwrap() {
        let Some(image) = service["image"].as_str() else {
            panic!("{name:?} names no image");
        };
        let tag = image.rsplit_once(':').map(|(_, tag)| tag);
        assert!(
            tag.is_some_and(|t| t != "latest" && !t.contains('/')),
            "{name:?}: image {image} is not pinned to a version"
        );
    }
}

/// `dispatchd health`, the image's probe: exit 0 on a 2xx, 1 otherwise, with why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_probe_exits_by_the_answer() {
    let app = TestApp::start().await;
    let probe = |url: String| {
        tokio::task::spawn_blocking(move || {
            Command::new(BINARY)
                .args(["health", "--url", &url, "--timeout", "5s"])
                .output()
                .unwrap()
        })
    };
    let healthy = probe(app.url("/health")).await.unwrap();
    assert!(healthy.status.success(), "{healthy:?}");
    let missing = probe(app.url("/nowhere")).await.unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("answered 404"));
    let addr = app.addr;
    app.stop().await.unwrap();
    let down = probe(format!("http://{addr}/health")).await.unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).starts_with("unhealthy: "));
}
