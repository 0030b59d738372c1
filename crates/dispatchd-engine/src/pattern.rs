//! Segment-wise glob patterns for routes.
//!
//! A pattern is dot-separated like a topic. `*` matches exactly one segment, `**` matches zero or
//! more segments, and any other segment matches itself literally. Matching is case-sensitive
//! (`Events` does not match `events`), and a wildcard is always a whole segment: `user*` is an
//! invalid pattern, not a prefix match.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use super::topic::{Category, is_segment_text};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    /// `*`: exactly one segment.
    One,
    /// `**`: zero or more segments.
    Any,
}

/// Why a route's pattern was refused at build time.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("pattern is empty")]
    Empty,
    #[error("pattern segment {0} is empty")]
    EmptySegment(usize),
    #[error(
        "pattern segment {0} (`{1}`) must be `*`, `**` or made of [A-Za-z0-9_-] (wildcards are whole segments)"
    )]
    InvalidSegment(usize, String),
}

/// A compiled topic pattern. Compiled once when the engine is built; matching allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    raw: Box<str>,
    segments: Box<[Segment]>,
}

impl TopicPattern {
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether the topic's segments match. Greedy with backtracking to the last `**`, which is
    /// linear for patterns with one `**` and never worse than O(pattern × topic).
    pub fn matches(&self, topic: &[&str]) -> bool {
        let pattern = &self.segments;
        let (mut p, mut t) = (0, 0);
        // Where to resume after the most recent `**`: (pattern index after it, topic index it
        // has absorbed up to).
        let mut resume: Option<(usize, usize)> = None;
        while t < topic.len() {
            match pattern.get(p) {
                Some(Segment::Any) => {
                    resume = Some((p + 1, t));
                    p += 1;
                    continue;
                }
                Some(Segment::One) => {
                    p += 1;
                    t += 1;
                    continue;
                }
                Some(Segment::Literal(literal)) if **literal == *topic[t] => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
            match resume {
                Some((after, absorbed)) => {
                    // Let the last `**` swallow one more segment and retry from there.
                    p = after;
                    t = absorbed + 1;
                    resume = Some((after, absorbed + 1));
                }
                None => return false,
            }
        }
        pattern[p..].iter().all(|segment| *segment == Segment::Any)
    }

    /// Whether some topic this pattern matches can have `category`. A topic's category is the
    /// one whole segment naming it, so a pattern whose literals name another category, or that
    /// has neither such a literal nor a wildcard to stand for one, can never match a topic of
    /// that category: a route with it is dead configuration.
    pub fn can_match(&self, category: Category) -> bool {
        let mut named = false;
        let mut wildcard = false;
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => match Category::from_segment(text) {
                    Some(other) if other != category => return false,
                    Some(_) => named = true,
                    None => {}
                },
                Segment::One | Segment::Any => wildcard = true,
            }
        }
        named || wildcard
    }
}

impl FromStr for TopicPattern {
    type Err = PatternError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        if raw.is_empty() {
            return Err(PatternError::Empty);
        }
        let segments = raw
            .split('.')
            .enumerate()
            .map(|(index, segment)| match segment {
                "" => Err(PatternError::EmptySegment(index)),
                "*" => Ok(Segment::One),
                "**" => Ok(Segment::Any),
                text if is_segment_text(text) => Ok(Segment::Literal(text.into())),
                text => Err(PatternError::InvalidSegment(index, text.to_owned())),
            })
            .collect::<Result<Box<[Segment]>, _>>()?;
        Ok(TopicPattern {
            raw: raw.into(),
            segments,
        })
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn matches(pattern: &str, topic: &str) -> bool {
        let segments: Vec<&str> = topic.split('.').collect();
        pattern.parse::<TopicPattern>().unwrap().matches(&segments)
    }

    #[test]
    fn star_is_exactly_one_segment() {
        assert!(matches("dev.*.events", "dev.user.events"));
        assert!(!matches("dev.*.events", "dev.events"));
        assert!(!matches("dev.*.events", "dev.a.b.events"));
        assert!(matches("*", "events"));
        assert!(!matches("*", "a.events"));
    }

