//! `docs/ABI.md` §6's call table against the crate: every call's number, name, feature bit and
//! argument registers, in both directions.

use hypercall_abi::request::{ALL_CALLS, Request};
use hypercall_abi::{Call, call_feature, features};

const ABI_MD: &str = include_str!("../../docs/ABI.md");

/// The argument-register columns of the table, in order.
const REGISTERS: [&str; 4] = ["rdi", "rsi", "rcx", "r8"];

#[derive(Debug)]
struct Row {
    nr: u64,
    name: String,
    feature: Option<u64>,
    registers: Vec<&'static str>,
}

fn cells(line: &str) -> Vec<&str> {
    let line = line.trim();
    assert!(
        line.starts_with('|') && line.ends_with('|'),
        "not a table row: {line}"
    );
    line[1..line.len() - 1].split('|').map(str::trim).collect()
}

fn unquote(cell: &str) -> &str {
    cell.trim_matches('`')
}

/// The rows of the first table in `## 6. Calls`.
fn call_table() -> Vec<Row> {
    let section = ABI_MD
        .split("\n## ")
        .find(|s| s.starts_with("6. Calls"))
        .expect("ABI.md has a section `## 6. Calls`");
    let mut lines = section.lines().skip_while(|l| !l.starts_with('|'));
    let header = cells(lines.next().expect("a table"));
    let expected_header = [
        "nr",
        "name",
        "feature",
        "`rdi` (a0)",
        "`rsi` (a1)",
        "`rcx` (a2)",
        "`r8` (a3)",
        "result (`rdx`)",
        "errors",
    ];
    assert_eq!(header, expected_header, "§6 table header");
    let rule = cells(lines.next().expect("a header rule"));
    assert!(
        rule.iter().all(|c| c.chars().all(|ch| ch == '-')),
        "{rule:?}"
    );
    lines
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let c = cells(l);
            assert_eq!(c.len(), expected_header.len(), "cell count of {l}");
            let feature = match c[2] {
                "—" => None,
                f => Some(
                    features::from_name(unquote(f))
                        .unwrap_or_else(|| panic!("unknown feature {f} in {l}")),
                ),
            };
            let registers = REGISTERS
                .iter()
                .zip(&c[3..7])
                .filter(|(_, cell)| **cell != "—")
                .map(|(r, _)| *r)
                .collect();
            Row {
                nr: c[0].parse().unwrap_or_else(|_| panic!("number in {l}")),
                name: unquote(c[1]).to_string(),
                feature,
                registers,
            }
        })
        .collect()
}

#[test]
fn the_call_table_matches_the_crate() {
    let rows = call_table();
    for row in &rows {
        let call = Call::from_raw(row.nr)
            .unwrap_or_else(|| panic!("ABI.md lists number {} the crate lacks", row.nr));
        assert_eq!(row.name, call.name(), "name of call {}", row.nr);
        assert_eq!(row.feature, call_feature(call), "feature of {}", row.name);
        assert_eq!(
            row.registers,
            Request::arg_registers(call),
            "argument registers of {}",
            row.name
        );
    }
    for call in ALL_CALLS {
        assert!(
            rows.iter().any(|r| r.nr == u64::from(call.raw())),
            "{} is missing from ABI.md §6",
            call.name()
        );
    }
    assert_eq!(rows.len(), ALL_CALLS.len(), "one row per call");
}

/// The registers the table lists are the ones `encode` fills: a call's encoding has zeros
/// exactly past them (for a request whose fields are all non-zero).
#[test]
fn arg_registers_agree_with_encode() {
    use hypercall_abi::request::{PinOp, ZeroOp};
    let x = u64::MAX;
    let requests = [
        Request::Null { echo: x },
        Request::Features,
        Request::ConsoleWrite { gpa: x, len: x },
        Request::Exit { code: u32::MAX },
        Request::ClockNs,
        Request::IdleYield { deadline_ns: x },
        Request::ZeroHints(ZeroOp::Query {
            bitmap_gpa: x,
            first_frame: x,
            count: x,
        }),
        Request::MmuUpdate {
            batch_gpa: x,
            count: x,
            defer_sync: true,
        },
        Request::MmuPin {
            op: PinOp::Unpin,
            frame: x,
        },
    ];
    for r in requests {
        let used = Request::arg_registers(r.call()).len();
        let args = r.encode().args;
        assert!(args[..used].iter().all(|&a| a != 0), "{r:?}: {args:?}");
        assert!(args[used..].iter().all(|&a| a == 0), "{r:?}: {args:?}");
    }
}
