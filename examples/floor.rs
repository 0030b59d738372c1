//! The floor of `scripts/http-bench.sh`: the least an axum 0.8 service pays to take a message.
//! It parses the same JSON body as `POST /api/v1/messages/{topic}` (the same fields, unknown ones
//! refused) and answers a small JSON, with nothing else: no routing to dispatchers, no metrics,
//! no traces, no files. dispatchd's ingest is measured against it.
//!
//!     cargo run --release --example floor -- 127.0.0.1:9100

use std::collections::BTreeMap;

use axum::extract::Path;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Parsed as dispatchd parses it, then unused.
struct Body {
    message_type: String,
    #[serde(default)]
    payload: serde_json::Value,
    message_id: Option<String>,
    correlation_id: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    timestamp: Option<String>,
}

async fn ingest(Path(topic): Path<String>, Json(body): Json<Body>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "success",
        "topic": topic,
        "message_type": body.message_type,
    }))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9100".to_owned());
    let app = Router::new().route("/api/v1/messages/{topic}", post(ingest));
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!("floor listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await
}
