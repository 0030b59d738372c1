//! docs/configuration.md held to the code: every key the config types accept is listed there and
//! nothing else; every default written there is the embedded one (default.toml, including the
//! `[defaults.*]` the elements of the lists take); every environment variable is the one that
//! overrides that key; every type agrees with the default's TOML type.
//!
//! `UPDATE_DOCS=1 cargo test --lib config::reference` rewrites the default and environment
//! columns from default.toml and `ENV_OVERRIDES`, and appends a row (type and meaning `TODO`,
//! which fail the check) for every key the page lacks; a row of a key that no longer exists is
//! left for a person to remove or rename.

use std::collections::{BTreeMap, BTreeSet};

use super::ENV_OVERRIDES;
use super::raw::reference::tables;

const PAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");

/// Environment variables read as a fallback by the validation rather than laid over a key, each
/// with the key it stands in for.
const FALLBACKS: &[(&str, &str)] = &[("DISPATCHD_API_KEY", "sinks[].api_key")];

/// One row of the reference: `| `key` | type | default | environment | meaning |`, the key
/// dotted (which tells these rows from those of the environment variables' table).
#[derive(Debug)]
struct Row {
    line: usize,
    ty: String,
    default: String,
    env: String,
    meaning: String,
}

fn rows(page: &str) -> BTreeMap<String, Row> {
    let mut rows = BTreeMap::new();
    for (i, line) in page.lines().enumerate() {
        let cells: Vec<&str> = line.split(" | ").map(str::trim).collect();
        let Some(key) = cells[0]
            .strip_prefix("| `")
            .and_then(|rest| rest.strip_suffix('`'))
            .filter(|key| key.contains('.'))
        else {
            continue;
        };
        assert_eq!(
            cells.len(),
            5,
            "docs/configuration.md:{}: a row has five cells: {line}",
            i + 1
        );
        let row = Row {
            line: i + 1,
            ty: cells[1].to_owned(),
            default: cells[2].to_owned(),
            env: cells[3].to_owned(),
            meaning: cells[4].trim_end_matches('|').trim().to_owned(),
        };
        let previous = rows.insert(key.to_owned(), row);
        assert!(previous.is_none(), "{key} is listed twice");
    }
    rows
}

/// Every leaf key the configuration accepts (a key that is itself a table is not a leaf).
fn accepted() -> BTreeSet<String> {
    let tables = tables();
    let prefixes: BTreeSet<&str> = tables.iter().map(|(prefix, _)| *prefix).collect();
    let mut keys = BTreeSet::new();
    for (prefix, fields) in &tables {
        for field in *fields {
            let key = if prefix.is_empty() {
                (*field).to_owned()
            } else {
                format!("{prefix}.{field}")
            };
            if !prefixes.contains(key.as_str()) && !prefixes.contains(format!("{key}[]").as_str()) {
                keys.insert(key);
            }
        }
    }
    keys
}

/// Every default of default.toml by key: its tables' values, and the `[defaults.*]` values as
/// the keys of the list elements that take them (`defaults.sinks.timeout` is
/// `sinks[].timeout`'s). The default elements of the lists are examples, not defaults.
fn defaults() -> BTreeMap<String, toml::Value> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
        for (name, value) in table {
            let key = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            match value {
                toml::Value::Table(inner) => walk(&key, inner, out),
                toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
                    if items.is_empty() {
                        out.insert(key, value.clone());
                    }
                }
                _ => {
                    out.insert(key, value.clone());
                }
            }
        }
    }
    let table: toml::Table = toml::from_str(super::DEFAULT_TOML).unwrap();
    let mut out = BTreeMap::new();
    walk("", &table, &mut out);
    let lists: Vec<(String, toml::Value)> = out
        .iter()
        .filter_map(|(key, value)| {
            let rest = key.strip_prefix("defaults.")?;
            let (list, field) = rest.split_once('.')?;
            Some((format!("{list}[].{field}"), value.clone()))
        })
        .collect();
    out.extend(lists);
    out
}

fn literal(value: &toml::Value) -> String {
    match value {
        toml::Value::String(text) => format!("`\"{text}\"`"),
        other => format!("`{other}`"),
    }
}

/// Whether the type written in the page can hold the default's TOML type.
fn type_fits(ty: &str, value: &toml::Value) -> bool {
    let word = ty.split_whitespace().next().unwrap_or_default();
    match value {
        toml::Value::String(_) => {
            matches!(word, "string" | "duration" | "path" | "url" | "address")
        }
        toml::Value::Integer(_) => word == "integer",
        toml::Value::Float(_) => word == "float",
        toml::Value::Boolean(_) => word == "boolean",
        toml::Value::Array(_) => word == "array",
        toml::Value::Table(_) => word == "table",
        toml::Value::Datetime(_) => word == "datetime",
    }
}

