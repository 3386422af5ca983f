//! Fault rules as a user or a guest writes them: the line form (command line,
//! ctl, mailbox) and the TOML file. A rule that parses prints back as a line
//! that parses to the same rule.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = dma::RuleSpec::parse(text) {
        let line = spec.to_string();
        let again = dma::RuleSpec::parse(&line).expect("a printed rule parses");
        assert_eq!(again, spec, "{line}");
    }
    let _ = dma::RuleSpec::parse_match(text);
    let _ = backend::config::parse_fault_toml(text, std::path::Path::new("fuzz.toml"));
});
