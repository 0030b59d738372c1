//! `dispatchd top`: a running instance in the terminal, like `vector top`.
//!
//! Owns: polling `GET /api/v1/status` every interval, the rates between two polls, and drawing
//! the dispatchers, sinks and bus with ratatui. Reads the keyboard between polls: `q`, Esc or
//! Ctrl-C quit.
//!
//! Invariants: the terminal is restored on every way out (ratatui's `init` also restores it
//! before a panic message); an instance that cannot be reached, refuses the token or answers
//! something else is a line on the screen that says so, and polling goes on.
//!
//! Must not: write to the terminal outside the frame while it runs.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};

use crate::http::StatusReport;

/// What `dispatchd top` was asked to watch.
#[derive(Debug, Clone)]
pub struct Options {
    /// The instance's base URL, such as `http://127.0.0.1:9000`.
    pub url: String,
    pub interval: Duration,
    /// A bearer token with the `metrics` scope, once the instance has one.
    pub token: Option<String>,
}

/// Runs until the user quits. Fails before drawing anything when there is no terminal.
pub fn run(options: Options) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() {
        anyhow::bail!(
            "dispatchd top draws on a terminal and stdout is none; a script can read {}/api/v1/status",
            options.url.trim_end_matches('/')
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        // A poll never outlasts the interval by much, so the keyboard stays answered.
        .timeout(
            options
                .interval
                .clamp(Duration::from_millis(500), Duration::from_secs(5)),
        )
        .build()?;
    let mut terminal = ratatui::try_init()?;
    let mut view = View::new(&options);
    let result = (|| -> anyhow::Result<()> {
        loop {
            let polled = runtime.block_on(poll(&client, &options));
            view.update(polled, Instant::now());
            terminal.draw(|frame| draw(frame, &view))?;
            let next = Instant::now() + options.interval;
            while let Some(left) = next.checked_duration_since(Instant::now()) {
                if !event::poll(left)? {
                    break;
                }
                match event::read()? {
                    Event::Key(key) if key.kind == KeyEventKind::Press => {
                        let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL)
                            && key.code == KeyCode::Char('c');
                        if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) {
                            return Ok(());
                        }
                    }
                    Event::Resize(..) => {
                        terminal.draw(|frame| draw(frame, &view))?;
                    }
                    _ => {}
                }
            }
        }
    })();
    ratatui::restore();
    result
}

/// One poll of the status report, or what went wrong, in words for the screen.
async fn poll(client: &reqwest::Client, options: &Options) -> Result<StatusReport, String> {
    let base = options.url.trim_end_matches('/');
    let mut request = client.get(format!("{base}/api/v1/status"));
    if let Some(token) = &options.token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|error| {
        let why = if error.is_timeout() {
            "no answer in time".to_owned()
        } else if error.is_connect() {
            "connection refused or unreachable".to_owned()
        } else {
            error.to_string()
        };
        format!("cannot reach {base}: {why}. Is dispatchd running there?")
    })?;
    let status = response.status();
    match status.as_u16() {
        200 => {}
        401 | 403 => {
            return Err(format!(
                "{base} refused the request ({status}): pass --token (or DISPATCHD_METRICS_TOKEN) with a token of the metrics scope"
            ));
        }
        404 => {
            return Err(format!(
                "{base} has no /api/v1/status: is this the address of dispatchd serve (not of a sink), and a version with the status page?"
            ));
        }
        _ => return Err(format!("{base} answered {status}")),
    }
    response.json::<StatusReport>().await.map_err(|error| {
        format!("{base} answered something that is not a dispatchd status report: {error}")
    })
}

/// What the screen shows: the last report, the rates between the last two, the last error.
struct View {
    url: String,
    interval: Duration,
    report: Option<StatusReport>,
    /// Calls per second by dispatcher id, between the last two successful polls.
    rates: HashMap<String, f64>,
    previous: Option<(Instant, HashMap<String, u64>)>,
    error: Option<String>,
}

impl View {
    fn new(options: &Options) -> View {
        View {
            url: options.url.trim_end_matches('/').to_owned(),
            interval: options.interval,
            report: None,
            rates: HashMap::new(),
            previous: None,
            error: None,
        }
    }

    fn update(&mut self, polled: Result<StatusReport, String>, now: Instant) {
        match polled {
            Ok(report) => {
                let calls: HashMap<String, u64> = report
                    .dispatchers
                    .iter()
                    .map(|d| (d.dispatcher_id.clone(), d.calls))
                    .collect();
                self.rates = match &self.previous {
                    Some((at, before)) if now > *at => {
                        let elapsed = now.duration_since(*at).as_secs_f64();
                        calls
                            .iter()
                            .map(|(id, &n)| {
                                let earlier = before.get(id).copied().unwrap_or(n);
                                (id.clone(), n.saturating_sub(earlier) as f64 / elapsed)
                            })
                            .collect()
                    }
                    // Until a second poll, the instance's own recent rate.
                    _ => report
                        .dispatchers
                        .iter()
                        .filter_map(|d| Some((d.dispatcher_id.clone(), d.rate_per_second?)))
                        .collect(),
                };
                self.previous = Some((now, calls));
                self.report = Some(report);
                self.error = None;
            }
            Err(error) => self.error = Some(error),
        }
    }
}