/// A default cell that is one code span states a value (checked); anything else is prose
/// ("none", "required", "computed: …").
fn states_a_value(cell: &str) -> bool {
    cell.len() >= 2
        && cell.starts_with('`')
        && cell.ends_with('`')
        && cell.matches('`').count() == 2
}

#[test]
fn the_configuration_reference_lists_every_key_with_its_default_and_environment() {
    let page = std::fs::read_to_string(PAGE).expect("docs/configuration.md exists");
    let rows = rows(&page);
    let accepted = accepted();
    let defaults = defaults();
    // The probe sees the types: a few keys every reader of the page expects.
    for key in [
        "server.listen",
        "sources[].stream",
        "dispatchers[].circuit_breaker.cool_down",
        "defaults.sinks.retry.attempts",
    ] {
        assert!(accepted.contains(key), "{key} not found in {accepted:?}");
    }

    if std::env::var("UPDATE_DOCS").as_deref() == Ok("1") {
        update(&page, &rows, &accepted, &defaults);
        return;
    }

    let mut problems = Vec::new();
    for key in &accepted {
        if !rows.contains_key(key) {
            problems.push(format!("missing: {key}"));
        }
    }
    for (key, row) in &rows {
        let at = format!("docs/configuration.md:{}: {key}", row.line);
        if !accepted.contains(key) {
            problems.push(format!("{at}: no such key in the config types"));
            continue;
        }
        if row.meaning.is_empty() || row.ty.is_empty() || row.meaning == "TODO" || row.ty == "TODO"
        {
            problems.push(format!("{at}: give its type and meaning"));
        }
        match defaults.get(key) {
            Some(value) => {
                if row.default != literal(value) {
                    problems.push(format!(
                        "{at}: the default is {}, the page says {}",
                        literal(value),
                        row.default
                    ));
                }
                if !type_fits(&row.ty, value) {
                    problems.push(format!("{at}: type {} but the default is {value}", row.ty));
                }
            }
            None if states_a_value(&row.default) => problems.push(format!(
                "{at}: default.toml has no default for it, the page says {}",
                row.default
            )),
            None => {}
        }
        // Every variable named is the one that overrides this key, and each one that does is
        // named.
        let named: BTreeSet<&str> = row
            .env
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|name| !name.is_empty())
            .collect();
        let expected = variables(key);
        if named != expected {
            problems.push(format!(
                "{at}: environment {named:?}, the code reads {expected:?}"
            ));
        }
    }
    for (var, _) in FALLBACKS {
        assert!(
            include_str!("raw.rs").contains(var),
            "{var} is no longer read"
        );
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md disagrees with the config types or default.toml \
         (UPDATE_DOCS=1 cargo test --lib config::reference fixes the defaults and adds rows):\n{}",
        problems.join("\n")
    );
}

/// The environment variables that set `key`.
fn variables(key: &str) -> BTreeSet<&'static str> {
    ENV_OVERRIDES
        .iter()
        .chain(FALLBACKS)
        .filter(|(_, field)| *field == key)
        .map(|(var, _)| *var)
        .collect()
}

/// The environment cell of a row for `key`.
fn environment(key: &str) -> String {
    let names: Vec<String> = variables(key).iter().map(|v| format!("`{v}`")).collect();
    if names.is_empty() {
        "—".to_owned()
    } else {
        names.join(", ")
    }
}

/// Rewrites the default and environment cells and appends the missing keys' rows.
fn update(
    page: &str,
    rows: &BTreeMap<String, Row>,
    accepted: &BTreeSet<String>,
    defaults: &BTreeMap<String, toml::Value>,
) {
    let mut lines: Vec<String> = page.lines().map(str::to_owned).collect();
    for (key, row) in rows {
        let default = match defaults.get(key) {
            Some(value) => literal(value),
            None if states_a_value(&row.default) => "none".to_owned(),
            None => row.default.clone(),
        };
        lines[row.line - 1] = format!(
            "| `{key}` | {} | {default} | {} | {} |",
            row.ty,
            environment(key),
            row.meaning
        );
    }
    let missing: Vec<&String> = accepted.iter().filter(|k| !rows.contains_key(*k)).collect();
    if !missing.is_empty() {
        lines.push(String::new());
        lines.push("## To describe".to_owned());
        lines.push(String::new());
        lines.push("| key | type | default | environment | meaning |".to_owned());
        lines.push("| --- | --- | --- | --- | --- |".to_owned());
        for key in missing {
            let default = defaults.get(key).map_or("none".to_owned(), literal);
            let env = environment(key);
            lines.push(format!("| `{key}` | TODO | {default} | {env} | TODO |"));
        }
    }
    std::fs::write(PAGE, lines.join("\n") + "\n").unwrap();
}
