//! Config loader: arbitrary text as a config file gives a config or problems (an error with a
//! message), never a panic.
#![no_main]

use std::path::Path;

use dispatchd::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(error) = Config::from_text(Path::new("fuzz.toml"), text, |_| None) {
        let message = error.to_string();
        assert!(!message.is_empty());
    }
});
