//! The guest's result line, `PVKIT-RESULT key=value ...`: what a workload of the demo kernel
//! prints after its timed section (the harness convention of `compare`, not part of the VM).

/// Prefix of the result line.
pub const RESULT_PREFIX: &str = "PVKIT-RESULT ";

/// The result line a workload prints: `PVKIT-RESULT key=value ...`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestResult {
    /// The key/value pairs in order.
    pub fields: Vec<(String, String)>,
}

impl GuestResult {
    /// The fields as `key=value` words, space-separated (the line without its prefix).
    pub fn line(&self) -> String {
        self.fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Finds the last result line in console output (words without `=` are skipped).
    pub fn parse(console: &[u8]) -> Option<GuestResult> {
        let text = String::from_utf8_lossy(console);
        let line = text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(RESULT_PREFIX))?;
        let fields = line
            .split_whitespace()
            .filter_map(|w| {
                w.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        Some(GuestResult { fields })
    }

    /// A field's value (the first, if the key repeats).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `ops` as a number.
    pub fn ops(&self) -> Option<u64> {
        self.get("ops")?.parse().ok()
    }

    /// `checksum` as a number (hex with `0x`).
    pub fn checksum(&self) -> Option<u64> {
        u64::from_str_radix(self.get("checksum")?.strip_prefix("0x")?, 16).ok()
    }

    /// The numeric fields other than the standard `workload`, `mode`, `ops` and `checksum`
    /// (e.g. `wake_overshoot_ns_p99`); non-numeric values are left out.
    pub fn extra_numbers(&self) -> impl Iterator<Item = (&str, u64)> {
        const STANDARD: &[&str] = &["workload", "mode", "ops", "checksum"];
        self.fields
            .iter()
            .filter(|(k, _)| !STANDARD.contains(&k.as_str()))
            .filter_map(|(k, v)| Some((k.as_str(), v.parse().ok()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_lines() {
        let out = b"hello\nPVKIT-RESULT workload=null mode=pv ops=10 checksum=0x00000000000000ff\n";
        let r = GuestResult::parse(out).unwrap();
        assert_eq!(r.get("workload"), Some("null"));
        assert_eq!(r.get("mode"), Some("pv"));
        assert_eq!(r.ops(), Some(10));
        assert_eq!(r.checksum(), Some(255));
        assert_eq!(r.get("nope"), None);
        assert_eq!(GuestResult::parse(b"no result"), None);
        assert_eq!(GuestResult::parse(b""), None);
    }

    #[test]
    fn the_last_result_line_wins() {
        let out = b"PVKIT-RESULT ops=1\nnoise\nPVKIT-RESULT ops=2\r\ntrailer";
        assert_eq!(GuestResult::parse(out).unwrap().ops(), Some(2));
    }

    #[test]
    fn the_prefix_must_start_the_line() {
        assert_eq!(GuestResult::parse(b"x PVKIT-RESULT ops=1\n"), None);
        // Without the space it is another word.
        assert_eq!(GuestResult::parse(b"PVKIT-RESULTS ops=1\n"), None);
        // An empty result line has no fields.
        assert_eq!(
            GuestResult::parse(b"PVKIT-RESULT \n"),
            Some(GuestResult::default())
        );
    }

    #[test]
    fn bad_numbers_are_none() {
        let r = GuestResult::parse(b"PVKIT-RESULT ops=ten checksum=ff junk mode=\n").unwrap();
        assert_eq!(r.ops(), None);
        // `checksum` must be 0x-prefixed hex.
        assert_eq!(r.checksum(), None);
        assert_eq!(r.get("mode"), Some(""));
        assert_eq!(r.get("junk"), None);
        let r = GuestResult::parse(b"PVKIT-RESULT checksum=0xzz\n").unwrap();
        assert_eq!(r.checksum(), None);
        let r = GuestResult::parse(b"PVKIT-RESULT checksum=0x1ffffffffffffffff\n").unwrap();
        assert_eq!(r.checksum(), None, "more than 64 bits");
    }

    #[test]
    fn extra_numbers_skip_the_standard_and_text_fields() {
        let r = GuestResult::parse(
            b"PVKIT-RESULT workload=idle mode=pv ops=5 checksum=0x01 strategy=pv p99=42 n=7\n",
        )
        .unwrap();
        assert_eq!(
            r.extra_numbers().collect::<Vec<_>>(),
            [("p99", 42), ("n", 7)]
        );
    }

    #[test]
    fn invalid_utf8_is_tolerated() {
        let r = GuestResult::parse(b"\xff\xfe\nPVKIT-RESULT ops=3\n").unwrap();
        assert_eq!(r.ops(), Some(3));
    }
}
