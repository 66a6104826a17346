//! The workload arguments in [`hypercall_abi::boot::BootInfo::args`]: ASCII `key=value` words
//! separated by spaces, every value a decimal `u64` (`_` separators allowed, as in
//! `bytes=16_384`) unless the key is declared text-valued (e.g. `root=new`, read with
//! [`Args::get_str`]). Every key must be one the workload declares.
//!
//! Allocation-free: [`Args`] keeps the text and looks keys up on demand.
//!
//! ```text
//! Args::parse(b"ops=1_000 root=new", &["ops"], &["root"])  -> get("ops") = Some(1000),
//!                                                             get_str("root") = Some("new")
//! Args::parse(b"colour=blue", &["ops"], &[])                -> "unknown argument 'colour' (known: ops)"
//! ```
//!
//! This kernel's own (it is no part of guest-pv's library): its unit tests run on the host from
//! the `tests` crate (`tests/args.rs`), since this freestanding crate has no test harness.

use core::fmt;

/// Validated workload arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Args<'a> {
    text: &'a str,
}

/// Why workload arguments were rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgError<'a> {
    /// The bytes are not UTF-8.
    NotUtf8,
    /// A word is not `key=value` with a non-empty key.
    Malformed(&'a str),
    /// A value is not a decimal `u64`.
    BadValue {
        /// The key.
        key: &'a str,
        /// The offending value.
        value: &'a str,
    },
    /// A key appears twice.
    Duplicate(&'a str),
    /// A key the workload does not know.
    Unknown {
        /// The key.
        key: &'a str,
        /// The numeric keys the workload knows.
        known: &'a [&'a str],
        /// The text-valued keys the workload knows.
        text: &'a [&'a str],
    },
}

impl fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::NotUtf8 => f.write_str("arguments are not valid UTF-8"),
            ArgError::Malformed(word) => write!(f, "malformed argument '{word}' (want key=value)"),
            ArgError::BadValue { key, value } => {
                write!(f, "bad value '{value}' for '{key}' (want a decimal u64)")
            }
            ArgError::Duplicate(key) => write!(f, "argument '{key}' given twice"),
            ArgError::Unknown { key, known, text } => {
                write!(f, "unknown argument '{key}' (known: ")?;
                if known.is_empty() && text.is_empty() {
                    f.write_str("none")?;
                }
                for (i, k) in known.iter().chain(text.iter()).enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(k)?;
                }
                f.write_str(")")
            }
        }
    }
}

impl core::error::Error for ArgError<'_> {}

impl<'a> Args<'a> {
    /// Checks every word: `key=value` with a key from `known` (numeric value) or `text` (any
    /// value; the workload validates it), no key twice. Words are checked in order, and a
    /// word's key before its value, so `colour=blue` is reported as an unknown key.
    pub fn parse(
        raw: &'a [u8],
        known: &'a [&'a str],
        text: &'a [&'a str],
    ) -> Result<Args<'a>, ArgError<'a>> {
        Args::check(raw, known, text)
    }

    fn check(
        raw: &'a [u8],
        known: &'a [&'a str],
        text_keys: &'a [&'a str],
    ) -> Result<Args<'a>, ArgError<'a>> {
        let text = core::str::from_utf8(raw).map_err(|_| ArgError::NotUtf8)?;
        let args = Args { text };
        for (i, word) in args.words().enumerate() {
            let (key, value) = split_word(word)?;
            let numeric = known.contains(&key);
            if !numeric && !text_keys.contains(&key) {
                return Err(ArgError::Unknown {
                    key,
                    known,
                    text: text_keys,
                });
            }
            if numeric {
                parse_u64(value).ok_or(ArgError::BadValue { key, value })?;
            }
            if args
                .words()
                .take(i)
                .any(|w| split_word(w).is_ok_and(|(k, _)| k == key))
            {
                return Err(ArgError::Duplicate(key));
            }
        }
        Ok(args)
    }

    /// The value of `key`, if given (and numeric).
    pub fn get(&self, key: &str) -> Option<u64> {
        self.iter().find(|&(k, _)| k == key).map(|(_, v)| v)
    }

    /// The value of `key` as text, if given (for any key, numeric or text-valued).
    pub fn get_str(&self, key: &str) -> Option<&'a str> {
        self.words()
            .filter_map(|w| split_word(w).ok())
            .find(|&(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// The value of `key`, or `default`.
    pub fn get_or(&self, key: &str, default: u64) -> u64 {
        self.get(key).unwrap_or(default)
    }

    /// The `(key, value)` pairs with numeric values, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, u64)> + 'a {
        // Every numeric word was validated by `parse`; only text-valued ones are filtered out.
        self.words().filter_map(|w| {
            let (k, v) = split_word(w).ok()?;
            Some((k, parse_u64(v)?))
        })
    }

    fn words(&self) -> impl Iterator<Item = &'a str> + 'a {
        self.text.split(' ').filter(|w| !w.is_empty())
    }
}

fn split_word(word: &str) -> Result<(&str, &str), ArgError<'_>> {
    match word.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key, value)),
        _ => Err(ArgError::Malformed(word)),
    }
}

