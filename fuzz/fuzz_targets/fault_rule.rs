//! Fault rules as a user or a guest writes them: the line form (command line,
//! ctl, mailbox) and the TOML file. A rule that parses prints back as a line
//! that parses to the same rule; the same keys and values given apart (as a
//! TOML table gives them) make the same rule, or none.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = dma::RuleSpec::parse(text);
    if let Ok(spec) = &parsed {
        let line = spec.to_string();
        let again = dma::RuleSpec::parse(&line).expect("a printed rule parses");
        assert_eq!(&again, spec, "{line}");
    }
    let pairs: Option<Vec<(&str, &str)>> = text
        .split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| part.split_once('='))
        .collect();
    if let Some(pairs) = pairs {
        let apart = dma::RuleSpec::from_pairs(pairs.iter().copied());
        assert_eq!(apart.ok(), parsed.ok(), "{text:?} given apart");
    }
    let _ = dma::RuleSpec::parse_match(text);
    let _ = backend::config::parse_fault_toml(text, std::path::Path::new("fuzz.toml"));
});