    #[test]
    fn double_star_is_zero_or_more_segments() {
        assert!(matches("a.**.b", "a.b"));
        assert!(matches("a.**.b", "a.x.b"));
        assert!(matches("a.**.b", "a.x.y.z.b"));
        assert!(!matches("a.**.b", "a.x.y.z.c"));
        assert!(matches("**", "events"));
        assert!(matches("**", "a.b.c.events"));
        assert!(matches("**.events", "events"));
        assert!(matches("events.**", "events"));
        assert!(matches("a.**.b.**.c", "a.b.b.c"));
        assert!(!matches("a.**.b.**.c", "a.c.b"));
        assert!(matches("**.*", "x"));
        assert!(!matches("*.**.*", "x"));
    }

    #[test]
    fn literals_are_case_sensitive_whole_segments() {
        assert!(matches("dev.user.events", "dev.user.events"));
        assert!(!matches("dev.user.events", "dev.User.events"));
        assert!(!matches("dev.user.events", "dev.user.events.v1"));
        assert!(!matches("dev.us.events", "dev.user.events"));
    }

    #[test]
    fn invalid_patterns_are_refused_with_the_segment() {
        assert_eq!("".parse::<TopicPattern>(), Err(PatternError::Empty));
        assert_eq!(
            "a..b".parse::<TopicPattern>(),
            Err(PatternError::EmptySegment(1))
        );
        assert_eq!(
            "dev.user*.events".parse::<TopicPattern>(),
            Err(PatternError::InvalidSegment(1, "user*".into()))
        );
        assert_eq!(
            "a.***".parse::<TopicPattern>(),
            Err(PatternError::InvalidSegment(1, "***".into()))
        );
    }

    #[test]
    fn a_pattern_can_match_a_category_only_through_a_segment_that_may_name_it() {
        let can =
            |pattern: &str, category| pattern.parse::<TopicPattern>().unwrap().can_match(category);
        assert!(can("**", Category::Event));
        assert!(can("shop.*.orders", Category::Command));
        assert!(can("shop.events.orders", Category::Event));
        assert!(can("shop.event.**", Category::Event));
        assert!(
            !can("shop.orders", Category::Event),
            "no segment can name it"
        );
        assert!(!can("shop.events.orders", Category::Command));
        assert!(
            !can("shop.events.*", Category::Intent),
            "a literal names another"
        );
        // OmniNode's short forms name categories as the long forms do.
        assert!(can("onex.evt.**", Category::Event));
        assert!(!can("onex.evt.**", Category::Command));
        assert!(can("onex.cmd.billing.*", Category::Command));
    }

    /// The obvious recursive definition, as the reference the fast matcher must agree with.
    fn reference(pattern: &[&str], topic: &[&str]) -> bool {
        match pattern.split_first() {
            None => topic.is_empty(),
            Some((&"**", rest)) => (0..=topic.len()).any(|skip| reference(rest, &topic[skip..])),
            Some((&"*", rest)) => !topic.is_empty() && reference(rest, &topic[1..]),
            Some((literal, rest)) => topic.first() == Some(literal) && reference(rest, &topic[1..]),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(2000)))]

        #[test]
        fn agrees_with_the_reference_definition(
            pattern in prop::collection::vec(prop::sample::select(vec!["a", "b", "*", "**"]), 1..7),
            topic in prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..9),
        ) {
            let compiled: TopicPattern = pattern.join(".").parse().unwrap();
            prop_assert_eq!(compiled.matches(&topic), reference(&pattern, &topic));
        }

        #[test]
        fn arbitrary_text_never_panics(raw in ".{0,40}", topic in "[a-c.]{0,20}") {
            if let Ok(pattern) = raw.parse::<TopicPattern>() {
                let segments: Vec<&str> = topic.split('.').collect();
                let _ = pattern.matches(&segments);
                prop_assert_eq!(pattern.as_str(), raw.as_str());
            }
        }
    }
}
