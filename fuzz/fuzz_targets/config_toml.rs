//! Any text given as a config file: parsing and the checks `serve` runs (validation and the
//! route templates) return errors, never panic.
#![no_main]
use deltastream_gateway::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(cfg) = Config::from_toml(text) {
        let _ = deltastream_gateway::server::check(&cfg);
    }
});
