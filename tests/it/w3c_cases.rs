//! The W3C trace context cases of `tests/data/traceparent-cases.txt` (its header says the format
//! and where each group comes from), read for `trace_context` here and for `tests/traces.rs`.

/// What dispatchd must make of a case's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Trace {
    /// No parent: a new trace starts.
    New,
    /// The caller's trace continues from this parent.
    Inherit {
        trace_id: String,
        parent_id: String,
        sampled: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    /// No list-member: absent, empty, or only empty members.
    None,
    /// Dropped whole.
    Invalid,
    /// Passed on as this value.
    Keep(String),
}

impl State {
    /// The `tracestate` that leaves with the trace: the kept value, else empty.
    pub(crate) fn header(&self) -> &str {
        match self {
            State::Keep(value) => value,
            State::None | State::Invalid => "",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Case {
    pub(crate) name: String,
    /// The header lines sent, in order, names as written.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) trace: Trace,
    /// Only meaningful when the trace is inherited.
    pub(crate) state: State,
}

impl Case {
    /// The case as envelope headers (one value per key): `None` when a map cannot say it, that
    /// is when it sends `traceparent` twice or a header name that is not lowercase.
    pub(crate) fn as_map(&self) -> Option<std::collections::BTreeMap<String, String>> {
        let mut map = std::collections::BTreeMap::<String, String>::new();
        for (name, value) in &self.headers {
            if name.to_ascii_lowercase() != *name {
                return None;
            }
            match map.get_mut(name) {
                // Several tracestate lines are one list joined with `,` (RFC 9110 5.3).
                Some(joined) if name == "tracestate" => {
                    joined.push(',');
                    joined.push_str(value);
                }
                Some(_) => return None,
                None => {
                    map.insert(name.clone(), value.clone());
                }
            }
        }
        Some(map)
    }
}

/// Every case of the file, in order. Panics, naming the line, on anything it cannot read.
pub(crate) fn cases() -> Vec<Case> {
    let text = include_str!("../data/traceparent-cases.txt");
    let mut cases: Vec<Case> = Vec::new();
    let mut trace_seen = false;
    for (index, line) in text.lines().enumerate() {
        let at = || format!("traceparent-cases.txt:{}", index + 1);
        assert!(
            !line.ends_with([' ', '\t']),
            "{}: a line ends in whitespace (write \\s or \\t)",
            at()
        );
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix("case ") {
            if let Some(last) = cases.last() {
                assert!(trace_seen, "case {} has no `trace` line", last.name);
            }
            assert!(
                cases.iter().all(|case| case.name != name),
                "{}: case {name} twice",
                at()
            );
            cases.push(Case {
                name: name.to_owned(),
                headers: Vec::new(),
                trace: Trace::New,
                state: State::None,
            });
            trace_seen = false;
            continue;
        }
        let case = cases
            .last_mut()
            .unwrap_or_else(|| panic!("{}: a line before the first case", at()));
        let line = line
            .strip_prefix("  ")
            .unwrap_or_else(|| panic!("{}: not indented by two spaces", at()));
        if let Some(header) = line.strip_prefix("send ") {
            let (name, value) = header
                .split_once(':')
                .unwrap_or_else(|| panic!("{}: `send NAME: VALUE`", at()));
            let value = match value.strip_prefix(' ') {
                Some(value) => value,
                None if value.is_empty() => value,
                None => panic!("{}: a space after the colon", at()),
            };
            case.headers.push((name.to_owned(), unescape(value, &at())));
        } else if let Some(trace) = line.strip_prefix("trace ") {
            case.trace = match trace.split(' ').collect::<Vec<_>>()[..] {
                ["new"] => Trace::New,
                [trace_id, parent_id, sampled @ ("sampled" | "unsampled")] => {
                    assert!(trace_id.len() == 32 && parent_id.len() == 16, "{}", at());
                    Trace::Inherit {
                        trace_id: trace_id.to_owned(),
                        parent_id: parent_id.to_owned(),
                        sampled: sampled == "sampled",
                    }
                }
                _ => panic!(
                    "{}: `trace new` or `trace ID PARENT sampled|unsampled`",
                    at()
                ),
            };
            trace_seen = true;
        } else if let Some(state) = line.strip_prefix("state ") {
            assert!(
                matches!(case.trace, Trace::Inherit { .. }),
                "{}: a state only after an inherited trace",
                at()
            );
            case.state = match state {
                "none" => State::None,
                "invalid" => State::Invalid,
                _ => State::Keep(unescape(
                    state
                        .strip_prefix("keep ")
                        .unwrap_or_else(|| panic!("{}: `state none|invalid|keep VALUE`", at())),
                    &at(),
                )),
            };
        } else {
            panic!("{}: not `send`, `trace` or `state`", at());
        }
    }
    assert!(trace_seen, "the last case has no `trace` line");
    cases
}

/// The file's escapes: `\s`, `\t`, `\n`, `\r`, `\\`, `\u{HEX}`, `\{TEXT*N}`.
fn unescape(value: &str, at: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(backslash) = rest.find('\\') {
        out.push_str(&rest[..backslash]);
        let escape = &rest[backslash + 1..];
        let (text, used): (String, usize) = match escape.chars().next() {
            Some('s') => (" ".into(), 1),
            Some('t') => ("\t".into(), 1),
            Some('n') => ("\n".into(), 1),
            Some('r') => ("\r".into(), 1),
            Some('\\') => ("\\".into(), 1),
            Some('u') => {
                let end = escape
                    .find('}')
                    .unwrap_or_else(|| panic!("{at}: \\u{{HEX}}"));
                let code = u32::from_str_radix(&escape[2..end], 16)
                    .ok()
                    .and_then(char::from_u32)
                    .unwrap_or_else(|| panic!("{at}: \\u{{HEX}}"));
                (code.to_string(), end + 1)
            }
            Some('{') => {
                let end = escape
                    .find('}')
                    .unwrap_or_else(|| panic!("{at}: \\{{TEXT*N}}"));
                let (text, count) = escape[1..end]
                    .rsplit_once('*')
                    .unwrap_or_else(|| panic!("{at}: \\{{TEXT*N}}"));
                let count: usize = count
                    .parse()
                    .unwrap_or_else(|_| panic!("{at}: \\{{TEXT*N}}"));
                (text.repeat(count), end + 1)
            }
            _ => panic!("{at}: unknown escape"),
        };
        out.push_str(&text);
        rest = &escape[used..];
    }
    out.push_str(rest);
    out
}