fn health_color(health: &str) -> Color {
    match health {
        "healthy" => Color::Green,
        "degraded" | "starting" => Color::Yellow,
        _ => Color::Red,
    }
}

/// A number's cell, right-aligned so the digits line up.
fn number(text: String) -> Cell<'static> {
    Cell::from(Line::from(text).right_aligned())
}

fn or_dash(value: Option<f64>, precision: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.precision$}"))
}

fn draw(frame: &mut Frame<'_>, view: &View) {
    let sinks = view.report.as_ref().map_or(0, |r| r.sinks.len().max(1));
    let reasons = view
        .report
        .as_ref()
        .map_or(0, |r| r.readiness.reasons.len().min(5));
    let [header, dispatchers, sinks_area, footer] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(4),
        Constraint::Length(sinks as u16 + 3),
        Constraint::Length(reasons as u16 + 1),
    ])
    .areas(frame.area());

    let bold = Style::new().add_modifier(Modifier::BOLD);
    let mut title = vec![Span::styled("dispatchd top", bold)];
    let mut status = Vec::new();
    if let Some(report) = &view.report {
        title.push(Span::raw(format!(
            "  {} · instance {} · up {}",
            report.version,
            report.instance.as_deref().unwrap_or("-"),
            humantime::format_duration(Duration::from_secs(report.uptime_seconds as u64)),
        )));
        let ready = report.readiness.status.as_str();
        status.push(Span::styled(
            ready.replace('_', " ").to_uppercase(),
            bold.fg(if ready == "ready" {
                Color::Green
            } else {
                Color::Red
            }),
        ));
        if let Some(bus) = &report.bus {
            status.push(Span::raw(format!("  bus {}: ", bus.kind)));
            status.push(Span::styled(
                bus.publishing.clone(),
                Style::new().fg(if bus.publishing == "ok" {
                    Color::Green
                } else {
                    Color::Red
                }),
            ));
        }
    }
    let mut second = vec![Span::raw(format!(
        "{} · every {} · q quits",
        view.url,
        humantime::format_duration(view.interval)
    ))];
    if let Some(error) = &view.error {
        second = vec![Span::styled(error.clone(), bold.fg(Color::Red))];
    }
    frame.render_widget(
        Paragraph::new(vec![
            Line::from(title),
            Line::from(status),
            Line::from(second),
        ]),
        header,
    );

    let Some(report) = &view.report else {
        frame.render_widget(
            Paragraph::new("waiting for the first answer…").block(Block::bordered()),
            dispatchers,
        );
        return;
    };

    let rows = report.dispatchers.iter().map(|d| {
        let color = health_color(&d.health);
        Row::new(vec![
            Cell::from(d.dispatcher_id.clone()),
            Cell::from(d.health.clone()).style(Style::new().fg(color)),
            number(or_dash(view.rates.get(&d.dispatcher_id).copied(), 1)),
            number(d.calls.to_string()),
            number(or_dash(d.error_ratio.map(|r| r * 100.0), 1)),
            number(or_dash(d.latency_p50_ms, 2)),
            number(or_dash(d.latency_p99_ms, 2)),
            Cell::from(format!(" {}", d.breaker.as_deref().unwrap_or("-"))).style(Style::new().fg(
                match d.breaker.as_deref() {
                    Some("open") => Color::Red,
                    Some("half_open") => Color::Yellow,
                    _ => Color::Reset,
                },
            )),
            number(format!("{:.1}s", d.heartbeat_age_seconds)),
        ])
    });
    let header_row = Row::new(vec![
        Cell::from("DISPATCHER"),
        Cell::from("HEALTH"),
        number("RATE/S".into()),
        number("CALLS".into()),
        number("ERR %".into()),
        number("P50 MS".into()),
        number("P99 MS".into()),
        Cell::from(" BREAKER"),
        number("HEARTBEAT".into()),
    ])
    .style(bold);
    frame.render_widget(
        Table::new(
            rows,
            [
                Constraint::Min(16),
                Constraint::Length(9),
                Constraint::Length(9),
                Constraint::Length(9),
                Constraint::Length(7),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(9),
                Constraint::Length(9),
            ],
        )
        .header(header_row)
        .block(Block::bordered().title(format!(" Dispatchers ({}) ", report.dispatchers.len()))),
        dispatchers,
    );

    let sink_rows: Vec<Row<'_>> = if report.sinks.is_empty() {
        vec![Row::new(["no sink (or metrics disabled)"])]
    } else {
        report
            .sinks
            .iter()
            .map(|s| {
                let trouble = s.dropped + s.dead_lettered > 0;
                Row::new(vec![
                    Cell::from(s.sink.clone()),
                    number(s.queue_depth.to_string()),
                    number(s.received.to_string()),
                    number(s.sent.to_string()),
                    number(s.retried.to_string()),
                    number(s.dropped.to_string()),
                    number(s.dead_lettered.to_string()),
                ])
                .style(Style::new().fg(if trouble {
                    Color::Yellow
                } else {
                    Color::Reset
                }))
            })
            .collect()
    };
    frame.render_widget(
        Table::new(
            sink_rows,
            [
                Constraint::Min(16),
                Constraint::Length(8),
                Constraint::Length(10),
                Constraint::Length(10),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(14),
            ],
        )
        .header(
            Row::new(vec![
                Cell::from("SINK"),
                number("QUEUED".into()),
                number("RECEIVED".into()),
                number("SENT".into()),
                number("RETRIED".into()),
                number("DROPPED".into()),
                number("DEAD-LETTERED".into()),
            ])
            .style(bold),
        )
        .block(Block::bordered().title(" Sinks ")),
        sinks_area,
    );

    let lines: Vec<Line<'_>> = report
        .readiness
        .reasons
        .iter()
        .take(5)
        .map(|reason| Line::styled(reason.clone(), Style::new().fg(Color::Red)))
        .collect();
    frame.render_widget(Paragraph::new(lines), footer);
}