/// Parses a decimal `u64`: ASCII digits, with `_` allowed between them (`16_384`). `None` for
/// anything else, including overflow.
fn parse_u64(s: &str) -> Option<u64> {
    let bytes = s.as_bytes();
    if !bytes.first()?.is_ascii_digit() || bytes.last() == Some(&b'_') {
        return None;
    }
    let mut v: u64 = 0;
    for &b in bytes {
        match b {
            b'0'..=b'9' => v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?,
            b'_' => {}
            _ => return None,
        }
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use std::string::ToString;
    use std::vec::Vec;

    use super::*;

    const KEYS: &[&str] = &["ops", "bytes"];

    #[test]
    fn parses_numbers() {
        assert_eq!(parse_u64("0"), Some(0));
        assert_eq!(parse_u64("16384"), Some(16384));
        assert_eq!(parse_u64("16_384"), Some(16384));
        assert_eq!(parse_u64("1_000_000"), Some(1_000_000));
        assert_eq!(parse_u64("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "_1",
            "1_",
            "-1",
            "+1",
            "0x10",
            "1.5",
            " 1",
            "18446744073709551616",
        ] {
            assert_eq!(parse_u64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn empty_arguments() {
        let a = Args::parse(b"", KEYS, &[]).unwrap();
        assert_eq!(a.iter().count(), 0);
        assert_eq!(a.get("ops"), None);
        assert!(Args::parse(b"", &[], &[]).is_ok());
    }

    #[test]
    fn looks_keys_up() {
        let a = Args::parse(b"ops=10 bytes=4_096", KEYS, &[]).unwrap();
        assert_eq!(a.get("ops"), Some(10));
        assert_eq!(a.get("bytes"), Some(4096));
        assert_eq!(a.get_or("bytes", 7), 4096);
        assert_eq!(a.get_or("other", 7), 7);
        assert_eq!(a.iter().collect::<Vec<_>>(), [("ops", 10), ("bytes", 4096)]);
    }

    #[test]
    fn tolerates_extra_spaces() {
        let a = Args::parse(b"  ops=1   bytes=2 ", KEYS, &[]).unwrap();
        assert_eq!(a.iter().collect::<Vec<_>>(), [("ops", 1), ("bytes", 2)]);
    }

    #[test]
    fn rejects_bad_input() {
        let parse = |raw: &'static [u8]| Args::parse(raw, KEYS, &[]);
        assert_eq!(parse(b"ops"), Err(ArgError::Malformed("ops")));
        assert_eq!(parse(b"=5"), Err(ArgError::Malformed("=5")));
        assert_eq!(
            parse(b"ops=ten"),
            Err(ArgError::BadValue {
                key: "ops",
                value: "ten"
            })
        );
        assert_eq!(
            parse(b"ops="),
            Err(ArgError::BadValue {
                key: "ops",
                value: ""
            })
        );
        assert_eq!(parse(b"ops=1 ops=2"), Err(ArgError::Duplicate("ops")));
        assert_eq!(parse(&[0xff]), Err(ArgError::NotUtf8));
    }

    #[test]
    fn names_the_unknown_key() {
        let e = Args::parse(b"ops=1 size=2", &["ops"], &[]).unwrap_err();
        assert_eq!(
            e,
            ArgError::Unknown {
                key: "size",
                known: &["ops"],
                text: &[]
            }
        );
        assert_eq!(e.to_string(), "unknown argument 'size' (known: ops)");
        let e = Args::parse(b"ops=1", &[], &[]).unwrap_err();
        assert_eq!(e.to_string(), "unknown argument 'ops' (known: none)");
    }

    #[test]
    fn checks_keys_before_values() {
        let known: &[&str] = &["ops"];
        assert_eq!(
            Args::parse(b"colour=blue", known, &[]),
            Err(ArgError::Unknown {
                key: "colour",
                known,
                text: &[]
            })
        );
        assert_eq!(
            Args::parse(b"ops=lots", known, &[]),
            Err(ArgError::BadValue {
                key: "ops",
                value: "lots"
            })
        );
        assert_eq!(
            Args::parse(b"ops=1 x", known, &[]),
            Err(ArgError::Malformed("x"))
        );
        let a = Args::parse(b"ops=3", known, &[]).unwrap();
        assert_eq!(a.get("ops"), Some(3));
    }

    #[test]
    fn text_keys_take_any_value() {
        let known: &[&str] = &["ops"];
        let text: &[&str] = &["root"];
        let a = Args::parse(b"root=new ops=2", known, text).unwrap();
        assert_eq!(a.get_str("root"), Some("new"));
        assert_eq!(a.get("root"), None);
        assert_eq!(a.get("ops"), Some(2));
        assert_eq!(a.get_str("ops"), Some("2"));
        assert_eq!(a.get_str("other"), None);
        assert_eq!(a.iter().collect::<Vec<_>>(), [("ops", 2)]);
        assert_eq!(
            Args::parse(b"root=", known, text).unwrap().get_str("root"),
            Some("")
        );
        assert_eq!(
            Args::parse(b"ops=x", known, text),
            Err(ArgError::BadValue {
                key: "ops",
                value: "x"
            })
        );
        assert_eq!(
            Args::parse(b"root=a root=b", known, text),
            Err(ArgError::Duplicate("root"))
        );
        let e = Args::parse(b"size=1", known, text).unwrap_err();
        assert_eq!(e.to_string(), "unknown argument 'size' (known: ops, root)");
        let e = Args::parse(b"size=1", &[], &[]).unwrap_err();
        assert_eq!(e.to_string(), "unknown argument 'size' (known: none)");
    }

    #[test]
    fn messages() {
        assert_eq!(
            ArgError::BadValue {
                key: "ops",
                value: "x"
            }
            .to_string(),
            "bad value 'x' for 'ops' (want a decimal u64)"
        );
        assert_eq!(
            ArgError::Malformed("x").to_string(),
            "malformed argument 'x' (want key=value)"
        );
    }
}
