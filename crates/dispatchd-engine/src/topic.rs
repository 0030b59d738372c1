//! Topic parsing: a topic is dot-separated segments, and its category is one whole segment.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The longest topic accepted, in bytes. Topics become log fields and route keys, so they are
/// bounded like every other piece of input.
pub const MAX_TOPIC_LEN: usize = 255;

/// What kind of message a topic carries. It decides which dispatchers may receive it, and it is a
/// metric label, so the set is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Event,
    Command,
    Intent,
}

impl Category {
    pub const ALL: [Category; 3] = [Category::Event, Category::Command, Category::Intent];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Event => "event",
            Category::Command => "command",
            Category::Intent => "intent",
        }
    }

    /// The plural segment that names it in a topic (`events`).
    pub fn segment(self) -> &'static str {
        match self {
            Category::Event => "events",
            Category::Command => "commands",
            Category::Intent => "intents",
        }
    }

    /// The category a whole topic segment names, singular or plural (`events`, `event`), or in
    /// OmniNode's canonical short form (`evt`, `cmd`: `onex.evt.platform.node-introspection.v1`).
    /// Intents have no short form.
    pub fn from_segment(segment: &str) -> Option<Category> {
        match segment {
            "events" | "event" | "evt" => Some(Category::Event),
            "commands" | "command" | "cmd" => Some(Category::Command),
            "intents" | "intent" => Some(Category::Intent),
            _ => None,
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Category {
    type Err = UnknownCategory;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Category::from_segment(s).ok_or_else(|| UnknownCategory(s.to_owned()))
    }
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("unknown category `{0}` (expected event, command or intent)")]
pub struct UnknownCategory(pub String);

/// Why a topic was refused. Each one makes the dispatch `invalid_message`.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is {0} bytes long, more than the {MAX_TOPIC_LEN} allowed")]
    TooLong(usize),
    #[error("topic segment {0} is empty")]
    EmptySegment(usize),
    #[error("topic segment {0} has a character outside [A-Za-z0-9_-]")]
    InvalidCharacter(usize),
    #[error("topic has no category segment (events, commands or intents)")]
    NoCategory,
    #[error("topic names two categories, {0} and {1}")]
    AmbiguousCategory(Category, Category),
}

/// A topic that passed validation: its segments and the category one of them names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic<'a> {
    pub(crate) segments: Vec<&'a str>,
    pub(crate) category: Category,
}