#[cfg(test)]
mod tests {
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    use super::*;

    fn report(calls: u64) -> StatusReport {
        serde_json::from_value(serde_json::json!({
            "version": "0.1.0",
            "instance": "eu-1a",
            "uptime_seconds": 65.0,
            "readiness": {"status": "not_ready", "reasons": ["orders: breaker open"]},
            "dispatchers": [{
                "dispatcher_id": "orders", "health": "degraded", "state": "degraded",
                "origin": "in_process", "critical": true, "heartbeat_age_seconds": 0.5,
                "stale_threshold_seconds": 120.0, "reason": "breaker open", "calls": calls,
                "errors": 3, "refusals": 1, "error_ratio": 0.25, "rate_per_second": null,
                "latency_p50_ms": 1.5, "latency_p99_ms": 12.0, "breaker": "open"
            }],
            "sinks": [{"sink": "jsonl", "queue_depth": 2, "received": 9, "sent": 7,
                       "retried": 0, "dropped": 0, "dead_lettered": 0}],
            "bus": {"kind": "memory", "publishing": "ok"}
        }))
        .unwrap()
    }

    fn screen(view: &View) -> String {
        let mut terminal = Terminal::new(TestBackend::new(110, 20)).unwrap();
        terminal.draw(|frame| draw(frame, view)).unwrap();
        let buffer = terminal.backend().buffer();
        let width = buffer.area.width as usize;
        buffer
            .content
            .chunks(width)
            .map(|line| line.iter().map(|c| c.symbol()).collect::<String>() + "\n")
            .collect()
    }

    fn view() -> View {
        View::new(&Options {
            url: "http://127.0.0.1:9/".into(),
            interval: Duration::from_secs(1),
            token: None,
        })
    }

    #[test]
    fn draws_dispatchers_sinks_bus_and_readiness() {
        let mut view = view();
        let start = Instant::now();
        view.update(Ok(report(10)), start);
        view.update(Ok(report(30)), start + Duration::from_secs(2));
        let text = screen(&view);
        for expected in [
            "instance eu-1a",
            "NOT READY",
            "bus memory: ok",
            "orders",
            "degraded",
            "10.0", // (30 - 10) calls in 2 s
            "25.0",
            "open",
            "jsonl",
            "orders: breaker open",
        ] {
            assert!(text.contains(expected), "{expected} missing from\n{text}");
        }
    }

    #[test]
    fn an_unreachable_instance_is_a_line_that_says_so() {
        let mut view = view();
        view.update(
            Err("cannot reach http://127.0.0.1:9: connection refused or unreachable. Is dispatchd running there?".into()),
            Instant::now(),
        );
        let text = screen(&view);
        assert!(text.contains("cannot reach http://127.0.0.1:9"), "{text}");
        assert!(text.contains("waiting for the first answer"), "{text}");
        // A later failure keeps the last report on screen, with the error above it.
        view.update(Ok(report(1)), Instant::now());
        view.update(Err("cannot reach it".into()), Instant::now());
        let text = screen(&view);
        assert!(
            text.contains("cannot reach it") && text.contains("orders"),
            "{text}"
        );
    }
}
