//! Route matcher: the input is a pattern, a newline, and a topic. Arbitrary text never panics,
//! a pattern that parses shows as it was written, and matching agrees with a dynamic-programming
//! reference written from the definition (`*` one segment, `**` zero or more).
#![no_main]

use dispatchd::engine::TopicPattern;
use libfuzzer_sys::fuzz_target;

/// `table[p][t]`: whether `pattern[p..]` matches `topic[t..]`.
fn reference(pattern: &[&str], topic: &[&str]) -> bool {
    let (np, nt) = (pattern.len(), topic.len());
    let mut table = vec![vec![false; nt + 1]; np + 1];
    table[np][nt] = true;
    for p in (0..np).rev() {
        for t in (0..=nt).rev() {
            table[p][t] = match pattern[p] {
                "**" => table[p + 1][t] || (t < nt && table[p][t + 1]),
                "*" => t < nt && table[p + 1][t + 1],
                literal => t < nt && topic[t] == literal && table[p + 1][t + 1],
            };
        }
    }
    table[0][0]
}

fuzz_target!(|text: &str| {
    let (raw, topic) = text.split_once('\n').unwrap_or((text, ""));
    let Ok(pattern) = raw.parse::<TopicPattern>() else {
        return;
    };
    assert_eq!(pattern.as_str(), raw);
    assert_eq!(
        pattern.to_string().parse::<TopicPattern>().as_ref(),
        Ok(&pattern)
    );
    // Bound the work: a long topic against many `**` is what the reference is slow at.
    if topic.len() > 512 {
        return;
    }
    let segments: Vec<&str> = topic.split('.').collect();
    let expected = reference(&raw.split('.').collect::<Vec<_>>(), &segments);
    assert_eq!(
        pattern.matches(&segments),
        expected,
        "{raw:?} against {topic:?}"
    );
});