impl<'a> Topic<'a> {
    /// Parses `dev.user.events.v1`: every segment non-empty and made of `[A-Za-z0-9_-]`, and
    /// exactly one category named by whole segments (`user_events` names none).
    pub fn parse(topic: &'a str) -> Result<Topic<'a>, TopicError> {
        if topic.is_empty() {
            return Err(TopicError::Empty);
        }
        if topic.len() > MAX_TOPIC_LEN {
            return Err(TopicError::TooLong(topic.len()));
        }
        let mut segments = Vec::with_capacity(8);
        let mut category = None;
        for (index, segment) in topic.split('.').enumerate() {
            if segment.is_empty() {
                return Err(TopicError::EmptySegment(index));
            }
            if !is_segment_text(segment) {
                return Err(TopicError::InvalidCharacter(index));
            }
            if let Some(found) = Category::from_segment(segment) {
                match category {
                    Some(previous) if previous != found => {
                        return Err(TopicError::AmbiguousCategory(previous, found));
                    }
                    _ => category = Some(found),
                }
            }
            segments.push(segment);
        }
        let category = category.ok_or(TopicError::NoCategory)?;
        Ok(Topic { segments, category })
    }

    pub fn category(&self) -> Category {
        self.category
    }

    pub fn segments(&self) -> &[&'a str] {
        &self.segments
    }
}

/// `[A-Za-z0-9_-]+`, the alphabet of topic segments and literal pattern segments.
pub(crate) fn is_segment_text(segment: &str) -> bool {
    !segment.is_empty()
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn category_comes_from_a_whole_segment() {
        assert_eq!(
            Topic::parse("dev.user.events.v1").unwrap().category(),
            Category::Event
        );
        assert_eq!(
            Topic::parse("command.billing").unwrap().category(),
            Category::Command
        );
        assert_eq!(
            Topic::parse("a.intents").unwrap().category(),
            Category::Intent
        );
        assert_eq!(
            Topic::parse("dev.user_events.v1"),
            Err(TopicError::NoCategory)
        );
        assert_eq!(
            Topic::parse("dev.eventsource.v1"),
            Err(TopicError::NoCategory)
        );
        assert_eq!(Topic::parse("dev.Events.v1"), Err(TopicError::NoCategory));
    }

    #[test]
    fn omninode_short_forms_name_events_and_commands() {
        assert_eq!(
            Topic::parse("onex.evt.platform.node-introspection.v1")
                .unwrap()
                .category(),
            Category::Event
        );
        assert_eq!(
            Topic::parse("onex.cmd.billing.refund.v1")
                .unwrap()
                .category(),
            Category::Command
        );
        assert_eq!("evt".parse::<Category>(), Ok(Category::Event));
        assert_eq!("cmd".parse::<Category>(), Ok(Category::Command));
        // A short form and a long form of different categories are as ambiguous as two long ones.
        assert_eq!(
            Topic::parse("a.evt.commands"),
            Err(TopicError::AmbiguousCategory(
                Category::Event,
                Category::Command
            ))
        );
        // Only whole segments: `evts` or `cmds` name nothing.
        assert_eq!(Topic::parse("a.evts.v1"), Err(TopicError::NoCategory));
    }

    #[test]
    fn malformed_topics_are_refused_with_the_reason() {
        assert_eq!(Topic::parse(""), Err(TopicError::Empty));
        assert_eq!(Topic::parse("a..events"), Err(TopicError::EmptySegment(1)));
        assert_eq!(Topic::parse("events."), Err(TopicError::EmptySegment(1)));
        assert_eq!(
            Topic::parse("a.b c.events"),
            Err(TopicError::InvalidCharacter(1))
        );
        assert_eq!(
            Topic::parse("a/b.events"),
            Err(TopicError::InvalidCharacter(0))
        );
        assert_eq!(
            Topic::parse("ä.events"),
            Err(TopicError::InvalidCharacter(0))
        );
        let long = format!("events.{}", "a".repeat(300));
        assert_eq!(Topic::parse(&long), Err(TopicError::TooLong(long.len())));
    }

    #[test]
    fn two_different_categories_are_ambiguous_but_a_repeat_is_not() {
        assert_eq!(
            Topic::parse("a.events.commands"),
            Err(TopicError::AmbiguousCategory(
                Category::Event,
                Category::Command
            ))
        );
        assert_eq!(
            Topic::parse("events.x.event").unwrap().category(),
            Category::Event
        );
    }

    #[test]
    fn category_names_round_trip() {
        for category in Category::ALL {
            assert_eq!(category.as_str().parse::<Category>(), Ok(category));
        }
        assert!("bogus".parse::<Category>().is_err());
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(2000)))]

        /// Arbitrary text never panics the parser, and what it accepts is well-formed.
        #[test]
        fn arbitrary_topics_parse_or_are_refused(topic in ".{0,300}") {
            if let Ok(parsed) = Topic::parse(&topic) {
                prop_assert!(topic.len() <= MAX_TOPIC_LEN);
                prop_assert_eq!(parsed.segments().join("."), topic.clone());
                prop_assert!(parsed.segments().iter().any(|s| Category::from_segment(s) == Some(parsed.category())));
            }
        }

        /// Well-formed topics with one category segment always parse to that category.
        #[test]
        fn well_formed_topics_parse(
            before in prop::collection::vec("[a-z0-9_-]{1,8}", 0..4),
            category in prop::sample::select(vec!["events", "event", "evt", "commands", "command", "cmd", "intents", "intent"]),
            after in prop::collection::vec("[a-z0-9_-]{1,8}", 0..4),
        ) {
            // A generated segment could itself name a category; skip those cases.
            prop_assume!(before.iter().chain(&after).all(|s| Category::from_segment(s).is_none()));
            let topic: Vec<&str> = before.iter().map(String::as_str).chain([category]).chain(after.iter().map(String::as_str)).collect();
            let topic = topic.join(".");
            let parsed = Topic::parse(&topic).unwrap();
            prop_assert_eq!(parsed.category(), Category::from_segment(category).unwrap());
        }
    }
}
