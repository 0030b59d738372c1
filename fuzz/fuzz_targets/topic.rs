//! Topic parser: arbitrary text never panics, and a topic that parses is exactly its segments,
//! each of the allowed alphabet, with exactly one category among them.
#![no_main]

use dispatchd::engine::{Category, MAX_TOPIC_LEN, Topic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(topic) = Topic::parse(text) else {
        return;
    };
    assert!(!text.is_empty() && text.len() <= MAX_TOPIC_LEN);
    assert_eq!(topic.segments().join("."), text);
    let named: Vec<Category> = topic
        .segments()
        .iter()
        .filter_map(|segment| Category::from_segment(segment))
        .collect();
    assert!(!named.is_empty());
    assert!(named.iter().all(|category| *category == topic.category()));
    for segment in topic.segments() {
        assert!(!segment.is_empty());
        assert!(
            segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        );
    }
});
